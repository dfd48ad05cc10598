"""The static executor: a final call (``calls.FinalCall``) and its decode loop on fixed KV buffers.

The eager executor hands transformers a fresh ``DynamicCache`` per call; every step then
pays Python and kernel launches, which on a GPU cost more than the arithmetic. This one
keeps one row of KV buffers for its life (``slots``) and runs each step from
fixed-address inputs, so a step is captured once into a CUDA graph and replayed for every
later call of its bucket (``graphs``).

A call's ``Row``s (a prompt, the stored slices of its first ``start`` tokens, an aLoRA
offset) are packed into the buffer row (``static_layout.pack``): slices every row shares
laid once, a segment per row for the rest, copied straight in (slices still in place from
the previous call are not copied again). One step runs every row's tail, padded to its
``suffix_bucket`` (tails over ``GRAPH_TOKENS``: unpadded, no graph); a decode runs one
step per new token for all rows, chosen as HF ``generate`` would (``decoding``). Steps
attend over the slots up to a rung of ``static_warmup``'s ladder (built by ``warm_up``).
A graph is keyed by ``Bucket`` (step tokens, attention slots, logit rows kept, adapter
state); its capture (and with ``compile=True`` a ``torch.compile``) is paid once and
reported in ``ExecStats``. Padded step tokens write junk KV in slots nobody sees.

Runs forwards and decodes (greedy or seeded sampling, processors, stopping criteria,
streaming, per-step scores and logits), LoRA and aLoRA adapters (``static_lora``;
``forget_adapter`` before one is unloaded). ``refuses`` says what not: hidden states,
calls past ``max_tokens`` slots or ``MAX_ROWS`` rows, masks past ``max_mask_bytes``,
image placeholders in a tail, options its loop does not build (beams, n-gram bans), and
with graphs dynamic-NTK or longrope RoPE. Exact: with graphs off (CPU, fp32) a step is an
ordinary transformers forward with an explicit mask (``tests/test_static.py``).

Threading: calls must not overlap (the engine serializes them; a lock too). A step's
attention is switched to ``slots``' function on the calling thread only
(``slots.attention_switched``); a call from a callback of a running call (a streamer, a
logits processor) is refused (``busy_here``) and runs eagerly.
"""

from __future__ import annotations

import contextlib
import itertools
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
from .calls import FinalCall, FinalOutput
from .decoding import HostMirror, TokenChooser, seeded, unsupported_options
from .graphs import BuildStats, StepGraphs
from .slots import (
    NO_ROW,
    OWNER_FREE,
    OWNER_SHARED,
    STEP_KWARG,
    KVBuffers,
    SlotCache,
    StepAttention,
    attention_switched,
    own_attention,
    row_bits,
    step_masks,
)
from .static_layout import (
    GRAPH_TOKENS,
    MAX_ROWS,
    Bucket,
    ExecStats,
    ForwardOutput,
    GenerateOutput,
    Packing,
    Row,
    StepInputs,
    attention_mode,
    keep_bucket,
    model_reason,
    pack,
    probe_layout,
    rows_bucket,
)
from .static_lora import AdapterState, AdapterSteps
from .static_warmup import OVERHANG, Sizing, granules, ladder_for

__all__ = ["Row", "StaticExecutor"]

# a step's masks are tail x slots: a 15K cold prompt's are ~1 GB in fp32, and on CPU it ran
# 9.1 s here vs 2.6 s eager (issue 17), so tails past this run eagerly (the stats say why)
MAX_MASK_BYTES = 512 << 20


@attrs.frozen(eq=False)
class _Call:
    packing: Packing
    tail_bucket: int
    length: int
    copied: int
    adapters: AdapterState | None
    builds_before: BuildStats


