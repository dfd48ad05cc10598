"""The static executor: a request's final call and its decode loop on fixed KV buffers.

The eager executor hands transformers a fresh ``DynamicCache`` per call; every step then
pays Python and kernel launches, which on a GPU cost more than the arithmetic. This one
keeps one set of KV buffers for the life of the executor (``spanctx.slots``) and runs
each model step from fixed-address inputs, so a step can be captured once into a CUDA
graph and replayed for every later call of its bucket (``spanctx.graphs``).

A call: the stored spans covering ``[0, tail_start)`` are copied straight into the
buffers (one copy per slice; slices already in place from the previous call are not
copied again); one step runs the prompt's tail ``[tail_start, S)``, padded to its
suffix bucket (``suffix_bucket``); then one step per generated token. Every step
attends over the first ``cache_bucket(...)`` slots, chosen once per call to cover the
prompt, the new tokens and the padding. A graph is keyed by (rows, step tokens,
attention slots, logits kept): one capture (and, with ``compile=True``, one
``torch.compile`` of the model per new shape) serves every later call with that key;
``ExecStats`` says what a call paid. Padded step tokens write junk KV beyond the
prompt, in slots the masks hide and decode overwrites.

Exactness: with graphs off (CPU, fp32) the steps are ordinary transformers forwards with
an explicit mask; logits match a full prefill within float rounding.

Threading: calls must not overlap (the engine's lock serializes them): during a call the
model's attention implementation is switched to ``spanctx.slots``' function.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

import attrs
import torch
from transformers.generation.streamers import BaseStreamer

from . import kv as kvops
from .decoding import TokenChooser, unsupported_options
from .graphs import BuildStats, StepGraphs
from .options import CallOptions, seeded
from . import attention as kernels
from .slots import STEP_KWARG, KVBuffers, SlotCache, StepAttention, attention_switched, own_attention, step_masks
from .store import SpanKV

__all__ = ["ExecStats", "ForwardOutput", "GenerateOutput", "StaticExecutor", "cache_bucket", "suffix_bucket"]

SLOT_GRANULE = 256  # attention lengths are multiples of this (split pieces stay multiples of 16)
ATTENTION_MODES = ("auto", "flash", "split", "hf")
GRAPH_TOKENS = 512  # longer tails run without a graph (they are arithmetic-bound anyway)
HOST_ROPE = {"dynamic": "dynamic NTK", "longrope": "longrope"}  # rope types that read lengths on the host


def _cache_kwargs(model, cache) -> dict[str, object]:
    # TODO(hf.py): use spanctx.hf.cache_kwargs once it lands on main.
    import inspect

    names = inspect.signature(type(model).forward).parameters
    return {"cache" if "cache" in names else "past_key_values": cache}


def suffix_bucket(tokens: int) -> int:
    """Padded length of a step of ``tokens`` new tokens: 1 for decode, else the next power
    of two, at least 16."""
    return 1 if tokens == 1 else max(16, 1 << (tokens - 1).bit_length())


def cache_bucket(slots: int, granule: int = SLOT_GRANULE) -> int:
    """Attention length covering ``slots``: rounded up to a sixteenth of the largest power
    of two not above it (at most ~6% padding), and to a multiple of ``granule``."""
    step = max(granule, (1 << (max(slots, 1).bit_length() - 1)) // 16)
    return -(-slots // step) * step


@attrs.frozen
class Bucket:
    """The key of one captured step."""

    batch: int
    tokens: int  # step tokens (padded)
    length: int  # attention slots
    keep: int  # logits rows returned


@attrs.frozen
class ExecStats:
    """What one call of the static executor ran and paid."""

    path: str  # "graph": replayed CUDA graphs; "eager": plain forwards on the buffers
    compiled: bool  # the model ran through torch.compile
    attention: str  # "split" or "hf" (see spanctx.slots)
    suffix_bucket: int  # the tail step's padded length
    cache_bucket: int  # attention slots of every step
    copied_tokens: int  # prefix tokens copied into the buffers (0: already in place)
    steps: int  # model steps run (the tail, then one per generated token after the first)
    builds: int  # buckets captured (or compiled) by this call
    build_s: float  # seconds this call spent capturing and compiling


@attrs.frozen(eq=False)
class ForwardOutput:
    logits: torch.Tensor  # [B, logits_to_keep, V] for the prompt's last tokens (a copy)
    prompt_kv: SpanKV  # per layer [B, H_kv, S, D]: views of the buffers, valid until the next call
    stats: ExecStats


@attrs.frozen(eq=False)
class GenerateOutput:
    sequences: torch.Tensor  # [B, S + N]: the prompt, then N <= max_new_tokens new tokens
    prompt_kv: SpanKV  # per layer [B, H_kv, S, D]: views of the buffers, valid until the next call
    stats: ExecStats


@attrs.frozen(eq=False)
class _Call:
    batch: int
    prompt_tokens: int
    tail_start: int
    tail_bucket: int
    length: int
    copied: int
    builds_before: BuildStats


class StaticExecutor:
    """Runs a request's final call and its decode loop on fixed-address KV buffers.

    ``max_tokens`` slots per row (prompt + new tokens) and ``max_batch`` rows are
    allocated at once (``memory_bytes``). ``graphs`` (default: on when the model is on
    CUDA) captures each bucket's step in a CUDA graph; ``compile`` runs the model through
    ``torch.compile`` first (fused kernels; the first call of a new shape compiles).
    ``attention`` (see ``spanctx.attention``): "flash" (flash attention over each row's
    used slots, CUDA and 16-bit), "split" (split-KV attention under a mask), both for
    models whose attention is plain softmax (SDPA or eager, no soft-capping); "hf" (the
    model's own attention function with the executor's masks); "auto": the first of
    flash, split that runs here on CUDA for an SDPA model, else hf. ``chunks`` fixes the
    split's piece count (default: enough pieces to fill the GPU).
    """

    def __init__(self, model, *, max_tokens: int, max_batch: int = 1, graphs: bool | None = None,
                 compile: bool = False, attention: str = "auto", chunks: int | None = None) -> None:
        self.model = model
        self.device = model.device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {self.device}")
        if max_tokens < 2 or max_batch < 1:
            raise ValueError(f"need max_tokens >= 2 and max_batch >= 1, got {max_tokens} and {max_batch}")
        self.compiled = compile
        text = model.config.get_text_config()
        layout, self.dtype = _probe_layout(model)
        self.max_tokens = -(-max_tokens // SLOT_GRANULE) * SLOT_GRANULE
        self.buffers = KVBuffers(layout, max_batch=max_batch, max_tokens=self.max_tokens, dtype=self.dtype,
                                 device=self.device)
        window = getattr(text, "sliding_window", None)
        self.windows = (None,) if window is None else (None, window)
        self.kv_heads = layout[0][0]
        self.attention = self._attention_mode(attention, text, layout[0][1])
        self._group = text.num_attention_heads // self.kv_heads if self.attention == "split" else 1
        self._chunks = chunks
        self._own_attention = own_attention(model)
        self._model_reason = _model_reason(text, self.graphs)
        self._sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.graphs else 0
        ints = dict(dtype=torch.long, device=self.device)
        self._ids = torch.zeros(max_batch, self.max_tokens, **ints)
        self._pos = torch.zeros(max_batch, self.max_tokens, **ints)
        self._slots = torch.zeros(self.max_tokens, **ints)
        self._keep = torch.zeros(self.max_tokens, **ints)
        self._row_start = torch.zeros(max_batch, **ints)
        self._no_mask = torch.zeros(1, 1, 1, 1, dtype=self.dtype, device=self.device)
        self._caches: dict[Bucket, SlotCache] = {}
        self._forward = torch.compile(model) if compile else model
        self._steps = StepGraphs(self._step, graphs=self.graphs, warmup=2 if compile else 1)
        self._lock = threading.Lock()

    @property
    def memory_bytes(self) -> int:
        """GPU (or CPU) memory of the KV buffers and the step inputs."""
        inputs = (self._ids, self._pos, self._slots, self._keep, self._row_start)
        return self.buffers.nbytes + sum(t.numel() * t.element_size() for t in inputs)

    @property
    def build_stats(self) -> BuildStats:
        """Buckets built so far and the seconds spent building them."""
        return self._steps.stats

    def unsupported(self, *, batch: int, num_tokens: int, options: CallOptions | None = None,
                    custom_mask: bool = False) -> str | None:
        """None when a call of ``batch`` rows needing ``num_tokens`` slots (prompt + new
        tokens) can run here, else a short reason (the engine then runs it eagerly)."""
        if self._model_reason:
            return self._model_reason
        if custom_mask:
            return "custom attention masks (parallel repair forwards) run on the eager executor"
        if batch > self.buffers.max_batch:
            return f"a batch of {batch} rows exceeds the executor's max_batch of {self.buffers.max_batch}"
        if num_tokens > self.max_tokens:
            return f"the call needs {num_tokens} slots per row; the buffers hold {self.max_tokens}"
        return unsupported_options(self.model, options) if options is not None else None

    # -- calls ---------------------------------------------------------------------------

    def forward(self, prefix: Sequence[kvops.KVSlice] | Sequence[Sequence[kvops.KVSlice]], input_ids: torch.Tensor,
                tail_start: int, *, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 1) -> ForwardOutput:
        """Logits of the prompt's last ``logits_to_keep`` tokens, after running
        ``input_ids [B, S]``'s tail ``[tail_start, S)`` over ``prefix``.

        ``prefix``: stored slices laid one after the other, covering ``[0, tail_start)``;
        one sequence for every row, or one per row. ``attention_mask [B, S]`` (optional)
        marks left padding with 0: row ``b``'s prefix then covers its real tokens
        before ``tail_start`` only.
        """
        batch, prompt = input_ids.shape
        _check_tail(tail_start, prompt)
        if not 1 <= logits_to_keep <= prompt - tail_start:
            raise ValueError(f"logits_to_keep must be in [1, {prompt - tail_start}] (the tail's length), "
                             f"got {logits_to_keep}")
        with self._calling():
            call = self._prepare(prefix, input_ids, tail_start, prompt, attention_mask)
            logits = self._run_tail(call, input_ids, logits_to_keep).clone()
            return ForwardOutput(logits, self._prompt_kv(call), self._stats(call, steps=1))

    def generate(self, prefix: Sequence[kvops.KVSlice] | Sequence[Sequence[kvops.KVSlice]], input_ids: torch.Tensor,
                 tail_start: int, *, options: CallOptions, streamer: BaseStreamer | None = None,
                 attention_mask: torch.Tensor | None = None) -> GenerateOutput:
        """Run the tail ``[tail_start, S)`` of ``input_ids [B, S]`` over ``prefix`` (as in
        ``forward``), then decode up to ``options.max_new_tokens`` tokens as HF ``generate``
        would (``spanctx.decoding``), seeded with ``options.seed``. ``streamer`` gets the
        prompt, then each new token, then ``end()``, as from ``generate``."""
        chooser = TokenChooser.from_options(self.model, options, self.device)
        batch, prompt = input_ids.shape
        budget = options.max_new_tokens
        with self._calling(), seeded(options.seed, self.device):
            call = self._prepare(prefix, input_ids, tail_start, prompt + budget, attention_mask)
            logits = self._run_tail(call, input_ids, 1)[:, -1]
            sequences = torch.empty(batch, prompt + budget, dtype=torch.long, device=self.device)
            sequences[:, :prompt] = input_ids
            unfinished = torch.ones(batch, dtype=torch.long, device=self.device)
            if streamer is not None:
                streamer.put(input_ids.cpu())
            host = _HostMirror(batch, self.device)
            made = 0
            for i in range(budget):
                tokens, scores = chooser.choose(sequences[:, :prompt + i], logits, unfinished)
                sequences[:, prompt + i] = tokens
                unfinished = chooser.still_running(sequences[:, :prompt + i + 1], scores, unfinished)
                made = i + 1
                host.send(tokens, unfinished)
                if made < budget:  # launched before the host knows whether to stop: it overlaps the check
                    logits = self._run_decode(call, tokens, prompt + i)[:, -1]
                tokens_on_host, running = host.receive()
                if streamer is not None:
                    streamer.put(tokens_on_host)
                if not running:
                    break
            if streamer is not None:
                streamer.end()
            steps = 1 + min(made, budget - 1)
            return GenerateOutput(sequences[:, :prompt + made], self._prompt_kv(call), self._stats(call, steps))

    # -- steps ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _calling(self):
        with self._lock, torch.inference_mode(), attention_switched(self.model):
            yield

    def _prepare(self, prefix, input_ids: torch.Tensor, tail_start: int, slots_needed: int,
                 attention_mask: torch.Tensor | None) -> _Call:
        """Place the prefix, set the row starts, pick the buckets."""
        batch, prompt = input_ids.shape
        reason = self.unsupported(batch=batch, num_tokens=slots_needed)
        if reason:
            raise ValueError(reason)
        _check_tail(tail_start, prompt)
        pads = _left_pads(attention_mask, batch, prompt)
        copied = 0
        for row, pieces in enumerate(_rows(prefix, batch)):
            expected = tail_start - min(pads[row], tail_start)
            covered = sum(p.num_tokens for p in pieces)
            if covered != expected:
                raise ValueError(f"row {row}: the prefix covers {covered} tokens, the prompt has {expected} "
                                 f"real tokens before tail_start={tail_start}")
            copied += self.buffers.place(row, pieces, tail_start)
            self.buffers.overwrite(row, tail_start, self.max_tokens)
        self._row_start[:batch].copy_(torch.tensor(pads), non_blocking=True)
        tail_bucket = min(suffix_bucket(prompt - tail_start), self.max_tokens - tail_start)
        length = min(cache_bucket(max(slots_needed, tail_start + tail_bucket)), self.max_tokens)
        return _Call(batch, prompt, tail_start, tail_bucket, length, copied, self._steps.stats)

    def _run_tail(self, call: _Call, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits ``[B, keep, V]`` of the tail's last ``keep`` tokens (a graph's buffer)."""
        batch, tokens, padded = call.batch, call.prompt_tokens - call.tail_start, call.tail_bucket
        ids = self._ids[:batch, :padded]
        ids[:, :tokens].copy_(input_ids[:, call.tail_start:])
        ids[:, tokens:].zero_()
        slots = torch.arange(call.tail_start, call.tail_start + padded, device=self.device)
        self._slots[:padded].copy_(slots)
        self._pos[:batch, :padded].copy_((slots[None] - self._row_start[:batch, None]).clamp_(min=0))
        self._keep[:keep].copy_(torch.arange(tokens - keep, tokens, device=self.device))
        return self._run(Bucket(batch, padded, call.length, keep))

    def _run_decode(self, call: _Call, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits ``[B, 1, V]`` after feeding ``tokens [B]`` at ``slot``."""
        batch = call.batch
        self._ids[:batch, 0].copy_(tokens)
        self._slots[:1].fill_(slot)
        self._pos[:batch, 0].copy_((slot - self._row_start[:batch]).clamp_(min=0))
        return self._run(Bucket(batch, 1, call.length, 1))

    def _run(self, bucket: Bucket) -> torch.Tensor:
        if self.graphs and bucket.tokens > GRAPH_TOKENS:
            return self._step(bucket)
        return self._steps.run(bucket)

    def _step(self, bucket: Bucket) -> torch.Tensor:
        """One model step of ``bucket`` from the fixed inputs: what a graph captures."""
        batch, tokens, length = bucket.batch, bucket.tokens, bucket.length
        slots, row_start = self._slots[:tokens], self._row_start[:batch]
        if self.attention == "flash":
            step = StepAttention("flash", {}, 1, None, kernels.FlashBounds.of(slots, row_start, length))
            mask = self._no_mask  # 4D, so that transformers builds no mask of its own
        else:
            masks = step_masks(slots, row_start, length, self.windows, fold=self._group, dtype=self.dtype)
            step = StepAttention(self.attention, masks, self._chunk_count(bucket), self._own_attention, None)
            mask = masks[None]
        cache = self._caches.get(bucket)
        if cache is None:
            cache = self._caches[bucket] = SlotCache(*self.buffers.views(batch, length), slots)
        keep = 1 if tokens == 1 else self._keep[:bucket.keep]
        out = self._forward(input_ids=self._ids[:batch, :tokens], position_ids=self._pos[:batch, :tokens],
                            attention_mask=mask, use_cache=True, logits_to_keep=keep, **{STEP_KWARG: step},
                            **_cache_kwargs(self.model, cache))
        return out.logits

    def _chunk_count(self, bucket: Bucket) -> int:
        if self.attention != "split":
            return 1
        if self._chunks is not None:
            return self._chunks
        query_blocks = -(-(self._group * bucket.tokens) // 64)
        rows = bucket.batch * self.kv_heads * query_blocks
        if self.device.type == "cuda":
            return kernels.chunk_count(bucket.length, rows, target=2 * self._sms, min_chunk=256)
        return kernels.chunk_count(bucket.length, rows, target=8, min_chunk=16)

    def _prompt_kv(self, call: _Call) -> SpanKV:
        keys, values = self.buffers.views(call.batch, call.prompt_tokens)
        return SpanKV(keys, values)

    def _stats(self, call: _Call, steps: int) -> ExecStats:
        built = self._steps.stats.since(call.builds_before)
        graphed = self.graphs and call.tail_bucket <= GRAPH_TOKENS
        return ExecStats("graph" if graphed else "eager", self.compiled, self.attention, call.tail_bucket,
                         call.length, call.copied, steps, built.builds, built.seconds)

    def _attention_mode(self, attention: str, text, head_dim: int) -> str:
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        own = self.model.config._attn_implementation
        softcap = getattr(text, "attn_logit_softcapping", None) is not None
        if attention == "auto":
            if self.device.type != "cuda" or own != "sdpa" or softcap:
                return "hf"
            return next((m for m in ("flash", "split") if kernels.works(m, self.device, self.dtype, head_dim)), "hf")
        if attention != "hf":
            if own not in ("sdpa", "eager") or softcap:
                raise ValueError(f"{attention} attention computes plain softmax attention; this model's is {own!r}"
                                 + (" with logit soft-capping" if softcap else ""))
            if not kernels.works(attention, self.device, self.dtype, head_dim):
                raise ValueError(f"{attention} attention does not run (or disagrees) on {self.device} in {self.dtype}")
        return attention


class _HostMirror:
    """Brings a step's tokens and the "any row still running" flag to the host without
    waiting for work queued after them (pinned buffers and an event on CUDA)."""

    def __init__(self, batch: int, device: torch.device) -> None:
        pinned = device.type == "cuda"
        self._tokens = torch.zeros(batch, dtype=torch.long, pin_memory=pinned)
        self._running = torch.zeros(1, dtype=torch.bool, pin_memory=pinned)
        self._event = torch.cuda.Event() if pinned else None

    def send(self, tokens: torch.Tensor, unfinished: torch.Tensor) -> None:
        self._tokens.copy_(tokens, non_blocking=True)
        self._running.copy_(unfinished.any()[None], non_blocking=True)
        if self._event is not None:
            self._event.record()

    def receive(self) -> tuple[torch.Tensor, bool]:
        if self._event is not None:
            self._event.synchronize()
        return self._tokens.clone(), bool(self._running)


def _probe_layout(model) -> tuple[list[tuple[int, int]], torch.dtype]:
    """Per layer (H_kv, D), and the KV dtype, read off a one-token forward."""
    with torch.inference_mode():
        cache = kvops.empty_cache()
        ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **_cache_kwargs(model, cache))
        kv = kvops.as_slices(cache)
    return [(k.shape[1], k.shape[-1]) for k in kv.keys], kv.keys[0].dtype


def _model_reason(text, graphs: bool) -> str | None:
    """Why this model cannot run here at all (None when it can)."""
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    kinds = {rope.get("rope_type")} if "rope_type" in rope else {p.get("rope_type") for p in rope.values()
                                                                 if isinstance(p, dict)}
    host = sorted(HOST_ROPE[k] for k in kinds if k in HOST_ROPE)
    if graphs and host:
        return f"{', '.join(host)} RoPE recomputes its frequencies from the length on the host: no CUDA graph"
    return None


def _check_tail(tail_start: int, prompt: int) -> None:
    if not 0 <= tail_start < prompt:
        raise ValueError(f"tail_start must leave at least one of the {prompt} prompt tokens to run, got {tail_start}")


def _left_pads(attention_mask: torch.Tensor | None, batch: int, prompt: int) -> list[int]:
    """Per row, the number of leading pad slots (the mask must be 0s then 1s)."""
    if attention_mask is None:
        return [0] * batch
    if tuple(attention_mask.shape) != (batch, prompt):
        raise ValueError(f"attention_mask must be [{batch}, {prompt}], got {list(attention_mask.shape)}")
    mask = attention_mask.to("cpu", torch.long)
    pads = (prompt - mask.sum(dim=1)).tolist()
    for row, pad in enumerate(pads):
        if pad >= prompt or mask[row, :pad].any() or not mask[row, pad:].all():
            raise ValueError(f"row {row} of attention_mask is not left padding (0s, then at least one 1)")
    return pads


def _rows(prefix, batch: int) -> list[Sequence[kvops.KVSlice]]:
    """``prefix`` as one sequence of slices per row."""
    if not prefix or isinstance(prefix[0], kvops.KVSlice):
        return [prefix] * batch
    if len(prefix) != batch:
        raise ValueError(f"{len(prefix)} per-row prefixes for a batch of {batch}")
    return list(prefix)
