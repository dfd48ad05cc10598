"""The shape of a static call: buckets, rows and padding, and the model's KV layout.

Pure helpers and values of ``static``: how many step tokens a call's bucket has (its
attention slots: ``static_warmup``), how the rows of a call are packed into the one
buffer row (``pack``), what a call returns (``ForwardOutput``, ``GenerateOutput``,
``ExecStats``), and what the model's cache looks like (read off a one-token forward).

Packing. A call's rows share one row of KV buffers. The leading stored slices that every
row has (the same tensors, the same tokens: a context checked against N requirements,
a batch over one document) are laid once at slots ``[0, P)``; after them each row gets a
segment of its own for the rest of its prompt (its own stored slices, then its tail);
new tokens follow every segment, one slot per row and step. Attention follows owners,
not slot order (``slots.step_masks``): a token sees the shared slots and its own row's,
at positions up to its own. A single row is the plain case: slot = position.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from ..cache import kv as kvops
from ..cache.span_kv import SpanKV
from ..hf import cache_kwargs
from . import attention as kernels
from .static_lora import AdapterState

__all__ = ["ATTENTION_MODES", "GRAPH_TOKENS", "MAX_ROWS", "SLOT_GRANULE", "Bucket", "ExecStats", "ForwardOutput",
           "GenerateOutput", "Packing", "Row", "StepInputs", "attention_mode", "keep_bucket", "model_reason", "pack", "probe_layout",
           "rows_bucket", "suffix_bucket"]

SLOT_GRANULE = 256  # attention lengths are multiples of this (split pieces stay multiples of 16)
# longer tails run unpadded and without a graph (arithmetic-bound: 2K tokens are ~32 TFLOP on
# an 8B model, ~50 ms on an H200, against ~45 ms of eager launches); the packed rows of 16
# checks (~85 tokens each) fit under it
GRAPH_TOKENS = 2048
MAX_ROWS = 64  # rows of one call
HOST_ROPE = {"dynamic": "dynamic NTK", "longrope": "longrope"}  # rope types that read lengths on the host


def keep_bucket(keep: int) -> int:
    """Logit rows a tail step returns for ``keep`` wanted: 1, else at least ``MAX_ROWS``
    (a power of two), so that calls of any number of rows (N checks, a batch's prompts)
    share their buckets; the extra rows repeat the first and are dropped."""
    return 1 if keep == 1 else max(MAX_ROWS, 1 << (keep - 1).bit_length())


def rows_bucket(rows: int) -> int:
    """Tokens of a decode step of ``rows`` rows: the next power of two, so that batches of
    3 and 4 rows share their steps (the extra tokens belong to no row)."""
    return 1 << (rows - 1).bit_length()


def suffix_bucket(tokens: int) -> int:
    """Padded length of a step of ``tokens`` new tokens: 1 for decode, else the next power
    of two, at least 16."""
    return 1 if tokens == 1 else max(16, 1 << (tokens - 1).bit_length())


def probe_layout(model) -> tuple[list[tuple[int, int]], torch.dtype]:
    """Per layer (H_kv, D), and the KV dtype, read off a one-token forward."""
    with torch.inference_mode():
        cache = kvops.empty_cache()
        ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        kv = kvops.as_slices(cache)
    return [(k.shape[1], k.shape[-1]) for k in kv.keys], kv.keys[0].dtype


def model_reason(text, graphs: bool) -> str | None:
    """Why this model cannot run here at all (None when it can)."""
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    kinds = {rope.get("rope_type")} if "rope_type" in rope else {p.get("rope_type") for p in rope.values()
                                                                 if isinstance(p, dict)}
    host = sorted(HOST_ROPE[k] for k in kinds if k in HOST_ROPE)
    if graphs and host:
        return f"{', '.join(host)} RoPE recomputes its frequencies from the length on the host: no CUDA graph"
    return None


@attrs.frozen(eq=False)
class Row:
    """One prompt of a static call: its ids ``[S]`` on the device and the stored KV of its
    first ``start`` tokens (slices laid one after the other). ``alora_offset``: with an
    aLoRA switched on, how many of the prompt's last tokens it adapts (PEFT's
    ``alora_offsets``; None: none). Tail tokens among them run with the adapter; the
    prefix is taken as given (a stored invocation span holds adapted KV)."""

    input_ids: torch.Tensor
    prefix: Sequence[kvops.KVSlice] = ()
    start: int = 0
    alora_offset: int | None = None

    def __attrs_post_init__(self) -> None:
        prompt = self.input_ids.shape[-1]
        if self.input_ids.dim() != 1:
            raise ValueError(f"a row's input_ids are [S], got {list(self.input_ids.shape)}")
        if not 0 <= self.start < prompt:
            raise ValueError(f"start must leave at least one of the {prompt} prompt tokens to run, got {self.start}")
        covered = sum(p.num_tokens for p in self.prefix)
        if covered != self.start:
            raise ValueError(f"the prefix covers {covered} tokens, the row starts its tail at {self.start}")
        if self.alora_offset is not None and not 0 < self.alora_offset <= prompt:
            raise ValueError(f"an aLoRA offset of {self.alora_offset} puts the invocation outside the {prompt}-token "
                             "prompt")

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[-1]


@attrs.frozen
class Packing:
    """Where a call's rows sit in the buffer row (see the module docstring)."""

    shared: tuple[kvops.KVSlice, ...]  # laid at [0, shared_tokens), seen by every row
    shared_tokens: int
    bases: tuple[int, ...]  # row r's position p >= shared_tokens is at slot bases[r] + p - shared_tokens
    lengths: tuple[int, ...]  # prompt tokens per row
    starts: tuple[int, ...]  # tail start per row

    @property
    def rows(self) -> int:
        return len(self.bases)

    @property
    def decode_slot(self) -> int:
        """The first slot after every row's prompt: new tokens go from here."""
        return self.bases[-1] + self.lengths[-1] - self.shared_tokens

    @property
    def tail_tokens(self) -> int:
        return sum(n - s for n, s in zip(self.lengths, self.starts))

    def slot(self, row: int, position: int) -> int:
        if position < self.shared_tokens:
            return position
        return self.bases[row] + position - self.shared_tokens

    def tail_step(self, padded: int, free: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per token of the tail step padded to ``padded`` tokens (rows in order): its slot,
        position and row; the padding takes free slots after the prompts, row ``free``."""
        slots, positions, who = [], [], []
        for r, (n, start) in enumerate(zip(self.lengths, self.starts)):
            first = self.slot(r, start)
            slots.append(torch.arange(first, first + n - start))
            positions.append(torch.arange(start, n))
            who.append(torch.full((n - start,), r))
        pad = padded - self.tail_tokens
        slots.append(torch.arange(self.decode_slot, self.decode_slot + pad))
        positions.append(torch.zeros(pad, dtype=torch.long))
        who.append(torch.full((pad,), free))
        return torch.cat(slots), torch.cat(positions), torch.cat(who)

    def slots_needed(self, new_tokens: int, padded_tail: int) -> int:
        """Slots of a call decoding ``new_tokens`` per row whose tail step is padded to
        ``padded_tail`` tokens (padding writes after the prompts, where decode writes)."""
        return self.decode_slot + max(self.rows * new_tokens, padded_tail - self.tail_tokens)


def pack(rows: Sequence[Row]) -> Packing:
    """The packing of ``rows``: their longest common run of leading slices is shared."""
    if not rows:
        raise ValueError("a call needs at least one row")
    shared: list[kvops.KVSlice] = []
    for pieces in zip(*(row.prefix for row in rows)):
        first = pieces[0]
        if any(p.kv is not first.kv or (p.start, p.end, p.moved_by) != (first.start, first.end, first.moved_by)
               for p in pieces[1:]):
            break
        shared.append(first)
    shared_tokens = sum(p.num_tokens for p in shared)
    bases, slot = [], shared_tokens
    for row in rows:
        bases.append(slot)
        slot += row.num_tokens - shared_tokens
    return Packing(tuple(shared), shared_tokens, tuple(bases), tuple(r.num_tokens for r in rows),
                   tuple(r.start for r in rows))


@attrs.frozen(eq=False)
class StepInputs:
    """One step's tokens, padded to a bucket: ids, positions, slots and rows ``[T]``
    (``slots.NO_ROW``: padding), and which step tokens' logits it keeps ``[K]``."""

    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    rows: torch.Tensor
    keep: torch.Tensor


@attrs.frozen
class Bucket:
    """The key of one captured step."""

    tokens: int  # step tokens (padded)
    length: int  # attention slots
    keep: int  # logits rows returned
    adapters: AdapterState | None  # what the LoRA layers run (None: the base model)


@attrs.frozen
class ExecStats:
    """What one call of the static executor ran and paid."""

    path: str  # "graph": replayed CUDA graphs; "eager": plain forwards on the buffers
    compiled: bool  # the model ran through torch.compile
    attention: str  # "split" or "hf" (see spanctx.slots)
    rows: int  # prompts packed into the call
    shared_tokens: int  # prefix tokens laid once for every row
    suffix_bucket: int  # the tail step's padded length
    cache_bucket: int  # attention slots of every step
    copied_tokens: int  # prefix tokens copied into the buffers (0: already in place)
    steps: int  # model steps run (the tail, then one per generated token after the first)
    builds: int  # buckets captured (or compiled) by this call
    build_s: float  # seconds this call spent capturing and compiling


@attrs.frozen(eq=False)
class ForwardOutput:
    """``logits`` ``[R, keep, V]`` of each row's last ``keep`` tokens (a copy; with
    ``keep=0`` ``[R, T, V]``: row ``r``'s tail tokens first, zeros after); ``kv`` the buffer
    row's keys and values (views, valid until the next call) with ``packing`` saying where
    each row's tokens are."""

    logits: torch.Tensor
    kv: SpanKV
    packing: Packing
    stats: ExecStats


@attrs.frozen(eq=False)
class GenerateOutput:
    """``sequences`` ``[R, W + N]``: the prompts left-padded to the longest ``W``, then
    ``N <= max_new_tokens`` new tokens per row; with ``output_scores`` / ``output_logits``
    each step's ``[R, V]``; ``kv`` and ``packing`` as in ``ForwardOutput``."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None
    logits: tuple[torch.Tensor, ...] | None
    kv: SpanKV
    packing: Packing
    stats: ExecStats


ATTENTION_MODES = ("auto", "split", "hf")


def attention_mode(model, attention: str, head_dim: int, dtype: torch.dtype) -> str:
    """The static executor's attention for ``model``: ``attention`` checked, or "auto"
    resolved ("split" on CUDA for an SDPA model where its kernel runs, else "hf")."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    own, device = model.config._attn_implementation, model.device
    softcap = getattr(model.config.get_text_config(), "attn_logit_softcapping", None) is not None
    if attention == "auto":
        if device.type != "cuda" or own != "sdpa" or softcap:
            return "hf"
        return "split" if kernels.works(device, dtype, head_dim) else "hf"
    if attention == "split":
        if own not in ("sdpa", "eager") or softcap:
            raise ValueError(f"{attention} attention computes plain softmax attention; this model's is {own!r}"
                             + (" with logit soft-capping" if softcap else ""))
        if not kernels.works(device, dtype, head_dim):
            raise ValueError(f"{attention} attention does not run (or disagrees) on {device} in {dtype}")
    return attention
