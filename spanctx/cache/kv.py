"""The one module that talks to transformers' Cache objects.

Layout everywhere: keys and values ``[B, H_kv, S, D]`` per layer, keys after RoPE.
Caches built here are plain ``DynamicCache``s of full ``DynamicLayer``s, also for
sliding-window models: the store keeps whole spans, and transformers' sliding masks
follow positions, so a full layer gives the same attention as a truncated one (the
tests check this on Mistral- and Gemma2-style models).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import attrs
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .rope import KeyMover
from .span_kv import SpanKV


@attrs.frozen(eq=False)
class KVSlice:
    """Tokens ``[start, end)`` of a stored span (relative to the span), laid ``moved_by``
    positions from where they were computed: their keys are rotated by ``mover`` where
    they are laid (``laid``; the static executor rotates them straight into its buffers),
    so a placed parallel member is never copied twice."""

    kv: SpanKV
    start: int
    end: int
    moved_by: int = 0
    mover: KeyMover | None = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.moved_by and self.mover is None:
            raise ValueError("a moved slice needs the model's key mover")

    @classmethod
    def whole(cls, kv: SpanKV) -> KVSlice:
        return cls(kv, 0, kv.num_tokens)

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    def laid(self) -> SpanKV:
        """The slice as laid: views of the stored tensors, or moved keys (new tensors)."""
        kv = take(self.kv, self.start, self.end)
        return self.mover.shift(kv, self.moved_by) if self.moved_by else kv


def empty_cache() -> DynamicCache:
    return DynamicCache()


def assemble(pieces: Sequence[KVSlice]) -> DynamicCache:
    """A fresh cache holding ``pieces`` one after the other along the sequence.

    The result owns new tensors (one ``torch.cat`` per layer): nothing it does later
    can change a stored span.
    """
    cache = DynamicCache()
    if not pieces:
        return cache
    pieces = [KVSlice.whole(p.laid()) if p.moved_by else p for p in pieces]
    num_layers = len(pieces[0].kv.keys)
    for layer_idx in range(num_layers):
        # k, v: [1, H_kv, sum(S_i), D]
        k = torch.cat([p.kv.keys[layer_idx][:, :, p.start : p.end] for p in pieces], dim=-2)
        v = torch.cat([p.kv.values[layer_idx][:, :, p.start : p.end] for p in pieces], dim=-2)
        cache.layers.append(_full_layer(k, v))
    return cache


def take(kv: SpanKV, start: int, end: int) -> SpanKV:
    """Tokens ``[start, end)`` of ``kv`` as views (no copy): read them, never write them."""
    stacked = None if kv.stacked_keys is None else kv.stacked_keys[..., start:end, :]
    return SpanKV(tuple(k[:, :, start:end] for k in kv.keys), tuple(v[:, :, start:end] for v in kv.values), stacked)


def cut(pieces: Sequence[KVSlice], end: int) -> list[KVSlice]:
    """The first ``end`` tokens of ``pieces`` (laid one after the other), as slices."""
    out, start = [], 0
    for piece in pieces:
        if start >= end:
            break
        n = min(piece.num_tokens, end - start)
        out.append(attrs.evolve(piece, end=piece.start + n))
        start += n
    if start < end:
        raise ValueError(f"pieces cover {start} tokens, asked for {end}")
    return out


def move_tail_into(cache: DynamicCache, start: int, slots: torch.Tensor) -> None:
    """In every layer that grew past ``start`` (by ``len(slots)`` entries), write those
    entries into ``slots`` and drop them, so the cache is ``start`` long again.

    The cache's tensors are written in place: only pass a cache built here (fresh).
    """
    for layer in cache.layers:
        grown = layer.keys.shape[-2] - start
        if grown == 0:
            continue
        if grown != slots.numel():
            raise ValueError(f"layer grew by {grown} entries, got {slots.numel()} slots")
        layer.keys.index_copy_(-2, slots, layer.keys[:, :, start:].clone())
        layer.values.index_copy_(-2, slots, layer.values[:, :, start:].clone())
        layer.crop(-grown)


def _full_layer(keys: torch.Tensor, values: torch.Tensor) -> DynamicLayer:
    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


def repeat_batch(cache: DynamicCache, batch_size: int, length: int | None = None) -> DynamicCache:
    """A new cache holding the first ``length`` tokens (default: all) of ``cache``'s one
    sequence ``batch_size`` times: ``[B, H_kv, length, D]``.

    The layers are expanded views of ``cache``; the model's first update concatenates, so
    neither cache changes the other.
    """
    out = DynamicCache()
    for layer in cache.layers:
        if layer.keys.shape[0] != 1:
            raise ValueError(f"repeat_batch expects a batch of one, got {layer.keys.shape[0]}")
        keys, values = layer.keys[:, :, :length], layer.values[:, :, :length]
        out.layers.append(_full_layer(keys.expand(batch_size, *keys.shape[1:]),
                                      values.expand(batch_size, *values.shape[1:])))
    return out


def stack_left_padded(caches: Sequence[DynamicCache], keep: Sequence[int], length: int) -> DynamicCache:
    """A batch cache of ``length`` slots: row ``i`` holds the first ``keep[i]`` tokens of
    ``caches[i]`` (a batch of one) at its right end, after ``length - keep[i]`` zero slots
    (padding, which the attention mask must hide). Fresh tensors: the inputs never change.
    A row that keeps nothing may have an empty cache.
    """
    out = DynamicCache()
    kept = [(row, cache) for row, (cache, n) in enumerate(zip(caches, keep)) if n]
    if length == 0 or not kept:
        return out
    for layer_idx, layer in enumerate(kept[0][1].layers):
        # k, v: [B, H_kv, length, D]
        k = layer.keys.new_zeros((len(caches), layer.keys.shape[1], length, layer.keys.shape[-1]))
        v = layer.values.new_zeros((len(caches), layer.values.shape[1], length, layer.values.shape[-1]))
        for row, cache in kept:
            n = keep[row]
            k[row, :, length - n :] = cache.layers[layer_idx].keys[0, :, :n]
            v[row, :, length - n :] = cache.layers[layer_idx].values[0, :, :n]
        out.layers.append(_full_layer(k, v))
    return out


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def extract(cache: DynamicCache, start: int, end: int, row: int = 0) -> SpanKV:
    """Copy slots ``[start, end)`` of batch row ``row`` of every layer of ``cache`` into a
    new ``SpanKV``."""
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            raise RuntimeError("spanctx caches use full layers; got a sliding layer")
    parts = [layer.keys[row : row + 1, :, start:end] for layer in cache.layers]
    parts += [layer.values[row : row + 1, :, start:end] for layer in cache.layers]
    layers = len(cache.layers)
    if len({(p.shape, p.dtype) for p in parts}) == 1:  # one copy for every layer (one launch, not 2 per layer)
        stacked = torch.stack(parts)
        copies = stacked.unbind(0)
        return SpanKV(tuple(copies[:layers]), tuple(copies[layers:]), stacked[:layers])
    copies = tuple(p.clone() for p in parts)
    return SpanKV(tuple(copies[:layers]), tuple(copies[layers:]))


def as_cache(kv: SpanKV) -> DynamicCache:
    """``kv`` as a ``DynamicCache`` of views (no copy): to read spans out of it."""
    cache = DynamicCache()
    cache.layers.extend(_full_layer(k, v) for k, v in zip(kv.keys, kv.values))
    return cache


def as_slices(cache: DynamicCache) -> SpanKV:
    """The whole of ``cache`` as a ``SpanKV`` view (no copy): for re-assembling."""
    return SpanKV(
        tuple(layer.keys for layer in cache.layers),
        tuple(layer.values for layer in cache.layers),
    )


class StopForward(Exception):
    """Raised from a cache update to end a forward early (see ``stop_after_layer``)."""


@contextlib.contextmanager
def stop_after_layer(cache: DynamicCache, layer_idx: int) -> Iterator[None]:
    """Within the block, a forward over ``cache`` raises ``StopForward`` as soon as a layer
    past ``layer_idx`` writes to it: layers ``0..layer_idx`` have run and grown the cache,
    later ones have not. Catch ``StopForward`` around the forward."""
    update = cache.update

    def guarded_update(key_states, value_states, idx, *args, **kwargs):
        if idx > layer_idx:
            raise StopForward
        return update(key_states, value_states, idx, *args, **kwargs)

    cache.update = guarded_update
    try:
        yield
    finally:
        del cache.update


def layer_kv(cache: DynamicCache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[B, H_kv, S, D]`` of one layer of ``cache`` (views: read only)."""
    layer = cache.layers[layer_idx]
    return layer.keys, layer.values


def layout(kv: SpanKV) -> tuple[tuple[int, int, str], ...]:
    """Per layer (H_kv, D, dtype): what must match between a span and a model."""
    return tuple((k.shape[1], k.shape[-1], str(k.dtype)) for k in kv.keys)
