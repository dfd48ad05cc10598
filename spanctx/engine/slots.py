"""Fixed-address KV buffers, the HF cache that writes into them, and attention over them.

Slots. Each layer's keys and values live in one buffer ``[1, H_kv, max_tokens, D]``
allocated once; a token's slot is its index along the sequence axis. The rows of a call
are packed into it (``static_layout.pack``): slots shared by every row, then a segment per
row. Each slot has owners, the rows that see it as a bit set (int64: bit ``r`` for row
``r < 64``; ``OWNER_SHARED``: every row, ``OWNER_FREE``: none; ``row_bits``), and the RoPE
position of the token it holds; a single row's slot is its position. A slot may be seen by
some rows only: the lanes of a running batch (``lanes``) share a prefix that way.

One model call ("step") writes ``Tb`` new tokens at the slots ``slots[0..Tb)``, each
with its row (``who``) and position, and attends over the first ``Lb`` slots; ``Tb`` and
``Lb`` are the call's bucket, fixed per captured graph. Every piece of per-call state the
step reads is a device tensor at a fixed address (ids, positions, slots, owners), so a
captured graph replays any call of its bucket.

Masks. One additive mask ``[1, 1, M, Lb]`` per attention window of the model (``None``
for full attention): a step token of row ``r`` at position ``p`` sees slot ``j`` iff ``j``
is among ``r``'s (its owners have bit ``r``) and holds a position ``<= p`` (and ``> p -
window`` in a sliding layer, transformers' rule); a token always sees its own slot (padding
tokens, of row ``NO_ROW``, see that only). Hidden entries hold the dtype's most negative value, as HF's own masks do. For the
split attention the query rows are folded per KV head (``M = g * Tb`` for ``g`` query heads
per KV head; row ``i * Tb + t`` is the group's ``i``-th query head at token ``t``); for HF's
own attention functions they are not (``M = Tb``).

Attention. ``slot_attention`` is registered with transformers as ``ATTENTION_NAME``;
``attention_switched`` points the model at it during a step's forward, on the calling
thread only (the config's own value is never written: eager calls on other threads and
callbacks between steps see the model as it is), and the step
passes its ``StepAttention`` as the model kwarg ``STEP_KWARG``, which transformers hands
down to every attention call. Mode ``"hf"`` calls the model's own attention function
(``own_attention``) with the step's mask: the arithmetic of an eager HF call. Mode
``"split"`` runs ``spanctx.attention.split_attention``.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence

import attrs
import torch
from transformers import AttentionInterface, Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..cache.kv import KVSlice, take
from .attention import split_attention

__all__ = [
    "ATTENTION_NAME",
    "NO_ROW",
    "OWNER_FREE",
    "OWNER_SHARED",
    "KVBuffers",
    "SlotCache",
    "StepAttention",
    "attention_switched",
    "own_attention",
    "row_bits",
    "slot_attention",
    "step_masks",
]

ATTENTION_NAME = "spanctx_slots"
STEP_KWARG = "spanctx_step"
OWNER_SHARED = -1  # a slot every row sees (every bit set)
OWNER_FREE = 0  # a slot no row sees (not written this call, or padding)
NO_ROW = -1  # the row of a padding step token (it owns no bit)


def row_bits(rows: torch.Tensor) -> torch.Tensor:
    """The owner bit of each row of ``rows`` (int64; 0 for ``NO_ROW``)."""
    return torch.bitwise_left_shift(torch.ones_like(rows), rows.clamp(min=0)) * (rows >= 0)


@attrs.frozen(eq=False)
class Placed:
    """Tokens ``[start, end)`` of a stored span that sit in a buffer row from ``slot`` on."""

    span: weakref.ref  # to the SpanKV: identity is what counts (stored spans never change)
    start: int
    end: int
    slot: int
    moved_by: int = 0

    @property
    def slot_end(self) -> int:
        return self.slot + self.end - self.start

    def same(self, other: Placed) -> bool:
        return self.span() is other.span() is not None and (self.start, self.end, self.slot, self.moved_by) == (
            other.start, other.end, other.slot, other.moved_by)


class KVBuffers:
    """Per-layer key and value buffers ``[1, H_kv, max_tokens, D]``, allocated once.

    ``layout``: per layer ``(H_kv, D)``. ``place`` copies stored slices straight into the
    buffers. The buffers remember which slices they hold where, so placing a slice again
    at the same slots copies nothing; a write over a slot (``overwrite``) forgets what was
    there.
    """

    def __init__(self, layout: Sequence[tuple[int, int]], *, max_tokens: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.max_tokens = max_tokens
        self.stacked_keys = None  # [L, 1, H_kv, max_tokens, D] when every layer has one shape
        if len(set(layout)) == 1:
            (h, d), = set(layout)
            self.stacked_keys = torch.zeros(len(layout), 1, h, max_tokens, d, dtype=dtype, device=device)
            self.keys = tuple(self.stacked_keys.unbind(0))
        else:
            self.keys = tuple(torch.zeros(1, h, max_tokens, d, dtype=dtype, device=device) for h, d in layout)
        self.values = tuple(torch.zeros_like(k) for k in self.keys)
        self._resident: list[Placed] = []

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def place(self, pieces: Sequence[KVSlice], slot: int) -> int:
        """Lay ``pieces`` one after the other from ``slot`` on. Returns how many tokens were
        copied (slices already in place are skipped). A moved slice's keys are rotated
        straight into the buffers."""
        total = sum(p.num_tokens for p in pieces)
        if slot + total > self.max_tokens:
            raise ValueError(f"a prefix of {total} tokens from slot {slot} does not fit in {self.max_tokens} slots")
        copied = 0
        targets, sources = [], []
        for piece in pieces:
            here = Placed(weakref.ref(piece.kv), piece.start, piece.end, slot, piece.moved_by)
            if not any(here.same(p) for p in self._resident):
                laid = ((self.values, piece.kv.values),)
                if piece.moved_by:
                    out = self.stacked_keys[..., slot:here.slot_end, :] if self.stacked_keys is not None else None
                    piece.mover.shift_into(take(piece.kv, piece.start, piece.end), piece.moved_by,
                                           [k[:, :, slot:here.slot_end] for k in self.keys], out)
                else:
                    laid += ((self.keys, piece.kv.keys),)
                for buffers, stored in laid:
                    targets += [b[0, :, slot:here.slot_end] for b in buffers]
                    sources += [t[0, :, piece.start:piece.end] for t in stored]
                self.overwrite(slot, here.slot_end)
                self._resident.append(here)
                copied += piece.num_tokens
            slot = here.slot_end
        if targets:
            torch._foreach_copy_(targets, sources)  # one launch for every layer's keys and values
        return copied

    def overwrite(self, start: int, end: int) -> None:
        """Slots ``[start, end)`` are (about to be) written: forget what they held."""
        self._resident = [p for p in self._resident if p.slot_end <= start or p.slot >= end]

    def views(self, length: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Per layer, keys and values ``[1, H_kv, length, D]``: views of the buffers."""
        return tuple(k[:, :, :length] for k in self.keys), tuple(v[:, :, :length] for v in self.values)


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


