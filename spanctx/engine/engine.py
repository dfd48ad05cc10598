"""The execution engine: plans a resolved prompt against the store, runs the plan, makes
the final call. With ``executor.py`` (the model calls) and ``interpreter.py`` (the plan
steps, the store writes), the only code that runs the model or fills the store.

One call:
1. ``assemble``: lock the prompt's keys in the store, look them up, plan (``plan.py`` or
   ``placement.py``), run the plan's steps: a fresh cache of the prompt up to its tail.
2. a final call over that cache: ``forward_tail`` (logits or hidden states of the tail),
   ``generate`` (decoding), ``generate_rows`` (a batch of assemblies), ``forward_rows``
   (rows of tokens after one shared context: checks, scores). The static executor
   (``static.py``: fixed buffers, CUDA graphs) runs each when it can; its ``refuses``
   says why not, and the eager executor runs the call;
3. the spans the final call computed are stored.
"""

from __future__ import annotations

import functools
import gc
import weakref
from array import array
from collections.abc import Mapping, Sequence

import attrs
import torch
from transformers import StopStringCriteria, StoppingCriteriaList

from ..cache import kv as kvops
from ..cache.rope import KeyMover, key_mover
from ..cache.span_kv import SpanKV
from ..cache.store import KVStore
from ..cache.tiers import TierCallStats
from ..core.options import CallOptions
from ..core.placement import plan_placement
from ..core.plan import plan_prompt, plan_shared
from ..core.prompt import ResolvedPrompt
from ..hf import max_positions
from .calls import Assembly, Generated, RowLogits
from .executor import EagerExecutor, marginal_prefill_cost
from .interpreter import Interpreter
from .parallel_stats import ParallelStats, parallel_stats
from .static_layout import Row, pack
from .static_warmup import WarmUpStats
from .stopping import FirstTokenClock, with_stopping_criterion

__all__ = ["EXECUTORS", "Assembly", "Engine", "Generated", "KVLayoutMismatch", "ParallelStats", "RowLogits",
           "parallel_stats"]


EXECUTORS = ("auto", "eager", "static")
STATIC_TOKENS = 16384  # default slots of the static executor's buffers (prompt + new tokens)


class KVLayoutMismatch(RuntimeError):
    """A stored span does not have this model's KV layout (another model's entry)."""


def static_options(opts: CallOptions, kwargs: dict) -> CallOptions:
    """``opts`` as the static decode loop takes them: with the call's stopping criteria (the
    caller's, the first-token clock, cancellation: ``kwargs``'; stop strings as HF's own
    criterion, which matches them through the tokenizer), without the streamer (it is
    passed on its own). Stop strings without a tokenizer stay, and are refused."""
    rest = {k: v for k, v in opts.generate_kwargs.items() if k != "streamer"}
    criteria = StoppingCriteriaList(kwargs["stopping_criteria"])
    tokenizer = kwargs.get("tokenizer", rest.get("tokenizer"))
    if rest.get("stop_strings") and tokenizer is not None:
        criteria.append(StopStringCriteria(tokenizer, rest.pop("stop_strings")))
        rest.pop("tokenizer", None)
    return attrs.evolve(opts, generate_kwargs={**rest, "stopping_criteria": criteria})


def _give_back(store: KVStore, reserved: list[int]) -> None:
    store.release(reserved[0])


