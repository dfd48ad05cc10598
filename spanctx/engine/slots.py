"""Fixed-address KV buffers, the HF cache that writes into them, and attention over them.

Slots. Each layer's keys and values live in one buffer ``[max_batch, H_kv, max_tokens, D]``
allocated once; a token's slot is its index along the sequence axis. Rows are aligned
at the right like a left-padded HF batch: row ``b``'s prompt token ``i`` sits in slot
``i`` of the padded prompt, its first real slot is ``row_start[b]``, and its RoPE
position is ``slot - row_start[b]`` (so slot and position are one number for an
unpadded row, as everywhere in spanctx).

One model call ("step") writes ``Tb`` new tokens at the slots ``slots[0..Tb)`` (shared
by every row) and attends over the first ``Lb`` slots; ``Tb`` and ``Lb`` are the call's
bucket, fixed per captured graph. Every piece of per-call state the step reads is a
device tensor at a fixed address (ids, positions, slots, row starts), so a captured graph
replays any call of its bucket.

Masks. One additive mask ``[B, 1, M, Lb]`` per attention window of the model (``None``
for full attention): a query in slot ``s`` of row ``b`` sees slot ``j`` iff ``row_start[b]
<= j <= s`` (and ``j > s - window`` in a sliding layer, transformers' rule). Hidden
entries hold the dtype's most negative value, as HF's own masks do. For the split
attention the query rows are folded per KV head (``M = g * Tb`` for ``g`` query heads per
KV head; row ``i * Tb + t`` is the group's ``i``-th query head at token ``t``); for HF's own
attention functions they are not (``M = Tb``).

Attention. ``slot_attention`` is registered with transformers as ``ATTENTION_NAME``;
``attention_switched`` points the model at it during the executor's calls, and the step
passes its ``StepAttention`` as the model kwarg ``STEP_KWARG``, which transformers hands
down to every attention call. Mode ``"hf"`` calls the model's own attention function
(``own_attention``) with the step's mask: the arithmetic of an eager HF call. Mode
``"split"`` runs ``spanctx.attention.split_attention``.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence

import attrs
import torch
from transformers import AttentionInterface, Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..cache.kv import KVSlice
from .attention import split_attention

__all__ = [
    "ATTENTION_NAME",
    "KVBuffers",
    "SlotCache",
    "StepAttention",
    "attention_switched",
    "own_attention",
    "slot_attention",
    "step_masks",
]

ATTENTION_NAME = "spanctx_slots"
STEP_KWARG = "spanctx_step"


@attrs.frozen(eq=False)
class Placed:
    """Tokens ``[start, end)`` of a stored span that sit in a buffer row from ``slot`` on."""

    span: weakref.ref  # to the SpanKV: identity is what counts (stored spans never change)
    start: int
    end: int
    slot: int

    @property
    def slot_end(self) -> int:
        return self.slot + self.end - self.start

    def same(self, other: Placed) -> bool:
        return self.span() is other.span() is not None and (self.start, self.end, self.slot) == (
            other.start, other.end, other.slot)


class KVBuffers:
    """Per-layer key and value buffers ``[max_batch, H_kv, max_tokens, D]``, allocated once.

    ``layout``: per layer ``(H_kv, D)``. ``place`` copies stored slices straight into a
    row. A row remembers which slices it holds where, so placing a slice again at the
    same slots copies nothing; a write over a slot (``overwrite``) forgets what was there.
    """

    def __init__(self, layout: Sequence[tuple[int, int]], *, max_batch: int, max_tokens: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.max_batch, self.max_tokens = max_batch, max_tokens
        self.keys = tuple(torch.zeros(max_batch, h, max_tokens, d, dtype=dtype, device=device) for h, d in layout)
        self.values = tuple(torch.zeros_like(k) for k in self.keys)
        self._resident: list[list[Placed]] = [[] for _ in range(max_batch)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def place(self, row: int, pieces: Sequence[KVSlice], end: int) -> int:
        """Lay ``pieces`` one after the other in ``row`` so that they end at slot ``end``.
        Returns how many tokens were copied (slices already in place are skipped)."""
        total = sum(p.num_tokens for p in pieces)
        if total > end:
            raise ValueError(f"a prefix of {total} tokens does not fit before slot {end}")
        slot, copied = end - total, 0
        targets, sources = [], []
        for piece in pieces:
            here = Placed(weakref.ref(piece.kv), piece.start, piece.end, slot)
            if not any(here.same(p) for p in self._resident[row]):
                for buffers, stored in ((self.keys, piece.kv.keys), (self.values, piece.kv.values)):
                    targets += [b[row, :, slot:here.slot_end] for b in buffers]
                    sources += [t[0, :, piece.start:piece.end] for t in stored]
                self.overwrite(row, slot, here.slot_end)
                self._resident[row].append(here)
                copied += piece.num_tokens
            slot = here.slot_end
        if targets:
            torch._foreach_copy_(targets, sources)  # one launch for every layer's keys and values
        return copied

    def overwrite(self, row: int, start: int, end: int) -> None:
        """Slots ``[start, end)`` of ``row`` are (about to be) written: forget what they held."""
        self._resident[row] = [p for p in self._resident[row] if p.slot_end <= start or p.slot >= end]

    def views(self, batch: int, length: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Per layer, keys and values ``[batch, H_kv, length, D]``: views of the buffers."""
        return (tuple(k[:batch, :, :length] for k in self.keys), tuple(v[:batch, :, :length] for v in self.values))


