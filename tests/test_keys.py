"""Model namespaces: any differing weight gives another namespace; an identity reads none."""

import copy

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from strategies import element_edits

from spanctx.cache.fingerprint import FINGERPRINT_BLOCK, model_namespace, weights_fingerprint


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


@pytest.fixture(scope="module")
def modules(model):
    """The tiny Llama (every tensor shorter than a block) and a wide layer whose weight
    spans two whole blocks and a partial one."""
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"llama": model, "wide": torch.nn.Linear(512, 300)})  # 153600 = 2 * 65536 + 22528


def wide_weight(modules) -> torch.Tensor:
    return modules["wide"].weight.data.view(-1)


@settings(max_examples=25, deadline=None)
@given(element_edits())
def test_any_single_element_change_changes_the_fingerprint(modules, edit):
    tensors = [t for _, t in (*modules.named_parameters(), *modules.named_buffers())]
    tensor_pick, element_pick, mask = edit
    bits = tensors[tensor_pick % len(tensors)].data.view(-1).view(torch.int32)  # fp32 weights
    i = element_pick % bits.numel()
    before = weights_fingerprint(modules)
    old = bits[i].item()
    bits[i] = old ^ mask
    try:
        after = weights_fingerprint(modules)
        assert after != before
        assert weights_fingerprint(modules, chunk_elements=FINGERPRINT_BLOCK) == after  # chunks: memory, not result
    finally:
        bits[i] = old
    assert weights_fingerprint(modules) == before


@pytest.mark.parametrize("i, j", [(5, 6), (5, FINGERPRINT_BLOCK + 5), (7, 2 * FINGERPRINT_BLOCK + 7)],
                         ids=["one block", "two blocks", "whole and partial block"])
def test_swapped_elements_change_the_fingerprint(modules, i, j):
    w = wide_weight(modules)
    before = weights_fingerprint(modules)
    a, b = w[i].item(), w[j].item()
    assert a != b
    w[i], w[j] = b, a
    try:
        assert weights_fingerprint(modules) != before
    finally:
        w[i], w[j] = a, b


def test_the_chunk_size_does_not_change_the_fingerprint(modules):
    default = weights_fingerprint(modules)
    assert weights_fingerprint(modules, FINGERPRINT_BLOCK) == weights_fingerprint(modules, 3 * FINGERPRINT_BLOCK) == default
    assert weights_fingerprint(copy.deepcopy(modules)) == default
    with pytest.raises(ValueError, match="multiple"):
        weights_fingerprint(modules, 1000)


@pytest.mark.parametrize("i", [0, 1, 2, 3, FINGERPRINT_BLOCK - 1, FINGERPRINT_BLOCK, FINGERPRINT_BLOCK + 9, 70000])
def test_the_worst_single_change_is_seen(i):
    """Flipping the top bit of an int64 changes it by 2**63: only an odd weight keeps
    that change from vanishing modulo 2**64."""
    holder = torch.nn.Module()
    holder.register_buffer("counts", torch.zeros(70001, dtype=torch.int64))
    before = weights_fingerprint(holder)
    holder.counts[i] = -(1 << 63)
    assert weights_fingerprint(holder) != before


def test_the_same_bits_in_another_shape_or_dtype_differ():
    def holding(t: torch.Tensor) -> torch.nn.Module:
        holder = torch.nn.Module()
        holder.register_buffer("t", t)
        return holder

    bits = torch.arange(24, dtype=torch.int16)
    fingerprints = {weights_fingerprint(holding(t))
                    for t in (bits.view(4, 6), bits.view(6, 4), bits.view(torch.float16), bits.view(torch.bfloat16))}
    assert len(fingerprints) == 4


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