class Engine:
    """Runs prompts of one model over one store (see the module docstring).

    ``min_reuse_fraction``: stored spans are reused only when they cover at least this
    fraction of the tokens the call must compute anyway (``plan.py``).
    """

    def __init__(self, model, store: KVStore, *, min_reuse_fraction: float = 0.125, executor: str = "auto",
                 static_tokens: int | None = None, compile: bool = False, warm_up: bool = True) -> None:
        if executor not in EXECUTORS:
            raise ValueError(f"executor is one of {EXECUTORS}, got {executor!r}")
        self.model = model
        self.store = store
        self.min_reuse_fraction = min_reuse_fraction
        self.executor = EagerExecutor(model)  # plan steps, probes, rows, logits calls
        self.device = model.device
        # the final call and decode loop of single generations, where it can run them
        self.static = None
        generates = model.can_generate()  # a reward model (sequence classification) does not decode
        if executor == "static" and not generates:
            raise ValueError(f"executor='static' runs decoding; a {type(model).__name__} does not generate")
        # auto: one plain CUDA device (no device map, no quantized weights)
        plain_cuda = (self.device.type == "cuda" and getattr(model, "hf_device_map", None) is None
                      and not getattr(model, "is_quantized", False))
        if generates and (executor == "static" or (executor == "auto" and plain_cuda)):
            from .static import StaticExecutor

            limit = max_positions(model.config)
            self.static = StaticExecutor(model, max_tokens=static_tokens or min(limit or STATIC_TOKENS, STATIC_TOKENS),
                                         compile=compile)
            self._reserved = [0]  # bytes held off the store's budget
            self._reserve(self.static.memory_bytes)
            # given back on close() or when the engine is collected, whichever comes first
            self._release = weakref.finalize(self, _give_back, store, self._reserved)
        # every single-row bucket captured now, not on a request (compiled steps: minutes, so on first use)
        self._warm = warm_up and self.static is not None and self.static.graphs and not compile
        self.warm_up = self.static.warm_up() if self._warm else None
        self.num_layers = model.config.get_text_config().num_hidden_layers
        self.interpreter = Interpreter(self.executor, store, lambda: self.key_mover, self.num_layers)
        with torch.inference_mode():
            self.layout = self._probe_layout()

    def _reserve(self, nbytes: int) -> None:
        try:
            self.store.reserve(nbytes)
        except ValueError:  # dropped runtimes may wait in reference cycles: collect them, retry once
            gc.collect()
            self.store.reserve(nbytes)
        self._reserved[0] += nbytes

    def _grown(self, rows: Sequence[Row], new_tokens: int) -> str | None:
        """Grow the static buffers (up to the model's positions, at least doubling) when a
        call of ``rows`` needs more slots than they hold, reserving the bytes from the store
        and warming the new lengths up; the reason when the budget leaves no room."""
        packing = pack(rows)
        needed = packing.slots_needed(new_tokens, packing.tail_tokens)
        limit = max_positions(self.model.config) or needed
        if needed <= self.static.max_tokens or needed > limit:
            return None
        target = min(limit, max(needed, 2 * self.static.max_tokens))
        try:
            self._reserve(self.static.grow_bytes(target) - self.static.memory_bytes)
        except ValueError as exc:
            return f"the store's budget leaves no room to grow the static buffers to {target} slots ({exc})"
        self.static.grow(target)
        if self._warm:
            self.warm_up = self.static.warm_up()
        return None

    def warm_up_adapter(self, *, alora: bool) -> WarmUpStats | None:
        """Build the static steps of calls with the adapter switched on now, as the
        constructor does for the base model: its generations and, for an aLoRA, its checks
        (rows of one forward over a shared context). None when the engine does not warm up."""
        if not self._warm:
            return None
        stats = self.static.warm_up()
        return stats.plus(self.static.warm_up(rows=(2,), decode=False)) if alora else stats

    def forget_adapter(self, peft_name: str) -> None:
        """Drop what the static executor built with PEFT adapter ``peft_name`` (before it is unloaded)."""
        if self.static is not None:
            self.static.forget_adapter(peft_name)

    def close(self) -> None:
        """Free the static executor's buffers and give their reservation back to the
        store (once; later calls do nothing). The engine runs no static call after it."""
        if self.static is not None:
            self._release()
            self.static = None

    @functools.cached_property
    def key_mover(self) -> KeyMover:
        """How this model's cached keys move along positions (probed on first use)."""
        with torch.inference_mode():
            return key_mover(self.model, self._forward_at)

    def input_ids(self, prompt: ResolvedPrompt) -> torch.Tensor:
        """``[1, S]`` on the model's device; through an int64 buffer, because
        ``torch.tensor`` over a long tuple of ints costs milliseconds."""
        return torch.frombuffer(array("q", prompt.token_ids), dtype=torch.long)[None].to(self.device)

    # -- assembling ---------------------------------------------------------------------

    def assemble(self, prompt: ResolvedPrompt, *, reuse: bool) -> Assembly:
        """``prompt``'s cache up to its tail, through the store (nothing without ``reuse``);
        its parallel groups are placed with the repair they were resolved with."""
        repair = prompt.repair
        input_ids = self.input_ids(prompt)
        if not reuse:
            return Assembly(prompt, input_ids, None, None)
        keys = [s.key for s in prompt.segments]
        if prompt.groups and repair.kind != "none":  # only repaired groups are ever stored
            keys += [g.key for g in prompt.groups]
        fetched, tiers = self._from_tiers(prompt, keys)
        with self.store.locked(keys):
            found = self._lookup(keys, fetched)
            is_stored = lambda key: found.get(key) is not None  # noqa: E731
            if prompt.groups:
                plan = plan_placement(prompt.segments, prompt.groups, is_stored, self.key_mover.movable, repair)
            else:
                plan = plan_prompt(prompt.segments, is_stored, self.min_reuse_fraction)
            pieces = self.interpreter.assemble(plan, prompt, found, input_ids)
        stats = parallel_stats(plan, self.key_mover.reason) if prompt.groups else None
        return Assembly(prompt, input_ids, pieces, plan, stats, tiers)

    def assemble_shared(self, prompt: ResolvedPrompt, shared: int, *, reuse: bool) -> Assembly:
        """The KV of ALL of the first ``shared`` spans of ``prompt`` (a row of a batch that
        shares them), through the store when ``reuse`` (else computed and not stored)."""
        input_ids = self.input_ids(prompt)
        keys = [seg.key for seg in prompt.segments[:shared]]
        fetched, tiers = self._from_tiers(prompt, keys) if reuse else ({}, None)
        with self.store.locked(keys if reuse else []):
            found = self._lookup(keys, fetched) if reuse else {}
            plan = plan_shared(prompt.segments, shared, lambda key: found.get(key) is not None)
            pieces = self.interpreter.assemble(plan, prompt, found, input_ids, store=reuse)
        return Assembly(prompt, input_ids, pieces, plan, tiers=tiers)

    def _from_tiers(self, prompt: ResolvedPrompt, keys: Sequence[bytes]
                    ) -> tuple[dict[bytes, SpanKV], TierCallStats | None]:
        """The spans of ``keys`` that tier 0 lacks and a lower tier gives (worth fetching,
        ``cache.tiers.stack``), promoted into tier 0 by the interpreter; and what was done."""
        if self.store.tiers is None:
            return {}, None
        tokens = {seg.key: seg.num_tokens for seg in prompt.segments}
        for group in prompt.groups:
            tokens[group.key] = sum(seg.num_tokens for seg in prompt.segments[group.first:group.stop])
        wanted = {key: tokens[key] for key in dict.fromkeys(keys) if key not in self.store}
        if not wanted:
            return {}, TierCallStats()
        fetched, stats = self.store.tiers.fetch(wanted, device=self.device, layout=self.layout,
                                                bytes_per_token=self.kv_bytes_per_token,
                                                prefill_seconds=self.prefill_seconds)
        self.interpreter.promote(fetched)
        return fetched, stats

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of one token's KV on this model (keys and values of every layer)."""
        return sum(2 * heads * dim * getattr(torch, dtype.removeprefix("torch.")).itemsize
                   for heads, dim, dtype in self.layout)

    def prefill_seconds(self, num_tokens: int) -> float:
        """The expected extra cost of computing ``num_tokens`` more prompt tokens."""
        return num_tokens * self.prefill_cost

    @functools.cached_property
    def prefill_cost(self) -> float:
        """Seconds per prompt token at the margin, measured once on first use
        (``executor.marginal_prefill_cost``)."""
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None) or 4096
        return marginal_prefill_cost(self.executor, self.device, min(4096, limit))

    # -- final calls --------------------------------------------------------------------
    # Each final call offers its rows to the static executor first (``StaticExecutor.refuses``
    # says why not, and the result carries the reason), else runs them on the eager one.

    def _on_static(self, rows: Sequence[Row], **needs) -> tuple[bool, str | None]:
        """Whether the static executor runs a call of ``rows`` (``needs``: its
        ``refuses`` arguments), and why not (None when it does or is not set up)."""
        if self.static is None:
            return False, None
        reason = self._grown(rows, needs.get("new_tokens", 0)) or self.static.refuses(rows, **needs)
        return reason is None, reason

    @staticmethod
    def _row(call: Assembly, alora_start: int | None = None) -> Row:
        return Row(call.input_ids[0], tuple(call.pieces or ()), call.tail_start,
                   None if alora_start is None else call.prompt.num_tokens - alora_start)

    def _store(self, prompts: Sequence[ResolvedPrompt], cache, firsts: Sequence[int | None], *,
               offsets: Sequence[int] | None = None, batch: bool = False) -> None:
        """What every final call stores: prompt ``r``'s spans from segment ``firsts[r]`` on
        (None: none) that the store lacks, read from ``cache`` where the prompt starts at
        slot ``offsets[r]`` (default 0) of batch row ``r`` (``batch``) or of its one row."""
        for r, (prompt, first) in enumerate(zip(prompts, firsts)):
            if first is not None:
                missing = [i for i in range(first, len(prompt.segments)) if prompt.segments[i].key not in self.store]
                self.interpreter.store_spans(prompt, cache, missing, row=r if batch else 0,
                                             offset=offsets[r] if offsets else 0)

    def _store_static(self, prompts: Sequence[ResolvedPrompt], out, firsts: Sequence[int | None]) -> None:
        """``_store`` from the static buffers (``out``: its output), where the packing says."""
        packing = out.packing
        self._store(prompts, kvops.as_cache(out.kv), firsts,
                    offsets=[base - packing.shared_tokens for base in packing.bases])

    @staticmethod
    def _tail(call: Assembly) -> int | None:
        """The first segment a reusing call's final call computes (None without reuse)."""
        return call.plan.tail.segments[0] if call.plan is not None and call.plan.tail.segments else None

    def forward_tail(self, call: Assembly, *, logits_to_keep: int | None = 1, hidden: bool = False,
                     alora_start: int | None = None, kv: bool = False):
        """Run the prompt tokens ``call``'s cache does not cover; store the spans this
        computed. Returns ``(output, pieces)``: the output has ``logits`` (of the last
        ``logits_to_keep`` tokens; all with None) or, with ``hidden``, the backbone's
        states; ``pieces`` (with ``kv``, else None) the whole prompt's KV as slices that
        stay valid. ``alora_start``: the prompt index of an aLoRA's invocation."""
        row = self._row(call, alora_start)
        if not hidden and logits_to_keep and logits_to_keep <= row.num_tokens - row.start and self._on_static([row])[0]:
            out = self.static.forward([row], logits_to_keep=logits_to_keep)
            self._store_static([call.prompt], out, [self._tail(call)])
            # the buffers are overwritten by the next call: the prompt's KV is copied out
            whole = kvops.extract(kvops.as_cache(out.kv), 0, row.num_tokens) if kv else None
            return out, None if whole is None else [kvops.KVSlice.whole(whole)]
        cache = call.cache if call.cache is not None else kvops.empty_cache()
        out = self.executor.forward(call.input_ids[:, call.tail_start:], cache, logits_to_keep=logits_to_keep,
                                    hidden=hidden)
        self._store([call.prompt], cache, [self._tail(call)])
        return out, [kvops.KVSlice.whole(kvops.as_slices(cache))] if kv else None

    def forward_whole(self, prompt: ResolvedPrompt, *, hidden: bool, store: bool):
        """Run the whole of ``prompt`` from position 0 as one causal forward. With ``store``
        the spans the store lacks are stored, when the prompt has no parallel groups (a
        causal forward is not what a group's KV is)."""
        cache = kvops.empty_cache()
        out = self.executor.forward(self.input_ids(prompt), cache, logits_to_keep=None, hidden=hidden)
        self._store([prompt], cache, [0 if store and not prompt.groups else None])
        return out

    def generate(self, call: Assembly, opts: CallOptions, kwargs: dict, *,
                 alora_start: int | None = None) -> Generated:
        """Decode after ``call``'s prompt with ``opts`` (as HF ``generate`` ``kwargs``);
        store the tail's spans. ``alora_start``: the prompt index of an aLoRA's invocation."""
        row = self._row(call, alora_start)
        clock = FirstTokenClock()
        kwargs = with_stopping_criterion(kwargs, clock)
        opts = static_options(opts, kwargs)
        static, fallback = self._on_static([row], new_tokens=opts.max_new_tokens, options=opts)
        if static:
            return self._decode_static([call], [row], opts, kwargs, clock)
        out = self.executor.generate(call.input_ids, torch.ones_like(call.input_ids), call.cache,
                                     {**kwargs, "return_dict_in_generate": True})
        self._store([call.prompt], call.cache, [self._tail(call)])
        return Generated(out.sequences, clock.first_token_at, out.scores, out.logits, fallback=fallback)

    def _decode_static(self, calls: Sequence[Assembly], rows: Sequence[Row], opts: CallOptions, kwargs: dict,
                       clock: FirstTokenClock) -> Generated:
        out = self.static.generate(rows, options=opts, streamer=kwargs.get("streamer"),
                                   output_scores=bool(kwargs.get("output_scores")),
                                   output_logits=bool(kwargs.get("output_logits")))
        self._store_static([c.prompt for c in calls], out, [self._tail(c) for c in calls])
        return Generated(out.sequences, clock.first_token_at, out.scores, out.logits, executor="static",
                         static=out.stats)

    def generate_rows(self, calls: Sequence[Assembly], kept: Sequence[int], cached_width: int,
                      kwargs: dict, opts: CallOptions) -> Generated:
        """Decode after every call's prompt in one batch; store each row's tail spans.
        Sequences: ``[B, W + N]``, the prompts left-padded to the longest ``W``.

        The static executor packs the rows (the slices they share laid once). The eager
        one runs a left-padded HF batch (``batch.plan_batch``): row ``i`` keeps the first
        ``kept[i]`` tokens of its cache, the batch cache is ``cached_width`` slots.
        ``kept[i]`` is at least the call's ``keep_at_least`` (refused otherwise: the batch
        would recompute a parallel group causally and store what follows from it). Where
        it exceeds the call's cache, the missing tokens (its tail's first ones) are run
        first, causally, as the final call would run them."""
        rows = [self._row(call) for call in calls]
        clock = FirstTokenClock()
        kwargs = with_stopping_criterion(kwargs, clock)
        opts = static_options(opts, kwargs)
        static, fallback = self._on_static(rows, new_tokens=opts.max_new_tokens, options=opts)
        if static:
            return self._decode_static(calls, rows, opts, kwargs, clock)
        reuse = all(c.cache is not None for c in calls)
        for row, (call, keep) in enumerate(zip(calls, kept)):
            if reuse and keep < call.keep_at_least:
                raise ValueError(f"row {row} would keep {keep} cached tokens, fewer than its parallel group's "
                                 f"{call.keep_at_least}: the rest would be recomputed causally")
            if reuse and keep > call.tail_start:
                self.executor.forward(call.input_ids[:, call.tail_start:keep], call.cache)
        cache = kvops.stack_left_padded([c.cache for c in calls], kept, cached_width) if reuse else None
        sequences = self.executor.generate_left_padded([c.input_ids[0] for c in calls], cache, kwargs)
        if reuse:
            width = max(c.prompt.num_tokens for c in calls)
            self._store([c.prompt for c in calls], cache, [self._tail(c) for c in calls], batch=True,
                        offsets=[width - c.prompt.num_tokens for c in calls])
        return Generated(sequences, clock.first_token_at, fallback=fallback)

    def forward_rows(self, context: Sequence[kvops.KVSlice], prompts: Sequence[ResolvedPrompt], start: int, *,
                     every_position: bool = False, store_from: int | None = None,
                     alora_starts: Sequence[int] | None = None) -> RowLogits:
        """Run the tokens from ``start`` on of every prompt after ``context``, the KV of
        their common first ``start`` tokens (slices laid one after the other).

        Returns float32 logits: at each row's last token ``[B, V]``, or with
        ``every_position`` at every row position ``[B, W, V]`` (past a row's end: padding),
        with the executor that ran them.
        ``store_from``: store each row's spans from that segment on that the store lacks.
        ``alora_starts``: per row, the prompt index of an aLoRA's invocation.
        """
        rows = [Row(self.input_ids(p)[0], tuple(context), start,
                    None if alora_starts is None else p.num_tokens - alora_starts[i]) for i, p in enumerate(prompts)]
        static, fallback = self._on_static(rows)
        firsts = [store_from] * len(prompts)
        if static:
            out = self.static.forward(rows, logits_to_keep=0 if every_position else 1)
            self._store_static(prompts, out, firsts)
            logits = out.logits.float() if every_position else out.logits[:, -1].float()
            return RowLogits(logits, "static", static=out.stats)
        logits, cache = self.executor.forward_rows(context, [p.token_ids[start:] for p in prompts], start,
                                                   every_position=every_position)
        self._store(prompts, cache, firsts, batch=True)
        return RowLogits(logits, "eager", fallback)

    # -- probes and checks --------------------------------------------------------------

    def _forward_at(self, input_ids: torch.Tensor, positions: torch.Tensor) -> SpanKV:
        """The KV of ``input_ids`` ``[1, T]`` at ``positions`` ``[T]`` with no past."""
        cache = kvops.empty_cache()
        self.executor.forward(input_ids, cache, positions=positions)
        return kvops.as_slices(cache)

    def _probe_layout(self):
        """The per-layer KV layout of this model, read off a one-token forward."""
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        return kvops.layout(self._forward_at(ids, torch.zeros(1, dtype=torch.long, device=self.device)))

    def _lookup(self, keys: Sequence[bytes], fetched: Mapping[bytes, SpanKV]) -> dict[bytes, SpanKV | None]:
        """The stored KV of ``keys`` (None: missing); ``fetched`` (from the lower tiers) fills
        in where tier 0 could not keep them."""
        found = {key: self.store.lookup(key) or fetched.get(key) for key in dict.fromkeys(keys)}
        for kv in found.values():
            if kv is not None and kvops.layout(kv) != self.layout:
                raise KVLayoutMismatch(
                    "a stored span's KV layout does not match this model "
                    f"({len(kv.keys)} layers, {kvops.layout(kv)[0]} vs {self.layout[0]}): "
                    "was the store filled by another model under a colliding key?")
        return found