class SlotCache(Cache):
    """A transformers ``Cache`` over buffer views: layer ``i``'s update writes the new
    keys and values ``[B, H_kv, Tb, D]`` at ``slots`` (a ``[Tb]`` device tensor) and
    returns the whole views ``[B, H_kv, Lb, D]``. Positions come from the caller
    (``position_ids``), never from the cache, so it has no sequence length to report."""

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], slots: torch.Tensor) -> None:
        super().__init__(layers=[])
        self.key_views, self.value_views, self.slots = tuple(keys), tuple(values), slots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.key_views[layer_idx], self.value_views[layer_idx]
        keys.index_copy_(2, self.slots, key_states)
        values.index_copy_(2, self.slots, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError("a SlotCache has no sequence length: pass position_ids to the model")

    @property
    def is_compileable(self) -> bool:
        return True


@attrs.frozen(eq=False)
class StepAttention:
    """What ``slot_attention`` needs in one step (see the module docstring)."""

    mode: str  # "hf" or "split"
    masks: Mapping[int | None, torch.Tensor]  # additive masks [B, 1, M, Lb] per window
    chunks: int  # split: pieces of the Lb slots attended in parallel
    original: Callable  # hf: the model's own attention function

    def mask(self, window: int | None) -> torch.Tensor:
        try:
            return self.masks[window]
        except KeyError:
            raise RuntimeError(f"no mask for sliding window {window}: the executor read the model's windows "
                               f"as {sorted(self.masks, key=str)}") from None


def step_masks(slots: torch.Tensor, row_start: torch.Tensor, length: int, windows: Sequence[int | None], *,
               fold: int, dtype: torch.dtype) -> dict[int | None, torch.Tensor]:
    """Additive masks ``[B, 1, fold * Tb, length]`` per window, from ``slots [Tb]`` and
    ``row_start [B]`` (device tensors: this runs inside a captured graph)."""
    j = torch.arange(length, device=slots.device)
    query_slot = slots[None, :, None]  # [1, Tb, 1]
    causal = (j >= row_start[:, None, None]) & (j <= query_slot)  # [B, Tb, Lb]
    lowest = torch.finfo(dtype).min
    out = {}
    for window in windows:
        visible = causal if window is None else causal & (j > query_slot - window)
        additive = torch.zeros(visible.shape, dtype=dtype, device=slots.device).masked_fill_(~visible, lowest)
        B, T, L = additive.shape
        out[window] = additive[:, None].expand(B, fold, T, L).reshape(B, 1, fold * T, L)
    return out


def slot_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   **kwargs) -> tuple[torch.Tensor, None]:
    """A transformers attention function over a ``SlotCache``: query ``[B, Hq, Tb, D]``,
    key/value ``[B, H_kv, Lb, D]``; returns ``([B, Tb, Hq, D], None)``."""
    step: StepAttention = kwargs.pop(STEP_KWARG)
    window = kwargs.get("sliding_window")
    if step.mode == "hf":
        return step.original(module, query, key, value, step.mask(window), scaling=scaling, dropout=dropout,
                             **kwargs)
    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise RuntimeError(f"{step.mode} attention computes plain softmax attention; got {name}")
    B, Hq, T, D = query.shape
    H = key.shape[1]
    folded = query.reshape(B, H, (Hq // H) * T, D)  # query head h = k * (Hq // H) + i uses KV head k
    out = split_attention(folded, key, value, step.mask(window), scaling, step.chunks)
    return out.reshape(B, Hq, T, D).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, slot_attention)


@contextlib.contextmanager
def attention_switched(model) -> Iterator[None]:
    """Within the block, the model's attention modules call ``spanctx.slots``' function."""
    config = model.config
    own = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = own


def own_attention(model) -> Callable:
    """The attention function the model uses outside the executor's calls."""
    own = model.config._attn_implementation
    eager = None
    for cls in type(model).__mro__:
        eager = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if eager is not None:
            break
    if own == "eager":
        if eager is None:
            raise TypeError(f"{type(model).__name__}: no eager_attention_forward in its modeling module")
        return eager
    return ALL_ATTENTION_FUNCTIONS.get_interface(own, eager)
