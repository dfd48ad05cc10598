"""The runtime: plans a prompt against the store, assembles its cache, runs the model.

One request is: resolve the context (ids + span keys), look every span up in the store,
plan (``plan.py``), execute the plan's steps (reuse stored KV, compute missing runs),
hand the assembled cache and the full ids to the final call (``generate`` or a logits
forward), then store the spans that the final call computed.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator

import attrs
import torch
from transformers import TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from . import kv as kvops
from .index import EvictionPolicy, lru
from .keys import model_namespace
from .parallel import ParallelStats, build_cache, parallel_stats, resolve_layout
from .placement import PlacementPlan, Repair
from .plan import Compute, Plan, Reuse, plan_prompt
from .prompt import PromptResolver, ResolvedPrompt
from .rope import KeyMover, key_mover
from .spans import Context
from .store import KVStore, SpanKV, default_budget_bytes

SAMPLING_KWARGS = ("temperature", "top_p", "top_k", "min_p", "typical_p")


@attrs.frozen
class GenerationStats:
    """Where one call's prompt tokens came from, and how long it took (seconds)."""

    prompt_tokens: int
    cached_tokens: int  # reused from the store
    computed_tokens: int  # run through the model
    new_tokens: int
    ttft_s: float  # call start to the first new token on the host
    total_s: float
    # prompt tokens whose KV was already placed and was computed again, in place, by
    # ``repair`` (parallel spans); not part of computed_tokens
    recomputed_tokens: int = 0
    parallel: ParallelStats | None = None  # details, for prompts with parallel groups


@attrs.frozen
class Result:
    """One generation: the NEW tokens only, their text, and the call's stats."""

    text: str
    token_ids: tuple[int, ...]
    stats: GenerationStats


@attrs.frozen(eq=False)
class PreparedCall:
    """A prompt whose cache is assembled up to ``tail_start``; the final call runs the rest."""

    prompt: ResolvedPrompt
    cache: object  # a DynamicCache covering [0, tail_start), or None without reuse
    plan: Plan | PlacementPlan | None
    input_ids: torch.Tensor  # [1, S] the whole prompt
    started: float
    parallel: ParallelStats | None = None

    @property
    def tail_start(self) -> int:
        return self.plan.tail.start if self.plan else 0

    @property
    def cached_tokens(self) -> int:
        return self.plan.cached_tokens if self.plan else 0


class KVLayoutMismatch(RuntimeError):
    """A stored span does not have this model's KV layout (another model's entry)."""


