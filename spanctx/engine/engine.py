"""The execution engine: plans a resolved prompt against the store, runs the plan, makes
the final call. With ``executor.py`` (the model calls) and ``interpreter.py`` (the plan
steps, the store writes), the only code that runs the model or fills the store.

One call:
1. ``assemble``: lock the prompt's keys in the store, look them up, plan (``plan.py`` or
   ``placement.py``), run the plan's steps: a fresh cache of the prompt up to its tail.
2. a final call over that cache: ``forward_tail`` (logits or hidden states of the tail),
   ``generate`` (decoding), ``generate_rows`` (a left-padded batch of assemblies),
   ``forward_rows`` (rows of tokens after one shared cache: checks, scores);
3. the spans the final call computed are stored.
"""

from __future__ import annotations

import functools
import time
from array import array
from collections.abc import Sequence

import attrs
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..cache import kv as kvops
from ..cache.rope import KeyMover, key_mover
from ..cache.store import KVStore, SpanKV
from ..core.options import CallOptions
from ..core.placement import PlaceGroup, PlacementPlan, Repair, ReuseGroup, plan_placement
from ..core.plan import Plan, plan_prompt, plan_shared
from ..core.prompt import ResolvedPrompt
from .executor import EagerExecutor
from .interpreter import Interpreter

__all__ = ["EXECUTORS", "Assembly", "Engine", "FirstTokenClock", "Generated", "KVLayoutMismatch", "ParallelStats", "StopWhenSet",
           "parallel_stats",
           "with_stopping_criterion"]


EXECUTORS = ("auto", "eager", "static")
STATIC_TOKENS = 16384  # default slots of the static executor's buffers (prompt + new tokens)


@attrs.frozen
class ParallelStats:
    """What one call did with its parallel groups (token counts are prompt tokens).

    moved_tokens: reused with their keys rotated to a new position.
    fallback_tokens: computed at their place because keys cannot move on this model
        (``fallback_reason`` says why); counted in ``computed_tokens`` too.
    recomputed_tokens: run again, in place and through all layers, by ``repair``.
    checked_tokens: run through the first layers by ``blend`` to choose which tokens to
        recompute (``spanctx.placement.BLEND_CHECK_LAYER``).
    """

    repair: str
    groups: int
    moved_tokens: int
    fallback_tokens: int
    fallback_reason: str | None
    recomputed_tokens: int
    checked_tokens: int


class KVLayoutMismatch(RuntimeError):
    """A stored span does not have this model's KV layout (another model's entry)."""


@attrs.define(eq=False)
class Assembly:
    """A prompt with its KV assembled up to ``tail_start``; the final call runs the rest.

    ``pieces``: the KV of ``[0, tail_start)`` as slices laid one after the other (None
    without reuse); ``cache`` copies them into a fresh ``DynamicCache`` on first use (the
    eager final call's; a static executor copies the pieces into its own buffers).
    """

    prompt: ResolvedPrompt
    input_ids: torch.Tensor  # [1, S] the whole prompt
    pieces: list[kvops.KVSlice] | None
    plan: Plan | PlacementPlan | None  # None without reuse
    parallel: ParallelStats | None = None
    _cache: object | None = None

    @property
    def cache(self):
        """A fresh ``DynamicCache`` of ``[0, tail_start)`` (None without reuse)."""
        if self._cache is None and self.pieces is not None:
            self._cache = kvops.assemble(self.pieces)
        return self._cache

    @property
    def tail_start(self) -> int:
        return self.plan.tail.start if self.plan else 0

    @property
    def cached_tokens(self) -> int:
        return self.plan.cached_tokens if self.plan else 0


@attrs.frozen(eq=False)
class Generated:
    """What a decode made: ``sequences`` ``[B, S + N]``, when its first new token was on
    the host, per new token the ``[B, V]`` scores / logits it asked for (else None), the
    executor that ran it and, when the static one was set up but not used, why."""

    sequences: torch.Tensor
    first_token_at: float | None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    executor: str = "eager"
    fallback: str | None = None


