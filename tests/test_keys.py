"""Model namespaces: any differing weight gives another namespace; an identity reads none."""

import copy

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from strategies import element_edits

from spanctx.keys import model_namespace, weights_fingerprint

CHUNK = 4096  # small chunks: many per tensor, so chunk bookkeeping is exercised


@pytest.fixture(scope="module")
def model():
    """A private copy of the tiny Llama (tests here edit weights and put them back)."""
    return copy.deepcopy(tiny_model("llama")[0])


def middle_weight(model) -> torch.Tensor:
    return model.model.layers[2].mlp.down_proj.weight  # [hidden, intermediate]


def test_one_ulp_in_a_middle_layer_changes_the_namespace(model):
    base = model_namespace(model)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        w = middle_weight(edited)
        w[7, 100] = torch.nextafter(w[7, 100], torch.tensor(float("inf")))
    assert model_namespace(edited) != base
    assert model_namespace(copy.deepcopy(model)) == base  # an identical copy
    assert model_namespace(model) == base  # deterministic


def test_one_ulp_in_bf16_changes_the_namespace(model):
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    base = model_namespace(bf16)
    with torch.no_grad():
        w = middle_weight(bf16)
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf"), dtype=torch.bfloat16))
    assert model_namespace(bf16) != base


@settings(max_examples=25, deadline=None)
@given(element_edits())
def test_any_single_bit_pattern_change_changes_the_fingerprint(model, edit):
    tensors = [t for _, t in (*model.named_parameters(), *model.named_buffers())]
    tensor_pick, element_pick, mask = edit
    flat = tensors[tensor_pick % len(tensors)].data.view(-1)
    bits = flat.view(torch.int32)  # fp32 weights
    i = element_pick % flat.numel()
    before = weights_fingerprint(model, chunk_elements=CHUNK)
    old = bits[i].item()
    bits[i] = old ^ mask
    try:
        assert weights_fingerprint(model, chunk_elements=CHUNK) != before
    finally:
        bits[i] = old
    assert weights_fingerprint(model, chunk_elements=CHUNK) == before


def test_elements_swapped_between_chunks_change_the_fingerprint(model):
    w = middle_weight(model).data.view(-1)  # elements 5 and CHUNK + 5: one offset, two chunks
    before = weights_fingerprint(model, chunk_elements=CHUNK)
    a, b = w[5].item(), w[CHUNK + 5].item()
    assert a != b
    w[5], w[CHUNK + 5] = b, a
    try:
        assert weights_fingerprint(model, chunk_elements=CHUNK) != before
    finally:
        w[5], w[CHUNK + 5] = a, b


def test_elements_swapped_within_a_chunk_change_the_fingerprint(model):
    w = middle_weight(model).data.view(-1)
    before = weights_fingerprint(model)
    a, b = w[5].item(), w[6].item()
    assert a != b
    w[5], w[6] = b, a
    try:
        assert weights_fingerprint(model) != before
    finally:
        w[5], w[6] = a, b


def test_the_chunk_size_does_not_weaken_equality(model):
    assert weights_fingerprint(copy.deepcopy(model), 1000) == weights_fingerprint(model, 1000)


def test_dtype_enters_the_namespace(model):
    fp16, bf16 = copy.deepcopy(model).half(), copy.deepcopy(model).to(torch.bfloat16)
    assert len({model_namespace(model), model_namespace(fp16), model_namespace(bf16)}) == 3


def test_an_identity_reads_no_weight(model):
    meta = copy.deepcopy(model).to("meta")  # no values to read
    with pytest.raises(ValueError, match="meta device.*identity"):
        model_namespace(meta)
    named = model_namespace(meta, identity="org/model@rev1")
    assert named == model_namespace(model, identity="org/model@rev1")  # weights not consulted
    assert named != model_namespace(model, identity="org/model@rev2")
    assert named != model_namespace(model)
    assert model_namespace(model, identity="x", adapter="a") != model_namespace(model, identity="x")
    with pytest.raises(ValueError, match="non-empty"):
        model_namespace(model, identity="")
