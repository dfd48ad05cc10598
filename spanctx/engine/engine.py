"""The execution engine: plans a resolved prompt against the store, runs the plan, makes
the final call. With ``executor.py`` (the model calls) and ``interpreter.py`` (the plan
steps, the store writes), the only code that runs the model or fills the store.

One call:
1. ``assemble``: lock the prompt's keys in the store, look them up, plan (``plan.py`` or
   ``placement.py``), run the plan's steps: the prompt's KV up to its tail, as slices.
2. ``run``: the final call, one value (``calls.FinalCall``: rows over stored prefixes, a
   forward or a decode, the spans to store) for every kind (a generation, logits, hidden
   states, checks and scores as rows after one context, a batch). The static executor
   (``static.py``: fixed buffers, CUDA graphs) runs it unless its ``refuses`` says why
   not; the eager executor runs the rest (``executor.py``);
3. the spans the final call computed are stored, by one rule (``run``).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import weakref
from collections.abc import Iterator, Mapping, Sequence

import attrs
import torch
from transformers import StoppingCriteriaList, StopStringCriteria

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
from .calls import Assembly, FinalCall, FinalOutput, ids_tensor
from .executor import EagerExecutor, marginal_prefill_cost
from .interpreter import Interpreter
from .lanes import Lanes
from .parallel_stats import ParallelStats, parallel_stats
from .static_layout import pack, rows_bucket
from .static_warmup import WarmUpStats
from .stopping import FirstTokenClock, with_stopping_criterion

__all__ = ["EXECUTORS", "Assembly", "Engine", "FinalCall", "FinalOutput", "KVLayoutMismatch", "ParallelStats",
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

    def _grown(self, call: FinalCall) -> str | None:
        """Grow the static buffers (up to the model's positions, at least doubling) when
        ``call`` needs more slots than they hold, reserving the bytes from the store and
        warming the new lengths up; the reason when the budget leaves no room."""
        packing = pack(call.rows)
        needed = packing.slots_needed(call.new_tokens, packing.tail_tokens)
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

    def warm_up_rows(self, rows: Sequence[int]) -> WarmUpStats | None:
        """Build the static steps of batches of each of ``rows`` rows (their tail steps and
        decode steps; counts sharing a ``rows_bucket`` share them), with the adapters
        switched on now: what a server does at start for its largest batch. None when the
        engine does not warm up."""
        counts = sorted({rows_bucket(r) for r in rows if r > 1})
        return self.static.warm_up(rows=counts) if self._warm and counts else None

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
        """``[1, S]`` on the model's device."""
        return ids_tensor(prompt.token_ids, self.device)[None]

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

    # -- the final call -----------------------------------------------------------------

    def run(self, call: FinalCall) -> FinalOutput:
        """Run ``call`` on the first executor that takes it (the static one, when set up
        and it does not refuse; else the eager one, and the output says why) and store the
        spans it computed that the store lacks (``call.store_from``). A decode's stopping
        criteria get a first-token clock, and its options what the static loop takes."""
        clock = None
        if call.decode is not None:
            clock = FirstTokenClock()
            kwargs = with_stopping_criterion(dict(call.kwargs), clock)
            call = attrs.evolve(call, kwargs=kwargs, decode=static_options(call.decode, kwargs))
        fallback = None
        if self.static is not None:
            fallback = self.static.refuses(call, sized=False) or self._grown(call) or self.static.misfit(call)
        out = (self.executor if fallback or self.static is None else self.static).run(call)
        for r in range(len(call.prompts)):
            self._store(call, out.cache, out.offsets[r] if out.offsets else 0, row=r, batch=out.batch)
        return attrs.evolve(out, fallback=fallback, first_token_at=clock.first_token_at if clock else None, cache=None,
                            kept=out.kept or tuple(row.start for row in call.rows))

    def _store(self, call: FinalCall, cache, offset: int, *, row: int = 0, batch: bool = False) -> None:
        """The store rule: prompt ``row``'s spans from ``call.store_from[row]`` on that the
        store lacks are stored from ``cache``, where the prompt starts at slot ``offset`` (of
        batch row ``row`` when ``batch``)."""
        prompt, first = call.prompts[row], call.store_from[row]
        if first is not None:
            missing = [i for i in range(first, len(prompt.segments)) if prompt.segments[i].key not in self.store]
            self.interpreter.store_spans(prompt, cache, missing, row=row if batch else 0, offset=offset)

    @contextlib.contextmanager
    def lanes(self, max_lanes: int) -> Iterator[Lanes]:
        """A continuous batch of up to ``max_lanes`` generations on the static executor
        (``lanes.Lanes``: requests join and leave between decode steps); it holds the
        executor while open. Refused without a static executor."""
        if self.static is None:
            raise ValueError("continuous batching runs on the static executor (a CUDA model, or executor='static')")
        with self.static.running():
            yield Lanes(self.static, max_lanes, self._store)

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