def step_masks(slots: torch.Tensor, who: torch.Tensor, positions: torch.Tensor, owners: torch.Tensor,
               slot_positions: torch.Tensor, length: int, windows: Sequence[int | None], *, fold: int,
               dtype: torch.dtype) -> dict[int | None, torch.Tensor]:
    """Additive masks ``[1, 1, fold * Tb, length]`` per window for step tokens at ``slots
    [Tb]`` of rows ``who [Tb]`` at ``positions [Tb]``, over slots whose owners and positions
    are ``owners`` / ``slot_positions`` (``[max_tokens]``; the step's own tokens are written
    into them first). Device tensors only: this runs inside a captured graph."""
    bits = row_bits(who)
    owners.index_copy_(0, slots, bits)
    slot_positions.index_copy_(0, slots, positions)
    j = torch.arange(length, device=slots.device)
    owner, key_position = owners[None, :length], slot_positions[None, :length]  # [1, Lb]
    query_position = positions[:, None]  # [Tb, 1]
    seen = ((owner & bits[:, None]) != 0) & (key_position <= query_position)
    seen |= j[None, :] == slots[:, None]  # [Tb, Lb]
    lowest = torch.finfo(dtype).min
    out = {}
    for window in windows:
        visible = seen if window is None else seen & (key_position > query_position - window)
        additive = torch.zeros(visible.shape, dtype=dtype, device=slots.device).masked_fill_(~visible, lowest)
        T, L = additive.shape
        out[window] = additive[None, None].expand(1, fold, T, L).reshape(1, 1, fold * T, L)
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


_switched = threading.local()  # .names: {id(config): attention name} for this thread's calls only


class _PerThreadAttention:
    """Mixed into a model's config class: ``_attn_implementation`` reads the calling
    thread's switch first (``attention_switched``), else the config's own value, which is
    never written. Other threads, and this one outside the block, see the model as it is."""

    @property
    def _attn_implementation(self):
        name = getattr(_switched, "names", {}).get(id(self))
        return name if name is not None else super()._attn_implementation

    @_attn_implementation.setter
    def _attn_implementation(self, value) -> None:
        _base_property(type(self)).__set__(self, value)

    def __reduce_ex__(self, protocol):
        """Pickled and copied as the plain config class (the mixin is a runtime detail)."""
        return _plain_config, (type(self).__mro__[2], self.__dict__)


def _plain_config(cls: type, state: dict):
    config = object.__new__(cls)
    config.__dict__.update(state)
    return config


def _base_property(cls: type) -> property:
    return next(k.__dict__["_attn_implementation"] for k in cls.__mro__[2:] if "_attn_implementation" in k.__dict__)


@functools.cache
def _per_thread_class(cls: type) -> type:
    return type(cls.__name__, (_PerThreadAttention, cls), {"__module__": cls.__module__})


def _per_thread(config) -> None:
    """Let ``config``'s attention implementation be switched per thread (once per config)."""
    if not isinstance(config, _PerThreadAttention):
        config.__class__ = _per_thread_class(type(config))


@contextlib.contextmanager
def attention_switched(model) -> Iterator[None]:
    """Within the block and on this thread only, the model's attention modules call
    ``spanctx.slots``' function. The config's own value is never written, so calls on
    other threads (the same model under an eager runtime) and overlapping blocks on other
    threads leave each other alone, and the model is as it was after every block."""
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}
    names = _switched.__dict__.setdefault("names", {})
    before = {key: names.get(key) for key in configs}
    for key, config in configs.items():
        _per_thread(config)
        names[key] = ATTENTION_NAME
    try:
        yield
    finally:
        for key, name in before.items():
            if name is None:
                names.pop(key, None)
            else:
                names[key] = name


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
