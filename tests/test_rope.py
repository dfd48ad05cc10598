"""Re-rotation of cached keys is exact: a span computed after its anchor and moved by delta
equals the same span computed with everything it attends to at delta further on: alone,
or after its anchor shifted by delta as well (fp32, atol 1e-5). Only relative positions
enter attention, so that is what moving a span's KV reproduces; relative to an anchor
left in place, a moved span still saw it at the old distance (parallel.md says so)."""

from __future__ import annotations

import pytest
import torch
from rope_models import MOVABLE_KINDS, ROPE_MODELS, rope_model
from transformers import DynamicCache

from spanctx.cache import rope
from spanctx.cache.rope import rotate_keys
from spanctx.cache.span_kv import SpanKV
from spanctx.cache.store import KVStore
from spanctx.engine import Engine
from spanctx.hf import cache_kwargs


def mover_of(model) -> rope.KeyMover:
    """The key mover of ``model``, probed through the engine (which runs the model)."""
    return Engine(model, KVStore(1 << 20)).key_mover


def _span_kv(model, anchor_ids: list[int], span_ids: list[int], shift: int):
    """Per-layer (keys, values) of ``span_ids`` right after ``anchor_ids``, both ``shift``
    positions further on than usual, with HF primitives (explicit position_ids)."""
    cache = DynamicCache()
    ids = torch.tensor([anchor_ids + span_ids])
    positions = torch.arange(shift, shift + ids.shape[1])[None]
    with torch.inference_mode():
        model(input_ids=ids, position_ids=positions, use_cache=True, **cache_kwargs(model, cache))
    n = len(anchor_ids)
    return [(layer.keys[:, :, n:], layer.values[:, :, n:]) for layer in cache.layers]


@pytest.mark.parametrize("kind", MOVABLE_KINDS)
@pytest.mark.parametrize(("anchor_len", "delta"), [(0, 23), (9, 1), (9, 57)])
def test_moved_span_equals_span_computed_at_its_place(kind, anchor_len, delta):
    model, _ = rope_model(kind)
    mover = mover_of(model)
    assert mover.movable, mover.reason
    gen = torch.Generator().manual_seed(delta)
    anchor_ids = torch.randint(0, 256, (anchor_len,), generator=gen).tolist()
    span_ids = torch.randint(0, 256, (7,), generator=gen).tolist()
    at_anchor = _span_kv(model, anchor_ids, span_ids, 0)
    at_place = _span_kv(model, anchor_ids, span_ids, delta)
    assert len(at_anchor) == len(mover.inv_freq) == model.config.get_text_config().num_hidden_layers
    for (k0, v0), (k1, v1), inv_freq in zip(at_anchor, at_place, mover.inv_freq):
        moved = rotate_keys(k0, delta, inv_freq)
        torch.testing.assert_close(moved, k1, atol=1e-5, rtol=0)
        torch.testing.assert_close(v0, v1, atol=1e-5, rtol=0)  # values do not depend on position
        assert (moved - k0).abs().max() > 1e-3  # the rotation did something


def test_partial_rotary_leaves_the_other_channels_alone():
    model, _ = rope_model("partial")
    (inv_freq, *_), head_dim = mover_of(model).inv_freq, model.config.hidden_size // model.config.num_attention_heads
    assert 2 * inv_freq.numel() < head_dim
    keys = torch.randn(1, 2, 5, head_dim)
    moved = rotate_keys(keys, 11, inv_freq)
    torch.testing.assert_close(moved[..., 2 * inv_freq.numel():], keys[..., 2 * inv_freq.numel():])
    assert not torch.allclose(moved, keys)


def test_rotation_composes_and_inverts():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).double() / 16)).float()
    keys = torch.randn(1, 2, 4, 16)
    torch.testing.assert_close(rotate_keys(rotate_keys(keys, 5, inv_freq), 7, inv_freq),
                               rotate_keys(keys, 12, inv_freq), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate_keys(rotate_keys(keys, 9, inv_freq), -9, inv_freq), keys, atol=1e-5, rtol=0)


def test_per_layer_rope_uses_each_layer_types_frequencies():
    model, _ = rope_model("per-layer")
    mover = mover_of(model)
    types = model.config.layer_types
    sliding, full = types.index("sliding_attention"), types.index("full_attention")
    assert not torch.equal(mover.inv_freq[sliding], mover.inv_freq[full])


@pytest.mark.parametrize("kind", [k for k, (_, _, movable) in ROPE_MODELS.items() if not movable])
def test_keys_that_cannot_move_are_refused_with_a_reason(kind):
    model, _ = rope_model(kind)
    mover = mover_of(model)
    assert not mover.movable and mover.reason
    expected = {"dynamic": "dynamic", "absolute": "absolute"}[kind]
    assert expected in mover.reason
    assert mover.shift is not None
    from spanctx.cache.span_kv import SpanKV

    kv = SpanKV((torch.zeros(1, 1, 2, 4),), (torch.zeros(1, 1, 2, 4),))
    assert mover.shift(kv, 0) is kv
    with pytest.raises(ValueError, match="cannot move"):
        mover.shift(kv, 3)


def test_the_probe_refuses_frequencies_that_do_not_match_the_model(monkeypatch):
    model, _ = rope_model("per-layer")
    right, reason = rope._layer_inv_freq(model)
    assert reason is None
    swapped = tuple(right[1:] + right[:1])  # each layer gets its neighbour's rope
    monkeypatch.setattr(rope, "_layer_inv_freq", lambda m: (swapped, None))
    mover = mover_of(model)
    assert not mover.movable and "unknown rope layout" in mover.reason


def test_per_token_deltas_equal_one_rotation_per_span():
    keys = torch.randn(1, 2, 7, 16)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8) / 8))
    per_token = torch.tensor([0, 0, 3, 3, 3, -5, -5])
    expected = torch.cat([keys[:, :, :2], rotate_keys(keys[:, :, 2:5], 3, inv_freq),
                          rotate_keys(keys[:, :, 5:], -5, inv_freq)], dim=2)
    torch.testing.assert_close(rotate_keys(keys, per_token, inv_freq), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["default", "partial", "per-layer"])
@pytest.mark.parametrize("stacked", [True, False])
def test_shift_into_writes_what_shift_returns(kind, stacked):
    """A stored span (``kv.extract``: its keys stacked) rotated straight into a slice of
    buffers (stacked or per layer) equals ``shift``'s moved copy; nothing else is written."""
    from spanctx.cache.kv import as_cache, extract
    from spanctx.engine.slots import KVBuffers

    model, _ = rope_model(kind)
    mover = mover_of(model)
    layers = _span_kv(model, [1, 2, 3], list(range(10, 19)), 0)
    span = extract(as_cache(SpanKV(tuple(k for k, _ in layers), tuple(v for _, v in layers))), 2, 7)
    assert span.stacked_keys is not None
    layout = [(k.shape[1], k.shape[-1]) for k, _ in layers]
    buffers = KVBuffers(layout, max_tokens=16, dtype=span.keys[0].dtype, device=torch.device("cpu"))
    out_stacked = buffers.stacked_keys[..., 4:9, :] if stacked else None
    mover.shift_into(span, 13, [k[:, :, 4:9] for k in buffers.keys], out_stacked)
    for got, want in zip(buffers.keys, mover.shift(span, 13).keys):
        torch.testing.assert_close(got[:, :, 4:9], want, atol=0, rtol=0)
        assert not got[:, :, :4].any() and not got[:, :, 9:].any()