class FirstTokenClock(StoppingCriteria):
    """Stops nothing; records when ``generate`` has its first new token on the host."""

    def __init__(self) -> None:
        self.first_token_at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        # input_ids: [B, S]
        if self.first_token_at is None:
            if input_ids.is_cuda:
                torch.cuda.synchronize(input_ids.device)
            self.first_token_at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class StopWhenSet(StoppingCriteria):
    """Stops every row of a generation once ``event`` is set (a closed stream, a
    cancelled task): within one decode step."""

    def __init__(self, event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        # input_ids: [B, S]
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def with_stopping_criterion(kwargs: dict, criterion: StoppingCriteria) -> dict:
    """HF ``generate`` ``kwargs`` with ``criterion`` after their own stopping criteria."""
    own = kwargs.get("stopping_criteria") or []
    return {**kwargs, "stopping_criteria": StoppingCriteriaList([*own, criterion])}


class Engine:
    """Runs prompts of one model over one store (see the module docstring).

    ``min_reuse_fraction``: stored spans are reused only when they cover at least this
    fraction of the tokens the call must compute anyway (``plan.py``).
    """

    def __init__(self, model, store: KVStore, *, min_reuse_fraction: float = 0.125, executor: str = "auto",
                 static_tokens: int | None = None, compile: bool = False) -> None:
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

            text = model.config.get_text_config()
            limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
            self.static = StaticExecutor(model, max_tokens=static_tokens or min(limit or STATIC_TOKENS, STATIC_TOKENS),
                                         compile=compile)
            store.reserve(self.static.memory_bytes)
        self.num_layers = model.config.get_text_config().num_hidden_layers
        self.interpreter = Interpreter(self.executor, store, lambda: self.key_mover, self.num_layers)
        with torch.inference_mode():
            self.layout = self._probe_layout()

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

    def assemble(self, prompt: ResolvedPrompt, *, reuse: bool, repair: Repair) -> Assembly:
        """``prompt``'s cache up to its tail, through the store (nothing without ``reuse``)."""
        input_ids = self.input_ids(prompt)
        if not reuse:
            return Assembly(prompt, input_ids, None, None)
        keys = [s.key for s in prompt.segments]
        if prompt.groups and repair.kind != "none":  # only repaired groups are ever stored
            keys += [g.key for g in prompt.groups]
        with self.store.locked(keys):
            found = self._lookup(keys)
            is_stored = lambda key: found.get(key) is not None  # noqa: E731
            if prompt.groups:
                plan = plan_placement(prompt.segments, prompt.groups, is_stored, self.key_mover.movable, repair)
            else:
                plan = plan_prompt(prompt.segments, is_stored, self.min_reuse_fraction)
            pieces = self.interpreter.assemble(plan, prompt, found, input_ids)
        stats = parallel_stats(plan, self.key_mover.reason) if prompt.groups else None
        return Assembly(prompt, input_ids, pieces, plan, stats)

    def assemble_shared(self, prompt: ResolvedPrompt, shared: int, *, reuse: bool) -> Assembly:
        """The KV of ALL of the first ``shared`` spans of ``prompt`` (a row of a batch that
        shares them), through the store when ``reuse`` (else computed and not stored)."""
        input_ids = self.input_ids(prompt)
        keys = [seg.key for seg in prompt.segments[:shared]]
        with self.store.locked(keys if reuse else []):
            found = self._lookup(keys) if reuse else {}
            plan = plan_shared(prompt.segments, shared, lambda key: found.get(key) is not None)
            pieces = self.interpreter.assemble(plan, prompt, found, input_ids, store=reuse)
        return Assembly(prompt, input_ids, pieces, plan)

    # -- final calls --------------------------------------------------------------------

    def forward_tail(self, call: Assembly, *, logits_to_keep: int | None = 1, hidden: bool = False):
        """Run the prompt tokens ``call``'s cache does not cover; store the spans this
        computed. Returns ``(output, cache)``, the cache now holding the whole prompt."""
        cache = call.cache if call.cache is not None else kvops.empty_cache()
        out = self.executor.forward(call.input_ids[:, call.tail_start:], cache, logits_to_keep=logits_to_keep,
                                    hidden=hidden)
        if call.plan is not None:
            self.interpreter.store_spans(call.prompt, cache, call.plan.tail.segments)
        return out, cache

    def forward_whole(self, prompt: ResolvedPrompt, *, hidden: bool, store: bool):
        """Run the whole of ``prompt`` from position 0 as one causal forward. With ``store``
        the spans the store lacks are stored, when the prompt has no parallel groups (a
        causal forward is not what a group's KV is)."""
        cache = kvops.empty_cache()
        out = self.executor.forward(self.input_ids(prompt), cache, logits_to_keep=None, hidden=hidden)
        if store and not prompt.groups:
            missing = [i for i, seg in enumerate(prompt.segments) if seg.key not in self.store]
            self.interpreter.store_spans(prompt, cache, missing)
        return out

    def generate(self, call: Assembly, opts: CallOptions, kwargs: dict, *, adapter_on: bool = False) -> Generated:
        """Decode after ``call``'s prompt with ``opts`` (as HF ``generate`` ``kwargs``);
        store the tail's spans. The static executor runs it when it was set up and can
        (``adapter_on``: an adapter is switched on, which it leaves to the eager one)."""
        fallback = self._static_refusal(call, opts, kwargs, adapter_on)
        if self.static is not None and fallback is None:
            return self._generate_static(call, opts, kwargs)
        clock = FirstTokenClock()
        kwargs = {**with_stopping_criterion(kwargs, clock), "return_dict_in_generate": True}
        out = self.executor.generate(call.input_ids, torch.ones_like(call.input_ids), call.cache, kwargs)
        if call.plan is not None:
            self.interpreter.store_spans(call.prompt, call.cache, call.plan.tail.segments)
        return Generated(out.sequences, clock.first_token_at, out.scores, out.logits, fallback=fallback)

    def _static_refusal(self, call: Assembly, opts: CallOptions, kwargs: dict, adapter_on: bool) -> str | None:
        """Why the static executor does not run this call (None: it does, or is not set up)."""
        if self.static is None:
            return None
        if adapter_on:
            return "adapter calls run on the eager executor"
        if kwargs.get("output_scores") or kwargs.get("output_logits"):
            return "per-token scores and logits are kept by the eager executor"
        return self.static.unsupported(batch=1, num_tokens=call.prompt.num_tokens + opts.max_new_tokens,
                                       options=opts)

    def _generate_static(self, call: Assembly, opts: CallOptions, kwargs: dict) -> Generated:
        """The static executor's decode: the prefix slices are copied into its buffers once."""
        clock = FirstTokenClock()
        criteria = with_stopping_criterion(kwargs, clock)["stopping_criteria"]
        opts = attrs.evolve(opts, generate_kwargs={**opts.generate_kwargs, "stopping_criteria": criteria})
        out = self.static.generate(call.pieces or [], call.input_ids, call.tail_start, options=opts,
                                   streamer=kwargs.get("streamer"))
        if call.plan is not None:
            self.interpreter.store_spans(call.prompt, kvops.as_cache(out.prompt_kv), call.plan.tail.segments)
        return Generated(out.sequences, clock.first_token_at, executor="static")

    def generate_rows(self, calls: Sequence[Assembly], kept: Sequence[int], cached_width: int,
                      kwargs: dict) -> Generated:
        """Decode after every call's prompt in one left-padded batch (``batch.plan_batch``:
        row ``i`` keeps the first ``kept[i]`` tokens of its cache, the batch cache is
        ``cached_width`` slots); store each row's tail spans. Sequences: ``[B, W + N]``."""
        width = max(c.prompt.num_tokens for c in calls)
        pad_id = kwargs["pad_token_id"]
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token: pass pad_token_id=...")
        input_ids = torch.full((len(calls), width), pad_id, dtype=torch.long, device=self.device)
        attention_mask = torch.zeros_like(input_ids)
        for row, call in enumerate(calls):
            input_ids[row, width - call.prompt.num_tokens:] = call.input_ids[0]
            attention_mask[row, width - call.prompt.num_tokens:] = 1
        reuse = all(c.cache is not None for c in calls)
        cache = kvops.stack_left_padded([c.cache for c in calls], kept, cached_width) if reuse else None
        clock = FirstTokenClock()
        kwargs = with_stopping_criterion(kwargs, clock)
        out = self.executor.generate(input_ids, attention_mask, cache, kwargs)
        if reuse:
            for row, call in enumerate(calls):
                self.interpreter.store_spans(call.prompt, cache, call.plan.tail.segments, row=row,
                                             offset=width - call.prompt.num_tokens)
        return Generated(out, clock.first_token_at)

    def forward_rows(self, context, prompts: Sequence[ResolvedPrompt], start: int, *, every_position: bool,
                     store_from: int | None) -> torch.Tensor:
        """Run the tokens from ``start`` on of every prompt as one right-padded batch after
        the first ``start`` slots of ``context`` (the KV of their common tokens). No mask
        is needed: attention is causal and every row's tokens sit in the same slots, so a
        row's tokens never see the padding after them.

        Returns float32 logits: at each row's last token ``[B, V]``, or with
        ``every_position`` at every row position ``[B, W, V]`` (past a row's end: padding).
        ``store_from``: store each row's spans from that segment on that the store lacks.
        """
        tails = [p.token_ids[start:] for p in prompts]
        width = max(len(tail) for tail in tails)
        # padding: id 0, after a row's last token, so none of the row's tokens attends to it
        ids = torch.tensor([list(tail) + [0] * (width - len(tail)) for tail in tails], device=self.device)
        cache = kvops.repeat_batch(context, len(tails), start)
        if every_position:
            out = self.executor.forward(ids, cache, logits_to_keep=0)
            logits = out.logits.float()  # [B, W, V]
        else:
            last = torch.tensor([len(tail) - 1 for tail in tails], device=self.device)  # [B]
            keep = torch.unique(last)  # [K] sorted columns whose logits are read
            out = self.executor.forward(ids, cache, logits_to_keep=keep)  # logits: [B, K, V]
            logits = out.logits[torch.arange(len(tails), device=self.device), torch.searchsorted(keep, last)].float()
        if store_from is not None:
            for row, prompt in enumerate(prompts):
                missing = [j for j in range(store_from, len(prompt.segments))
                           if prompt.segments[j].key not in self.store]
                self.interpreter.store_spans(prompt, cache, missing, row=row)
        return logits

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

    def _lookup(self, keys: Sequence[bytes]) -> dict[bytes, SpanKV | None]:
        found = {key: self.store.lookup(key) for key in dict.fromkeys(keys)}
        for kv in found.values():
            if kv is not None and kvops.layout(kv) != self.layout:
                raise KVLayoutMismatch(
                    "a stored span's KV layout does not match this model "
                    f"({len(kv.keys)} layers, {kvops.layout(kv)[0]} vs {self.layout[0]}): "
                    "was the store filled by another model under a colliding key?")
        return found


def parallel_stats(plan: PlacementPlan, reason: str | None) -> ParallelStats:
    """What ``plan`` does with its groups; ``reason``: why keys cannot move, if they cannot."""
    return ParallelStats(
        repair=str(plan.repair),
        groups=sum(1 for s in plan.steps if isinstance(s, (PlaceGroup, ReuseGroup))),
        moved_tokens=plan.moved_tokens,
        fallback_tokens=plan.fallback_tokens,
        fallback_reason=reason if plan.fallback_tokens else None,
        recomputed_tokens=plan.recomputed_tokens,
        checked_tokens=plan.checked_tokens,
    )
