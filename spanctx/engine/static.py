"""The static executor: a request's final call and its decode loop on fixed KV buffers.

The eager executor hands transformers a fresh ``DynamicCache`` per call; every step then
pays Python and kernel launches, which on a GPU cost more than the arithmetic. This one
keeps one set of KV buffers for the life of the executor (``spanctx.slots``) and runs
each model step from fixed-address inputs, so a step is captured once into a CUDA graph
and replayed for every later call of its bucket (``spanctx.graphs``).

A call: the stored slices covering ``[0, tail_start)`` are copied straight into the
buffers (one copy; slices still in place from the previous call are not copied again);
one step runs the prompt's tail ``[tail_start, S)``, padded to its suffix bucket
(``static_layout.suffix_bucket``; tails over ``GRAPH_TOKENS`` run unpadded, without a
graph); then one step per generated token, chosen as HF ``generate`` would
(``spanctx.engine.decoding``). Every step attends over the first ``cache_bucket`` slots (a rung
of ``static_warmup``'s ladder; ``warm_up`` builds them all at start-up), fixed
per call to cover prompt, new tokens and padding. A graph is keyed by ``Bucket`` (rows,
step tokens, attention slots, logits kept, adapter state): its capture (and with
``compile=True`` a ``torch.compile`` of each new shape) is paid once and reported in
``ExecStats``. Padded step tokens write junk KV after the prompt, in slots the masks
hide and decode overwrites.

Runs: exact and placed prefixes (positions are slots), left-padded batches (per-row
prefixes), greedy and sampled decoding with a seed, HF logits processors and stopping
criteria, EOS and padding of finished rows, streaming, plain LoRA and aLoRA adapters
(``spanctx.static_lora``). Refuses (``unsupported``): custom attention masks, batches
over ``max_batch``, calls needing more than ``max_tokens`` slots, generate options the
decode loop does not build (beams, stop strings, ...), and with graphs dynamic-NTK or
longrope RoPE.

Exactness: with graphs off (CPU, fp32) the steps are ordinary transformers forwards
with an explicit mask; logits match a full prefill within float rounding
(``tests/test_static.py``).

Threading: calls of one executor must not overlap (the engine serializes them; the
executor also holds a lock). During a step's forward the model's attention is switched
to ``spanctx.slots``' function on the calling thread only (``slots.attention_switched``):
eager calls on the same model from other threads, and callbacks between steps, see the
model as it is. A call made from a callback of a running call (a streamer, a logits
processor) is refused here with a clear error; the engine runs it eagerly
(``busy_here``). With an aLoRA on, its layers run through the executor's hooks during
the call.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import attrs
import torch
from transformers.generation.streamers import BaseStreamer

from ..cache import kv as kvops
from ..cache.span_kv import SpanKV
from ..core.options import CallOptions
from ..hf import cache_kwargs
from . import attention as kernels
from .decoding import HostMirror, TokenChooser, seeded, unsupported_options
from .graphs import BuildStats, StepGraphs
from .slots import (
    STEP_KWARG,
    KVBuffers,
    SlotCache,
    StepAttention,
    attention_switched,
    own_attention,
    step_masks,
)
from .static_layout import (
    GRAPH_TOKENS,
    SLOT_GRANULE,
    attention_mode,
    check_tail,
    left_pads,
    model_reason,
    probe_layout,
    rows_of,
    suffix_bucket,
)
from .static_lora import AdapterState, AdapterSteps
from .static_warmup import OVERHANG, Sizing, ladder_for, rung

__all__ = ["ExecStats", "ForwardOutput", "GenerateOutput", "StaticExecutor", "suffix_bucket"]

# a step's masks are tail x slots: a 15K cold prompt's are ~1 GB in fp32, and on CPU it ran
# 9.1 s here vs 2.6 s eager (issue 17), so tails past this run eagerly (the stats say why)
MAX_MASK_BYTES = 512 << 20


@attrs.frozen
class Bucket:
    """The key of one captured step."""

    batch: int
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
    adapters: AdapterState | None
    builds_before: BuildStats


class StaticExecutor(Sizing):
    """Runs a request's final call and its decode loop on fixed-address KV buffers.

    ``max_tokens`` slots per row (prompt + new tokens) and ``max_batch`` rows are
    allocated at once (``memory_bytes``). ``graphs`` (default: on when the model is on
    CUDA) captures each bucket's step in a CUDA graph; ``compile`` runs the model through
    ``torch.compile`` first (fused kernels; the first call of a new shape compiles).
    ``attention``: "split" (split-KV attention, ``spanctx.attention``; for models whose
    attention is plain softmax: SDPA or eager without soft-capping), "hf" (the model's own
    attention function with the executor's masks), or "auto" (split on CUDA for an SDPA
    model where its kernel runs, else hf). ``chunks`` fixes the split's piece count
    (default: about one block per SM).
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
        layout, self.dtype = probe_layout(model)
        self.max_tokens = -(-max_tokens // SLOT_GRANULE) * SLOT_GRANULE
        self.buffers = KVBuffers(layout, max_batch=max_batch, max_tokens=self.max_tokens + OVERHANG,
                                 dtype=self.dtype, device=self.device)
        self.ladder = ladder_for(model, self.buffers)  # attention lengths (spanctx.engine.static_warmup)
        window = getattr(text, "sliding_window", None)
        self.windows = (None,) if window is None else (None, window)
        self.kv_heads = layout[0][0]
        self.attention = attention_mode(model, attention, layout[0][1], self.dtype)
        self._group = text.num_attention_heads // self.kv_heads if self.attention == "split" else 1
        self._chunks = chunks
        self._own_attention = own_attention(model)
        self._model_reason = model_reason(text, self.graphs)
        self._sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.graphs else 0
        ints = dict(dtype=torch.long, device=self.device)
        self._ids = torch.zeros(max_batch, self.max_tokens, **ints)
        self._pos = torch.zeros(max_batch, self.max_tokens, **ints)
        self._slots = torch.zeros(self.max_tokens, **ints)
        self._keep = torch.zeros(self.max_tokens, **ints)
        self._row_start = torch.zeros(max_batch, **ints)
        self._adapters = AdapterSteps(model, max_batch=max_batch, max_tokens=self.max_tokens)
        self._forward = torch.compile(model) if compile else model
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread inside a call
        self.max_mask_bytes = MAX_MASK_BYTES
        self.reset()

    def reset(self) -> None:
        """Drop every captured step (call after unloading an adapter: a graph keeps the
        weights it was captured with)."""
        with self._lock:
            self._caches: dict[Bucket, SlotCache] = {}
            self._steps = StepGraphs(self._step, graphs=self.graphs, warmup=2 if self.compiled else 1)

    @property
    def memory_bytes(self) -> int:
        """Memory of the KV buffers and the step inputs (allocated at construction). The
        graphs' own pool (a step's activations and logits) comes on top, per bucket."""
        inputs = (self._ids, self._pos, self._slots, self._keep, self._row_start, self._adapters.starts,
                  self._adapters.adapt)
        return self.buffers.nbytes + sum(t.numel() * t.element_size() for t in inputs)

    @property
    def build_stats(self) -> BuildStats:
        """Buckets built so far and the seconds spent building them."""
        return self._steps.stats

    def unsupported(self, *, batch: int, num_tokens: int, options: CallOptions | None = None,
                    custom_mask: bool = False, tail: tuple[int, int] | None = None) -> str | None:
        """None when a call of ``batch`` rows needing ``num_tokens`` slots (prompt + new
        tokens) can run here, else a short reason (the engine then runs it eagerly).
        ``tail``: ``(tail_start, prompt tokens)``; a tail whose step masks would take over
        ``max_mask_bytes`` (a long cold prompt: a mask is tail x slots) is refused."""
        if self._model_reason:
            return self._model_reason
        if custom_mask:
            return "custom attention masks (parallel repair forwards) run on the eager executor"
        if batch > self.buffers.max_batch:
            return f"a batch of {batch} rows exceeds the executor's max_batch of {self.buffers.max_batch}"
        if num_tokens > self.max_tokens:
            return f"the call needs {num_tokens} slots per row; the buffers hold {self.max_tokens}"
        if tail is not None:
            tokens, length = self._buckets(*tail, num_tokens)
            mask_bytes = batch * self._group * tokens * length * self.dtype.itemsize * len(self.windows)
            if mask_bytes > self.max_mask_bytes:
                return (f"the {tail[1] - tail[0]}-token tail's attention masks would take {mask_bytes >> 20} MiB "
                        f"(max_mask_bytes: {self.max_mask_bytes >> 20} MiB); eager attention needs none")
        return unsupported_options(self.model, options) if options is not None else None

    # -- calls ---------------------------------------------------------------------------

    def forward(self, prefix: Sequence[kvops.KVSlice] | Sequence[Sequence[kvops.KVSlice]], input_ids: torch.Tensor,
                tail_start: int, *, attention_mask: torch.Tensor | None = None,
                alora_offsets: Sequence[int | None] | None = None, logits_to_keep: int = 1) -> ForwardOutput:
        """Logits of the prompt's last ``logits_to_keep`` tokens, after running
        ``input_ids [B, S]``'s tail ``[tail_start, S)`` over ``prefix``.

        ``prefix``: stored slices laid one after the other, covering ``[0, tail_start)``;
        one sequence for every row, or one per row. ``attention_mask [B, S]`` (optional)
        marks left padding with 0: row ``b``'s prefix then covers its real tokens
        before ``tail_start`` only. ``alora_offsets`` (with an aLoRA switched on): per
        row, how many of the prompt's last tokens run with it (PEFT's ``alora_offsets``;
        None: none); the prefix must end before each row's invocation.
        """
        batch, prompt = input_ids.shape
        check_tail(tail_start, prompt)
        if not 1 <= logits_to_keep <= prompt - tail_start:
            raise ValueError(f"logits_to_keep must be in [1, {prompt - tail_start}] (the tail's length), "
                             f"got {logits_to_keep}")
        with self._calling(prompt, tail_start, alora_offsets) as adapters:
            call = self._prepare(prefix, input_ids, tail_start, prompt, attention_mask, adapters)
            logits = self._run_tail(call, input_ids, logits_to_keep).clone()
            return ForwardOutput(logits, self._prompt_kv(call), self._stats(call, steps=1))

    def generate(self, prefix: Sequence[kvops.KVSlice] | Sequence[Sequence[kvops.KVSlice]], input_ids: torch.Tensor,
                 tail_start: int, *, options: CallOptions, streamer: BaseStreamer | None = None,
                 attention_mask: torch.Tensor | None = None,
                 alora_offsets: Sequence[int | None] | None = None) -> GenerateOutput:
        """Run the tail ``[tail_start, S)`` of ``input_ids [B, S]`` over ``prefix`` (as in
        ``forward``), then decode up to ``options.max_new_tokens`` tokens as HF ``generate``
        would (``spanctx.engine.decoding``), seeded with ``options.seed``. ``streamer`` gets the
        prompt, then each new token, then ``end()``, as from ``generate``."""
        batch, prompt = input_ids.shape
        chooser = TokenChooser.from_options(self.model, options, self.device, prompt)
        budget = options.max_new_tokens
        with self._calling(prompt, tail_start, alora_offsets) as adapters, seeded(options.seed, self.device):
            call = self._prepare(prefix, input_ids, tail_start, prompt + budget, attention_mask, adapters)
            logits = self._run_tail(call, input_ids, 1)[:, -1]
            sequences = torch.empty(batch, prompt + budget, dtype=torch.long, device=self.device)
            sequences[:, :prompt] = input_ids
            unfinished = torch.ones(batch, dtype=torch.long, device=self.device)
            if streamer is not None:
                streamer.put(input_ids.cpu())
            host = HostMirror(batch, self.device)
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
    def _calling(self, prompt: int, tail_start: int, alora_offsets) -> Iterator[AdapterState | None]:
        """Hold the executor and the model for one call; yields the adapter state."""
        starts = None
        if alora_offsets is not None:
            starts = [None if n is None else prompt - n for n in alora_offsets]
            if any(s is not None and not tail_start <= s < prompt for s in starts):
                raise ValueError(f"aLoRA offsets {list(alora_offsets)} put an invocation before tail_start="
                                 f"{tail_start} (the reused prefix must be base KV) or outside the prompt")
        if self.busy_here:
            raise RuntimeError("a re-entrant call to the static executor (from a callback of its running "
                               "generation): the engine runs such calls eagerly")
        with self._lock, torch.inference_mode():
            self._owner = threading.get_ident()
            try:
                state, layers = self._adapters.state()
                with self._adapters.engaged(state, layers, starts):
                    yield state
            finally:
                self._owner = None

    @property
    def busy_here(self) -> bool:
        """Whether this thread is inside one of the executor's calls (a callback of it)."""
        return self._owner == threading.get_ident()

    def _prepare(self, prefix, input_ids: torch.Tensor, tail_start: int, slots_needed: int,
                 attention_mask: torch.Tensor | None, adapters: AdapterState | None) -> _Call:
        """Place the prefix, set the row starts, pick the buckets."""
        batch, prompt = input_ids.shape
        reason = self.unsupported(batch=batch, num_tokens=slots_needed)
        if reason:
            raise ValueError(reason)
        check_tail(tail_start, prompt)
        pads = left_pads(attention_mask, batch, prompt)
        copied = 0
        for row, pieces in enumerate(rows_of(prefix, batch)):
            expected = tail_start - min(pads[row], tail_start)
            covered = sum(p.num_tokens for p in pieces)
            if covered != expected:
                raise ValueError(f"row {row}: the prefix covers {covered} tokens, the prompt has {expected} "
                                 f"real tokens before tail_start={tail_start}")
            copied += self.buffers.place(row, pieces, tail_start)
            self.buffers.overwrite(row, tail_start, self.max_tokens)
        self._row_start[:batch].copy_(torch.tensor(pads), non_blocking=True)
        tail_bucket, length = self._buckets(tail_start, prompt, slots_needed)
        return _Call(batch, prompt, tail_start, tail_bucket, length, copied, adapters, self._steps.stats)

    def _buckets(self, tail_start: int, prompt: int, slots_needed: int) -> tuple[int, int]:
        """The tail step's padded tokens and every step's attention slots."""
        tail = prompt - tail_start  # a long tail is arithmetic-bound: no graph, no padding
        tail_bucket = suffix_bucket(tail) if tail <= GRAPH_TOKENS else tail  # the buffers' OVERHANG holds it
        return tail_bucket, rung(self.ladder, max(slots_needed, tail_start + tail_bucket))

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
        return self._run(Bucket(batch, padded, call.length, keep, call.adapters))

    def _run_decode(self, call: _Call, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits ``[B, 1, V]`` after feeding ``tokens [B]`` at ``slot``."""
        batch = call.batch
        self._ids[:batch, 0].copy_(tokens)
        self._slots[:1].fill_(slot)
        self._pos[:batch, 0].copy_((slot - self._row_start[:batch]).clamp_(min=0))
        return self._run(Bucket(batch, 1, call.length, 1, call.adapters))

    def _run(self, bucket: Bucket) -> torch.Tensor:
        if self.graphs and bucket.tokens > GRAPH_TOKENS:
            return self._step(bucket)
        return self._steps.run(bucket)

    def _step(self, bucket: Bucket) -> torch.Tensor:
        """One model step of ``bucket`` from the fixed inputs: what a graph captures."""
        batch, tokens, length = bucket.batch, bucket.tokens, bucket.length
        slots, row_start = self._slots[:tokens], self._row_start[:batch]
        if bucket.adapters is not None and bucket.adapters.alora:
            self._adapters.write_mask(slots, batch)
        masks = step_masks(slots, row_start, length, self.windows, fold=self._group, dtype=self.dtype)
        step = StepAttention(self.attention, masks, self._chunk_count(bucket), self._own_attention)
        cache = self._caches.get(bucket)
        if cache is None:
            cache = self._caches[bucket] = SlotCache(*self.buffers.views(batch, length), slots)
        keep = 1 if tokens == 1 else self._keep[:bucket.keep]
        with attention_switched(self.model):
            out = self._forward(input_ids=self._ids[:batch, :tokens], position_ids=self._pos[:batch, :tokens],
                                attention_mask=masks[None], use_cache=True, logits_to_keep=keep,
                                **{STEP_KWARG: step}, **cache_kwargs(self.model, cache))
        return out.logits

    def _chunk_count(self, bucket: Bucket) -> int:
        if self.attention != "split":
            return 1
        if self._chunks is not None:
            return self._chunks
        query_blocks = -(-(self._group * bucket.tokens) // 64)
        rows = bucket.batch * self.kv_heads * query_blocks
        if self.device.type == "cuda":
            return kernels.chunk_count(bucket.length, rows, target=self._sms, min_chunk=256)
        return kernels.chunk_count(bucket.length, rows, target=8, min_chunk=16)

    def _prompt_kv(self, call: _Call) -> SpanKV:
        keys, values = self.buffers.views(call.batch, call.prompt_tokens)
        return SpanKV(keys, values)

    def _stats(self, call: _Call, steps: int) -> ExecStats:
        built = self._steps.stats.since(call.builds_before)
        graphed = self.graphs and call.tail_bucket <= GRAPH_TOKENS
        return ExecStats("graph" if graphed else "eager", self.compiled, self.attention, call.tail_bucket,
                         call.length, call.copied, steps, built.builds, built.seconds)