class StaticExecutor(Sizing):
    """Runs a call's final step and its decode loop on fixed-address KV buffers.

    ``max_tokens`` slots (every row's prompt and new tokens) are allocated at once
    (``memory_bytes``). ``graphs`` (default: on when the model is on CUDA) captures each
    bucket's step in a CUDA graph; ``compile`` runs the model through ``torch.compile``
    first (fused kernels; the first call of a new shape compiles). ``attention``: "split"
    (split-KV attention, ``spanctx.attention``; for models whose attention is plain
    softmax: SDPA or eager without soft-capping), "hf" (the model's own attention function
    with the executor's masks), or "auto" (split on CUDA for an SDPA model where its
    kernel runs, else hf). ``chunks`` caps the split's piece count, a power of two (default: about
    one block per SM on CUDA, a few on CPU).
    """

    name = "static"

    def __init__(self, model, *, max_tokens: int, graphs: bool | None = None, compile: bool = False,
                 attention: str = "auto", chunks: int | None = None) -> None:
        self.model = model
        self.device = model.device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {self.device}")
        if max_tokens < 2:
            raise ValueError(f"need max_tokens >= 2, got {max_tokens}")
        if chunks is not None and (chunks < 1 or chunks & (chunks - 1)):
            raise ValueError(f"chunks must be a power of two, got {chunks}")
        self.compiled, self._chunks = compile, chunks
        text = model.config.get_text_config()
        layout, self.dtype = probe_layout(model)
        self.max_tokens = granules(max_tokens)
        self.buffers = KVBuffers(layout, max_tokens=self.max_tokens + OVERHANG, dtype=self.dtype, device=self.device)
        self.ladder = ladder_for(model, self.buffers)  # attention lengths (spanctx.engine.static_warmup)
        window = getattr(text, "sliding_window", None)
        self.windows = (None,) if window is None else (None, window)
        self.kv_heads = layout[0][0]
        self.attention = attention_mode(model, attention, layout[0][1], self.dtype)
        self._group = text.num_attention_heads // self.kv_heads if self.attention == "split" else 1
        self._own_attention = own_attention(model)
        self._model_reason = model_reason(text, self.graphs)
        # a vision-language model: ids from the text vocabulary on are image placeholders
        self._vocab = text.vocab_size if getattr(model.config, "vision_config", None) is not None else None
        cuda = self.device.type == "cuda"
        self._sms = torch.cuda.get_device_properties(self.device).multi_processor_count if cuda else 0
        ints, slots = dict(dtype=torch.long, device=self.device), self.buffers.max_tokens  # a padded tail's too
        # the step's inputs, per step token: id, position, slot, row; and per slot its owner and position
        self._ids, self._pos, self._slots, self._who, self._keep = (torch.zeros(slots, **ints) for _ in range(5))
        self.owners, self.slot_positions = torch.full((slots,), OWNER_FREE, **ints), torch.zeros(slots, **ints)
        self._adapters = AdapterSteps(model, max_rows=MAX_ROWS, max_tokens=slots)
        self._forward = torch.compile(model) if compile else model
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread inside a call
        self.max_mask_bytes = MAX_MASK_BYTES
        self.reset()

    def reset(self) -> None:
        """Drop every captured step (``forget_adapter`` drops one adapter's)."""
        with self._lock:
            self._caches: dict[Bucket, SlotCache] = {}
            self._steps = StepGraphs(self._step, graphs=self.graphs, warmup=2 if self.compiled else 1)

    def forget_adapter(self, name: str) -> None:
        """Drop the steps captured with PEFT adapter ``name`` on, before it is unloaded: a graph
        replays the weights it captured, and a later adapter may be given their memory."""
        with self._lock:
            stale = lambda bucket: bucket.adapters is not None and name in bucket.adapters.names  # noqa: E731
            self._steps.drop(stale)
            self._caches = {bucket: cache for bucket, cache in self._caches.items() if not stale(bucket)}

    @property
    def memory_bytes(self) -> int:
        """Memory of the KV buffers and the step inputs (allocated at construction). The
        graphs' own pool (a step's activations and logits) comes on top, per bucket."""
        inputs = (self._ids, self._pos, self._slots, self._who, self._keep, self.owners, self.slot_positions,
                  self._adapters.starts, self._adapters.adapt)
        return self.buffers.nbytes + sum(t.numel() * t.element_size() for t in inputs)

    @property
    def build_stats(self) -> BuildStats:
        """Buckets built so far and the seconds spent building them."""
        return self._steps.stats

    def refuses(self, call: FinalCall, *, sized: bool = True) -> str | None:
        """None when ``call`` can run here, else why not (hidden states, the model's whole output,
        or ``refuses_rows``'); ``sized=False`` leaves out ``misfit`` (the engine may grow)."""
        if self.busy_here:
            return "a call made from a callback of a running static generation runs on the eager executor"
        tails, keep = min(row.num_tokens - row.start for row in call.rows), call.logits_to_keep
        if call.hidden or (call.decode is None and (keep is None or keep > tails)):
            return f"a static step returns logits of a row's tail (asked: hidden={call.hidden}, logits_to_keep={keep})"
        return self.refuses_rows(call.rows, new_tokens=call.new_tokens, options=call.decode, sized=sized)

    def misfit(self, call: FinalCall) -> str | None:
        """Why ``call`` does not fit the buffers and the mask budget (None: it does)."""
        return self._fits(pack(call.rows), call.new_tokens)

    def refuses_rows(self, rows: Sequence[Row], *, new_tokens: int = 0, options: CallOptions | None = None,
                     sized: bool = True) -> str | None:
        """None when a call of ``rows`` decoding ``new_tokens`` per row can run here, else a
        short reason. A tail whose step masks would take over ``max_mask_bytes`` (a long
        cold prompt: a mask is tail x slots) is refused."""
        if self._model_reason:
            return self._model_reason
        if self._vocab is not None and any(bool((row.input_ids[row.start:] >= self._vocab).any()) for row in rows):
            return ("image tokens in the tail: their features enter through input-embedding hooks (engine/vision.py) "
                    "that a captured step does not run")
        return ((self._fits(pack(rows), new_tokens) if sized else None)
                or (unsupported_options(self.model, options) if options else None))

    # -- calls ---------------------------------------------------------------------------

    def run(self, call: FinalCall) -> FinalOutput:
        """Run ``call`` (which ``refuses`` accepted) through ``forward`` or ``generate``; the
        output's cache is a view of the buffers (valid until the next call)."""
        if call.decode is not None:
            asked = {name: bool(call.kwargs.get(name)) for name in ("output_scores", "output_logits")}
            out = self.generate(call.rows, options=call.decode, streamer=call.kwargs.get("streamer"), **asked)
            found = dict(sequences=out.sequences, scores=out.scores, step_logits=out.logits)
        else:
            out = self.forward(call.rows, logits_to_keep=call.logits_to_keep)
            found = dict(logits=out.logits)
        cache, packing = kvops.as_cache(out.kv), out.packing
        if call.kv:  # the buffers are overwritten by the next call: the prompt's KV is copied out
            found["kv"] = [kvops.KVSlice.whole(kvops.extract(cache, 0, call.rows[0].num_tokens))]
        return FinalOutput(self.name, static=out.stats, cache=cache,
                           offsets=tuple(base - packing.shared_tokens for base in packing.bases), **found)

    def forward(self, rows: Sequence[Row], *, logits_to_keep: int = 1) -> ForwardOutput:
        """Logits of each row's last ``logits_to_keep`` tokens (0: every tail token), after
        running every row's tail over its prefix."""
        tails = [row.num_tokens - row.start for row in rows]
        if not 0 <= logits_to_keep <= min(tails):
            raise ValueError(f"logits_to_keep must be in [0, {min(tails)}] (the shortest tail), got {logits_to_keep}")
        with self._calling(rows) as adapters:
            call = self._prepare(rows, 0, adapters)
            keep = [range(t - logits_to_keep, t) if logits_to_keep else range(t) for t in tails]
            logits = self._run_tail(call, rows, keep)
            if logits_to_keep:
                out = logits.reshape(len(rows), logits_to_keep, -1).clone()
            else:
                out = logits.new_zeros(len(rows), max(tails), logits.shape[-1])
                for r, rows_logits in enumerate(logits.split(tails)):
                    out[r, :len(rows_logits)] = rows_logits
            kv = SpanKV(*self.buffers.views(call.packing.decode_slot))
            return ForwardOutput(out, kv, call.packing, self._stats(call, steps=1))

    def generate(self, rows: Sequence[Row], *, options: CallOptions, streamer: BaseStreamer | None = None,
                 output_scores: bool = False, output_logits: bool = False) -> GenerateOutput:
        """Run every row's tail (as in ``forward``), then decode up to
        ``options.max_new_tokens`` tokens per row as HF ``generate`` would over the
        left-padded rows (``decoding``), seeded with ``options.seed``. ``streamer`` gets the
        prompts ``[R, W]``, then each step's tokens ``[R]``, then ``end()``, as from ``generate``."""
        width = max(row.num_tokens for row in rows)
        chooser = TokenChooser.from_options(self.model, options, self.device, width)
        budget = options.max_new_tokens
        with self._calling(rows) as adapters, seeded(options.seed, self.device):
            call = self._prepare(rows, budget, adapters)
            logits = self._run_tail(call, rows, [range(r.num_tokens - r.start - 1, r.num_tokens - r.start)
                                                 for r in rows])
            pad = chooser.pad_token_id if chooser.pad_token_id is not None else 0
            sequences = torch.full((len(rows), width + budget), pad, dtype=torch.long, device=self.device)
            for r, row in enumerate(rows):
                sequences[r, width - row.num_tokens:width] = row.input_ids
            lengths = torch.tensor(call.packing.lengths, device=self.device)
            unfinished = torch.ones(len(rows), dtype=torch.long, device=self.device)
            if streamer is not None:
                streamer.put(sequences[:, :width].cpu())
            host, made, kept_scores, kept_logits = HostMirror(len(rows), self.device), 0, [], []
            for i in range(budget):
                tokens, scores = chooser.choose(sequences[:, :width + i], logits, unfinished)
                if output_scores:
                    kept_scores.append(scores.clone())
                if output_logits:
                    kept_logits.append(logits.float().clone())
                sequences[:, width + i] = tokens
                unfinished = chooser.still_running(sequences[:, :width + i + 1], scores, unfinished)
                made = i + 1
                host.send(tokens, unfinished)
                if made < budget:  # launched before the host knows whether to stop: it overlaps the check
                    logits = self._run_decode(call, tokens, lengths + i, i)
                tokens_on_host, running = host.receive()
                if streamer is not None:
                    streamer.put(tokens_on_host)
                if not running:
                    break
            if streamer is not None:
                streamer.end()
            steps = 1 + min(made, budget - 1)
            return GenerateOutput(sequences[:, :width + made], tuple(kept_scores) if output_scores else None,
                                  tuple(kept_logits) if output_logits else None,
                                  SpanKV(*self.buffers.views(call.packing.decode_slot)), call.packing,
                                  self._stats(call, steps))

    # -- steps ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _calling(self, rows: Sequence[Row]) -> Iterator[AdapterState | None]:
        """Hold the executor and the model for one call; yields the adapter state."""
        if self.busy_here:
            raise RuntimeError("a re-entrant call to the static executor (from a callback of its running "
                               "generation): the engine runs such calls eagerly")
        starts = [None if row.alora_offset is None else row.num_tokens - row.alora_offset for row in rows]
        with self._lock, torch.inference_mode():
            self._owner = threading.get_ident()
            try:
                state, layers = self._adapters.state()
                with self._adapters.engaged(state, layers, None if starts == [None] * len(rows) else starts):
                    yield state
            finally:
                self._owner = None

    @property
    def busy_here(self) -> bool:
        """Whether this thread is inside one of the executor's calls (a callback of it)."""
        return self._owner == threading.get_ident()

    def _prepare(self, rows: Sequence[Row], new_tokens: int, adapters: AdapterState | None) -> _Call:
        """Place the prefixes, write the slots' owners and positions, pick the buckets."""
        packing = pack(rows)
        reason = self._fits(packing, new_tokens)
        if reason:
            raise ValueError(reason)
        copied = self.buffers.place(packing.shared, 0)
        owners, positions = [torch.full((packing.shared_tokens,), OWNER_SHARED)], [torch.arange(packing.shared_tokens)]
        for r, row in enumerate(rows):
            base, own = packing.bases[r], row.num_tokens - packing.shared_tokens
            copied += self.buffers.place(row.prefix[len(packing.shared):], base)
            self.buffers.overwrite(packing.slot(r, row.start), base + own)
            owners.append(row_bits(torch.full((own,), r)))
            positions.append(torch.arange(packing.shared_tokens, row.num_tokens))
        tail_bucket, length = self._buckets(packing, new_tokens)
        self.buffers.overwrite(packing.decode_slot, self.max_tokens)
        used = packing.decode_slot
        self.owners[used:length].fill_(OWNER_FREE)
        self.owners[:used].copy_(torch.cat(owners), non_blocking=True)
        self.slot_positions[:used].copy_(torch.cat(positions), non_blocking=True)
        return _Call(packing, tail_bucket, length, copied, adapters, self._steps.stats)

    def _run_tail(self, call: _Call, rows: Sequence[Row], keep: Sequence[range]) -> torch.Tensor:
        """Logits ``[K, V]`` (a graph's buffer) of every row's tail tokens ``keep[r]``, in row order."""
        packing, padded = call.packing, call.tail_bucket
        firsts = [0, *itertools.accumulate(n - start for n, start in zip(packing.lengths, packing.starts))]
        kept = [firsts[r] + k for r, row_keep in enumerate(keep) for k in row_keep]
        ids = torch.cat([*(row.input_ids[row.start:] for row in rows), self._ids.new_zeros(padded - packing.tail_tokens)])
        keep = keep_bucket(len(kept)) if padded <= GRAPH_TOKENS else len(kept)  # extra rows: the first again
        slots, positions, rows = packing.tail_step(padded, NO_ROW)
        inputs = StepInputs(ids, positions, slots, rows, torch.tensor(kept + [kept[0]] * (keep - len(kept))))
        return self.step(inputs, call.length, call.adapters)[:len(kept)]

    def step(self, inputs: StepInputs, length: int, adapters: AdapterState | None = None) -> torch.Tensor:
        """One step of ``inputs`` over the first ``length`` slots (a rung of ``ladder``):
        the logits ``[K, V]`` of its kept tokens (a graph's buffer, valid until the next
        step). The slots' owners are the caller's to write (``owners``, bit sets). Inside a
        call, or ``running`` (``lanes.Lanes``); a step of over ``GRAPH_TOKENS`` runs without a graph."""
        targets = (self._ids, self._pos, self._slots, self._who, self._keep)
        for target, values in zip(targets, (inputs.ids, inputs.positions, inputs.slots, inputs.rows, inputs.keep)):
            target[:values.shape[0]].copy_(values, non_blocking=True)
        bucket = Bucket(inputs.ids.shape[0], length, inputs.keep.shape[0], adapters)
        return self._step(bucket) if self.graphs and bucket.tokens > GRAPH_TOKENS else self._steps.run(bucket)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Hold the executor (as a call does) for one caller's ``step``s, the base model's."""
        with self._calling(()) as adapters:
            if adapters is not None:
                raise ValueError("steps through `step` run the base model; switch the adapter off first")
            yield

    def _run_decode(self, call: _Call, tokens: torch.Tensor, positions: torch.Tensor, step: int) -> torch.Tensor:
        """Logits ``[R, V]`` after feeding row ``r`` its token ``tokens[r]`` at ``positions[r]``
        (step ``step``: the slots after the prompts, one per row), padded to ``rows_bucket(R)``
        tokens of no row that write the last attention slot (real ones stop R slots short)."""
        rows, padded = tokens.shape[0], rows_bucket(tokens.shape[0])
        self._ids[:rows].copy_(tokens)
        self._pos[:rows].copy_(positions)
        if step == 0:  # the same every step but the slots; device-side, so the host never waits
            torch.arange(rows, out=self._who[:rows])
            torch.arange(padded, out=self._keep[:padded])
            pads = ((self._ids, 0), (self._pos, 0), (self._who, NO_ROW), (self._slots, call.length - 1))
            for inputs, pad in pads:
                inputs[rows:padded].fill_(pad)
        torch.add(self._who[:rows], call.packing.decode_slot + step * rows, out=self._slots[:rows])
        return self._steps.run(Bucket(padded, call.length, padded, call.adapters))[:rows]

    def _step(self, bucket: Bucket) -> torch.Tensor:
        """One model step of ``bucket`` from the fixed inputs (what a graph captures): logits ``[keep, V]``."""
        tokens, length = bucket.tokens, bucket.length
        slots, who, positions = self._slots[:tokens], self._who[:tokens], self._pos[:tokens]
        if bucket.adapters is not None and bucket.adapters.alora:
            self._adapters.write_mask(positions, who)
        masks = step_masks(slots, who, positions, self.owners, self.slot_positions, length, self.windows,
                           fold=self._group, dtype=self.dtype)
        step = StepAttention(self.attention, masks, self._chunk_count(bucket), self._own_attention)
        cache = self._caches.get(bucket)
        if cache is None:
            cache = self._caches[bucket] = SlotCache(*self.buffers.views(length), slots)
        with attention_switched(self.model):
            out = self._forward(input_ids=self._ids[None, :tokens], position_ids=positions[None],
                                attention_mask=masks[None], use_cache=True, logits_to_keep=self._keep[:bucket.keep],
                                **{STEP_KWARG: step}, **cache_kwargs(self.model, cache))
        return out.logits[0]

    def _chunk_count(self, bucket: Bucket) -> int:
        if self.attention != "split":
            return 1
        if self._chunks is not None:  # at most that many: as many as cut this bucket into pieces of 16 slots
            return kernels.chunk_count(bucket.length, 1, target=self._chunks, min_chunk=16)
        rows = self.kv_heads * -(-(self._group * bucket.tokens) // 64)  # KV heads x query blocks
        target, least = (self._sms, 256) if self.device.type == "cuda" else (8, 16)  # about a block per SM
        return kernels.chunk_count(bucket.length, rows, target=target, min_chunk=least)

    def _stats(self, call: _Call, steps: int) -> ExecStats:
        built = self._steps.stats.since(call.builds_before)
        graphed = self.graphs and call.tail_bucket <= GRAPH_TOKENS
        return ExecStats("graph" if graphed else "eager", self.compiled, self.attention, call.packing.rows,
                         call.packing.shared_tokens, call.tail_bucket, call.length, call.copied, steps,
                         built.builds, built.seconds)