class Runtime:
    """Generation over span contexts with a bounded, shared KV store.

    ``store_bytes`` bounds the store (default: half of free GPU memory, or a quarter of
    free RAM on CPU). Pass ``store=`` to share one store between runtimes: entries are
    namespaced by model fingerprint, so they never mix. ``repair`` is the default repair
    mode of prompts with parallel groups (``Context.parallel``): "none", "head:k",
    "blend:r" or "full" (see ``spanctx.placement``).
    """

    def __init__(self, model, tokenizer, store_bytes: int | None = None, *, store: KVStore | None = None,
                 policy: EvictionPolicy = lru, repair: str | Repair = "none") -> None:
        if store is not None and store_bytes is not None:
            raise ValueError("pass store_bytes or store, not both")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.device
        self.namespace = model_namespace(model)
        self.store = store or KVStore(
            default_budget_bytes(self.device) if store_bytes is None else store_bytes, policy)
        self.resolver = PromptResolver(tokenizer, self.namespace, model.config.get_text_config().vocab_size)
        self.max_positions = _max_positions(model.config)
        self.repair = Repair.parse(repair)
        self._lock = threading.RLock()
        self._kv_layout = self._probe_layout()

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str | None = None, dtype: torch.dtype | None = None,
                        store_bytes: int | None = None, **model_kwargs) -> Runtime:
        """A runtime on a preset (random weights, see ``spanctx.PRESETS``), a local model
        folder, or a hub id. Device defaults to cuda, then mps, then cpu."""
        from .presets import PRESETS, load_preset

        device = device or default_device()
        if name_or_path in PRESETS:
            model, tokenizer = load_preset(name_or_path, device=device, dtype=dtype, **model_kwargs)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or "auto", **model_kwargs)
            model.to(device)
        return cls(model, tokenizer, store_bytes)

    # -- public API --------------------------------------------------------------------

    def token_ids(self, ctx: Context) -> list[int]:
        """The exact prompt ids of ``ctx``, the same with and without reuse."""
        if ctx.has_parallel:
            return list(resolve_layout(self.resolver, ctx, self.repair).token_ids)
        return list(self.resolver.resolve(ctx).token_ids)

    def generate(self, ctx: Context, max_new_tokens: int = 32, *, reuse: bool = True, repair: str | None = None,
                 **generate_kwargs) -> Result:
        """Generate after ``ctx``: greedy unless sampling kwargs are given; other HF
        ``generate`` kwargs pass through. ``reuse=False`` is an ordinary full prefill of the
        same ids that neither reads nor writes the store. ``repair`` overrides the
        runtime's repair mode for parallel groups."""
        with self._lock, torch.inference_mode():
            call = self._prepare(ctx, reuse, max_new_tokens, repair)
            timer = _FirstTokenTimer()
            out = self._generate(call, max_new_tokens, timer, generate_kwargs)
            new_ids = tuple(out[0, call.prompt.num_tokens:].tolist())
            return Result(
                text=self.tokenizer.decode(new_ids, skip_special_tokens=True),
                token_ids=new_ids,
                stats=self._stats(call, len(new_ids), timer.first_token_at),
            )

    def stream(self, ctx: Context, max_new_tokens: int = 32, *, reuse: bool = True, repair: str | None = None,
               **generate_kwargs) -> Iterator[str]:
        """Like ``generate``, yielding text pieces as they are decoded."""
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    call = self._prepare(ctx, reuse, max_new_tokens, repair)
                    self._generate(call, max_new_tokens, streamer, generate_kwargs)
            except BaseException as exc:  # re-raised in the consumer's thread
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from (piece for piece in streamer if piece)
        worker.join()
        if failure:
            raise failure[0]

    def next_token_logits(self, ctx: Context, *, reuse: bool = True, repair: str | None = None) -> torch.Tensor:
        """Logits ``[vocab]`` (float32, on the model's device) for the token after ``ctx``."""
        with self._lock, torch.inference_mode():
            call = self._prepare(ctx, reuse, 0, repair)
            tail = call.input_ids[:, call.tail_start:]
            cache = call.cache if reuse else kvops.empty_cache()
            out = self.model(input_ids=tail, past_key_values=cache, use_cache=reuse, logits_to_keep=1)
            if reuse:
                self._store_tail(call, cache)
            return out.logits[0, -1].float()

    # -- execution ---------------------------------------------------------------------

    def _prepare(self, ctx: Context, reuse: bool, max_new_tokens: int, repair: str | None = None) -> PreparedCall:
        started = time.perf_counter()
        if ctx.has_parallel:
            return self._prepare_parallel(ctx, reuse, max_new_tokens, repair, started)
        prompt = self.resolver.resolve(ctx)
        self._check_length(prompt.num_tokens + max_new_tokens)
        input_ids = torch.tensor([prompt.token_ids], dtype=torch.long, device=self.device)
        if not reuse:
            return PreparedCall(prompt, None, None, input_ids, started)
        keys = [seg.key for seg in prompt.segments]
        with self.store.locked(keys):
            found = {key: self.store.lookup(key) for key in keys}
            plan = plan_prompt(prompt.segments, lambda key: found[key] is not None)
            cache = self._execute(plan, prompt, found, input_ids)
        return PreparedCall(prompt, cache, plan, input_ids, started)

    def _execute(self, plan: Plan, prompt: ResolvedPrompt, found: dict[bytes, SpanKV | None],
                 input_ids: torch.Tensor):
        """Run the plan's steps; returns a fresh cache covering ``[0, plan.tail.start)``."""
        ranges = prompt.span_ranges()
        pieces: list[kvops.KVSlice] = []
        for step in plan.steps:
            if isinstance(step, Reuse):
                kv = found[prompt.segments[step.segment].key]
                self._check_layout(kv)
                offset = ranges[step.segment][0]
                pieces.append(kvops.KVSlice(kv, step.start - offset, step.end - offset))
            else:
                cache = kvops.assemble(pieces)
                self.model(input_ids=input_ids[:, step.start:step.end], past_key_values=cache, use_cache=True,
                           logits_to_keep=1)
                self._store_segments(step, prompt, cache)
                pieces = [kvops.KVSlice.whole(kvops.as_slices(cache))]
        return kvops.assemble(pieces)

    def _generate(self, call: PreparedCall, max_new_tokens: int, streamer: BaseStreamer,
                  generate_kwargs: dict) -> torch.Tensor:
        kwargs = _generation_kwargs(generate_kwargs, self.tokenizer)
        if call.cache is not None:
            kwargs["past_key_values"] = call.cache
        out = self.model.generate(
            input_ids=call.input_ids, attention_mask=torch.ones_like(call.input_ids),
            max_new_tokens=max_new_tokens, streamer=streamer, **kwargs)
        if call.cache is not None:
            self._store_tail(call, call.cache)
        return out

    def _store_tail(self, call: PreparedCall, cache) -> None:
        """Store the spans the final call computed; ``cache`` holds the whole prompt now."""
        self._store_segments(call.plan.tail, call.prompt, cache)

    def _store_segments(self, step: Compute, prompt: ResolvedPrompt, cache) -> None:
        ranges = prompt.span_ranges()
        for i in step.segments:
            start, end = ranges[i]
            self.store.put(prompt.segments[i].key, kvops.extract(cache, start, end))

    def _stats(self, call: PreparedCall, new_tokens: int, first_token_at: float | None) -> GenerationStats:
        now = time.perf_counter()
        return GenerationStats(
            prompt_tokens=call.prompt.num_tokens,
            cached_tokens=call.cached_tokens,
            computed_tokens=call.prompt.num_tokens - call.cached_tokens,
            new_tokens=new_tokens,
            ttft_s=(first_token_at or now) - call.started,
            total_s=now - call.started,
            recomputed_tokens=call.parallel.recomputed_tokens if call.parallel else 0,
            parallel=call.parallel,
        )

    # -- parallel spans (issue 3): see parallel.py ------------------------------------------

    @functools.cached_property
    def key_mover(self) -> KeyMover:
        """How this model's cached keys move along positions (probed on first use)."""
        with torch.inference_mode():
            return key_mover(self.model)

    def _prepare_parallel(self, ctx: Context, reuse: bool, max_new_tokens: int, repair: str | None,
                          started: float) -> PreparedCall:
        mode = self.repair if repair is None else Repair.parse(repair)
        prompt = resolve_layout(self.resolver, ctx, mode)
        self._check_length(prompt.num_tokens + max_new_tokens)
        input_ids = torch.tensor([prompt.token_ids], dtype=torch.long, device=self.device)
        if not reuse:
            return PreparedCall(prompt, None, None, input_ids, started)
        plan, cache = build_cache(self, prompt, input_ids, mode)
        stats = parallel_stats(plan, self.key_mover.reason)
        return PreparedCall(prompt, cache, plan, input_ids, started, stats)

    # -- checks ------------------------------------------------------------------------

    def _probe_layout(self):
        """The per-layer KV layout of this model, read off a one-token forward."""
        with torch.inference_mode():
            cache = kvops.empty_cache()
            ids = torch.tensor([[self.tokenizer.eos_token_id or 0]], device=self.device)
            self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            return kvops.layout(kvops.as_slices(cache))

    def _check_layout(self, kv: SpanKV) -> None:
        if kvops.layout(kv) != self._kv_layout:
            raise KVLayoutMismatch(
                "a stored span's KV layout does not match this model "
                f"({len(kv.keys)} layers, {kvops.layout(kv)[0]} vs {self._kv_layout[0]}): "
                "was the store filled by another model under a colliding key?")

    def _check_length(self, num_tokens: int) -> None:
        if self.max_positions is not None and num_tokens > self.max_positions:
            raise ValueError(f"prompt + new tokens = {num_tokens} exceeds the model's "
                             f"{self.max_positions} positions")


class _FirstTokenTimer(BaseStreamer):
    """Records when generate hands over its first new token (the prompt comes first)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def _generation_kwargs(user: dict, tokenizer) -> dict:
    """Greedy unless sampling is asked for; a pad id so HF does not warn."""
    kwargs = dict(user)
    if "do_sample" not in kwargs:
        kwargs["do_sample"] = any(k in kwargs for k in SAMPLING_KWARGS)
    if not kwargs["do_sample"]:
        for k in SAMPLING_KWARGS:
            kwargs.setdefault(k, None)
    if "pad_token_id" not in kwargs:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs["pad_token_id"] = pad
    return kwargs


def _max_positions(config) -> int | None:
    text = config.get_text_config()
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
