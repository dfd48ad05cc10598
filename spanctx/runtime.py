"""The runtime: plans a prompt against the store, assembles its cache, runs the model.

One request is: resolve the context (ids + span keys), look every span up in the store,
plan (``plan.py``), execute the plan's steps (reuse stored KV, compute missing runs),
hand the assembled cache and the full ids to the final call (``generate`` or a logits
forward), then store the spans that the final call computed.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from array import array
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path

import attrs
import torch
from transformers import TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from . import checks, scoring, states, structured
from . import kv as kvops
from . import tools as tools_mod
from .adapters import AdapterInfo, AdapterSet
from .chat import ChatRendering
from .index import EvictionPolicy, lru
from .keys import model_namespace
from .logprobs import TokenLogprob, token_logprobs
from .options import CallOptions, merge_options, seeded
from .parallel import ParallelStats, build_cache, parallel_stats, resolve_layout
from .placement import PlacementPlan, Repair
from .plan import Plan, Reuse, plan_prompt
from .prompt import PromptResolver, ResolvedPrompt
from .rope import KeyMover, key_mover
from .scoring import Candidate, Ranked, Score
from .spans import Context
from .store import KVStore, SpanKV, default_budget_bytes
from .structured import JsonResult
from .tools import ToolRun, ToolTurn


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
    """One generation: the NEW tokens only, their text, and the call's stats.

    ``scores`` / ``logits``: one ``[V]`` tensor per new token, when the call asked for
    them (``output_scores`` / ``output_logits``; see ``spanctx.logprobs``)."""

    text: str
    token_ids: tuple[int, ...]
    stats: GenerationStats
    scores: tuple[torch.Tensor, ...] | None = attrs.field(default=None, eq=False, repr=False)
    logits: tuple[torch.Tensor, ...] | None = attrs.field(default=None, eq=False, repr=False)

    def logprobs(self, top: int = 0) -> tuple[TokenLogprob, ...]:
        """Each new token's log-probability and its step's ``top`` best tokens (needs a
        call with ``output_scores=True``)."""
        if self.scores is None:
            raise ValueError("this result has no scores: generate with output_scores=True")
        return token_logprobs(self.scores, self.token_ids, top)


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

    ``generation_defaults`` are generation options for every call, overridden per call
    (merge rule in ``spanctx.options``). ``max_concurrency`` bounds the async requests
    handed to worker threads at once (``agenerate``, ``astream``).

    ``min_reuse_fraction``: stored spans are reused only when they cover at least this
    fraction of the tokens the call must compute anyway; below it the prompt is computed
    from position 0 (see ``spanctx.plan``). 0 reuses every hit.
    """

    def __init__(self, model, tokenizer, store_bytes: int | None = None, *, store: KVStore | None = None,
                 policy: EvictionPolicy = lru, repair: str | Repair = "none",
                 generation_defaults: Mapping[str, object] | None = None, max_concurrency: int = 4,
                 min_reuse_fraction: float = 0.125) -> None:
        if store is not None and store_bytes is not None:
            raise ValueError("pass store_bytes or store, not both")
        if not 0.0 <= min_reuse_fraction:
            raise ValueError(f"min_reuse_fraction must be >= 0, got {min_reuse_fraction}")
        self.min_reuse_fraction = min_reuse_fraction
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.device
        self.namespace = model_namespace(model)
        # not ``store or ...``: an empty KVStore is falsy (it has __len__)
        self.store = store if store is not None else KVStore(
            default_budget_bytes(self.device) if store_bytes is None else store_bytes, policy)
        self.resolver = PromptResolver(tokenizer, self.namespace, model.config.get_text_config().vocab_size)
        self.max_positions = _max_positions(model.config)
        self.repair = Repair.parse(repair)
        self._lock = threading.RLock()
        self._kv_layout = self._probe_layout()
        self.adapters = AdapterSet(self.model, self.resolver, self.namespace)
        self.generation_defaults: dict[str, object] = dict(generation_defaults or {})
        merge_options(self.generation_defaults, {})  # reject bad defaults now, not at the first call
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.max_concurrency = max_concurrency

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str | None = None,
                        dtype: torch.dtype | str | None = None, device_map: str | dict | None = None,
                        quantization: str | None = None, max_gpu_memory: str | int | None = None,
                        store_bytes: int | None = None, **model_kwargs) -> Runtime:
        """A runtime on a preset (random weights, see ``spanctx.PRESETS``), a local model
        folder, or a hub id. Device defaults to cuda, then mps, then cpu; the loading
        options are documented in ``spanctx.loading``."""
        from .loading import load_model

        model, tokenizer = load_model(name_or_path, device=device, dtype=dtype, device_map=device_map,
                                      quantization=quantization, max_gpu_memory=max_gpu_memory, **model_kwargs)
        return cls(model, tokenizer, store_bytes)

    # -- public API --------------------------------------------------------------------

    def token_ids(self, ctx: Context, *, adapter: str | None = None) -> list[int]:
        """The exact prompt ids of ``ctx`` (with an aLoRA ``adapter`` added with
        ``alora_start="append"``: its invocation appended), the same with and without reuse."""
        with self._lock:
            if ctx.has_parallel:
                self._refuse_adapter_on_parallel(adapter)
                return list(resolve_layout(self.resolver, ctx, self.repair).token_ids)
            return list(self.adapters.resolve(ctx, adapter)[0].token_ids)

    def generate(self, ctx: Context, max_new_tokens: int | None = None, *, reuse: bool = True,
                 adapter: str | None = None, repair: str | None = None, output_scores: bool = False,
                 output_logits: bool = False, streamer: BaseStreamer | None = None, **generate_kwargs) -> Result:
        """Generate after ``ctx``: greedy unless sampling kwargs are given; ``seed=`` makes
        sampling reproducible; other HF ``generate`` kwargs pass through; unset options come
        from ``generation_defaults``. ``reuse=False`` is an ordinary full prefill of the same
        ids that neither reads nor writes the store. ``adapter`` names a loaded adapter (see
        ``add_adapter``); an aLoRA's invocation is appended to ``ctx`` or found in it (its
        ``alora_start``). ``repair`` overrides
        the runtime's repair mode for parallel groups. ``output_scores`` / ``output_logits``
        keep each new token's processed scores / raw logits on the result (see
        ``spanctx.logprobs``); ``streamer`` (an HF ``BaseStreamer``) gets the new tokens
        as they are decoded."""
        opts = self.options(max_new_tokens, **generate_kwargs)
        with self.prepared(ctx, reuse=reuse, max_new_tokens=opts.max_new_tokens, adapter=adapter,
                           repair=repair) as call, seeded(opts.seed, self.device):
            timer = _FirstTokenTimer(streamer)
            out = self._generate(call, opts, timer, output_scores=output_scores, output_logits=output_logits)
            new_ids = tuple(out.sequences[0, call.prompt.num_tokens:].tolist())
            return Result(
                text=self.tokenizer.decode(new_ids, skip_special_tokens=True),
                token_ids=new_ids,
                stats=self._stats(call, len(new_ids), timer.first_token_at),
                scores=_first_row(out.scores) if output_scores else None,
                logits=_first_row(out.logits) if output_logits else None,
            )

    def stream(self, ctx: Context, max_new_tokens: int | None = None, *, reuse: bool = True,
               adapter: str | None = None, repair: str | None = None, **generate_kwargs) -> Iterator[str]:
        """Like ``generate``, yielding text pieces as they are decoded."""
        opts = self.options(max_new_tokens, **generate_kwargs)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with self.prepared(ctx, reuse=reuse, max_new_tokens=opts.max_new_tokens, adapter=adapter,
                                   repair=repair) as call, seeded(opts.seed, self.device):
                    self._generate(call, opts, streamer)
            except BaseException as exc:  # re-raised in the consumer's thread
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from (piece for piece in streamer if piece)
        worker.join()
        if failure:
            raise failure[0]

    def next_token_logits(self, ctx: Context, *, reuse: bool = True, adapter: str | None = None,
                          repair: str | None = None) -> torch.Tensor:
        """Logits ``[vocab]`` (float32, on the model's device) for the token after ``ctx``
        (with ``adapter``: after ``ctx`` and, for an aLoRA, its invocation)."""
        return self._next_token_logits(ctx, reuse, adapter, repair)[0]

    # -- adapters and constraint checks (adapters.py, checks.py) ------------------------

    def add_adapter(self, name: str, path: str | Path, *, invocation: str | None = None,
                    alora_start: str = "append") -> AdapterInfo:
        """Load the PEFT adapter folder ``path`` (LoRA, or aLoRA when its config has
        ``alora_invocation_tokens``) as ``name``. The model is adapted in place and never
        reloaded; base calls keep running on base weights. ``invocation``: the aLoRA's
        invocation text, checked against the configured token ids. ``alora_start``: where
        an aLoRA's invocation is in a call's prompt: ``"append"`` (after the context,
        unless it ends with it) or ``"in_prompt"`` (the context holds it; the adapter
        applies from its last occurrence, as PEFT does). See ``spanctx.adapters``."""
        with self._lock:
            return self.adapters.add(name, path, invocation, alora_start)

    def list_adapters(self) -> dict[str, AdapterInfo]:
        """The loaded adapters by name, in load order."""
        with self._lock:
            return self.adapters.infos()

    def unload_adapter(self, name: str) -> None:
        """Remove adapter ``name`` from the model (its store entries age out by LRU)."""
        with self._lock:
            self.adapters.remove(name)

    def check(self, ctx: Context, requirements: Sequence[str], *, adapter: str | None = None,
              config: checks.CheckConfig = checks.DEFAULT_CHECK, reuse: bool = True,
              batch_size: int = 16) -> list[checks.Verdict]:
        """One verdict per requirement on ``ctx``; the context is assembled once and the
        checks run ``batch_size`` per forward (see ``spanctx.checks.check``)."""
        return checks.check(self, ctx, requirements, adapter=adapter, config=config, reuse=reuse,
                            batch_size=batch_size)

    def check_loop(self, ctx: Context, requirements: Sequence[str], *, adapter: str | None = None,
                   max_rounds: int = 3, max_new_tokens: int = 64, generator: str | None = None,
                   config: checks.CheckConfig = checks.DEFAULT_CHECK, feedback: str = checks.DEFAULT_FEEDBACK,
                   **generate_kwargs) -> checks.CheckLoopResult:
        """Generate, check, regenerate with the failed requirements as feedback (see
        ``spanctx.checks.check_loop``)."""
        return checks.check_loop(self, ctx, requirements, adapter=adapter, max_rounds=max_rounds,
                                 max_new_tokens=max_new_tokens, generator=generator, config=config,
                                 feedback=feedback, **generate_kwargs)

    def _next_token_logits(self, ctx: Context, reuse: bool, adapter: str | None, repair: str | None = None
                           ) -> tuple[torch.Tensor, GenerationStats]:
        with self.prepared(ctx, reuse=reuse, adapter=adapter, repair=repair) as call:
            out, _ = self.forward_tail(call, logits_to_keep=1)
            return out.logits[0, -1].float(), self._stats(call, 0, None)

    # -- scoring, states, tools, JSON output (scoring.py, states.py, tools.py, structured.py)

    def score(self, ctx: Context, candidates: Sequence[Candidate], *, reuse: bool = True,
              batch_size: int = 16) -> list[Score]:
        """Log-probabilities of each candidate after ``ctx``; the context is computed once
        (through the store) for all of them. See ``spanctx.scoring``."""
        return scoring.score(self, ctx, candidates, reuse=reuse, batch_size=batch_size)

    def rank(self, ctx: Context, candidates: Sequence[Candidate], *, by: str = "logprob",
             reuse: bool = True, batch_size: int = 16) -> list[Ranked]:
        """``candidates`` best first by ``"logprob"`` or ``"mean_logprob"``."""
        return scoring.rank(self, ctx, candidates, by=by, reuse=reuse, batch_size=batch_size)

    def hidden_states(self, ctx: Context, reduction: str = "last", *, reuse: bool = True) -> torch.Tensor:
        """An embedding ``[hidden]`` of ``ctx``: the last token's final hidden state
        (reuses the store) or the mean over all tokens (a full forward). See ``spanctx.states``."""
        return states.hidden_states(self, ctx, reduction, reuse=reuse)

    def generate_json(self, ctx: Context, format, *, max_new_tokens: int = 256, **generate_kwargs) -> JsonResult:
        """Generate a value of ``format`` (pydantic model or JSON schema) under a grammar
        mask, parsed and validated. See ``spanctx.structured``."""
        return structured.generate_json(self, ctx, format, max_new_tokens=max_new_tokens, **generate_kwargs)

    def tool_turn(self, messages: Sequence[dict], tools: Sequence, **kwargs) -> ToolTurn:
        """Render ``messages`` with ``tools``, generate, parse the tool calls. See ``spanctx.tools``."""
        return tools_mod.tool_turn(self, messages, tools, **kwargs)

    def run_tools(self, messages: Sequence[dict], tools: Sequence, **kwargs) -> ToolRun:
        """Generate, call the requested tools, append their results, repeat until a reply
        calls none. See ``spanctx.tools``."""
        return tools_mod.run_tools(self, messages, tools, **kwargs)

    # -- building blocks for calls (used by generate and the feature modules) ----------

    @contextlib.contextmanager
    def prepared(self, ctx: Context, *, reuse: bool = True, max_new_tokens: int = 0,
                 adapter: str | None = None, repair: str | None = None) -> Iterator[PreparedCall]:
        """Hold the runtime (its lock, inference mode, ``adapter`` switched on) and yield
        ``ctx``'s prompt with its cache assembled up to ``call.tail_start`` (no cache when
        ``reuse=False``). The caller runs the final model call inside the block, e.g.
        through ``forward_tail``. ``repair`` overrides the runtime's repair mode for
        parallel groups."""
        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            if ctx.has_parallel:
                self._refuse_adapter_on_parallel(adapter)
                yield self._prepare_parallel(ctx, reuse, max_new_tokens, repair, started)
                return
            prompt, activation = self.adapters.resolve(ctx, adapter)
            with self.adapters.activated(activation):
                yield self._prepare(prompt, reuse, max_new_tokens, started)

    def forward_tail(self, call: PreparedCall, module=None, **forward_kwargs):
        """Run the prompt tokens ``call``'s cache does not cover through ``module`` (default:
        the model) and, when reusing, store the spans this computed. Returns ``(output,
        cache)``, the cache now holding the whole prompt."""
        tail = call.input_ids[:, call.tail_start:]
        cache = call.cache if call.plan is not None else kvops.empty_cache()
        out = (module or self.model)(input_ids=tail, past_key_values=cache, use_cache=True, **forward_kwargs)
        if call.plan is not None:
            self.store_spans(call.prompt, cache, call.plan.tail.segments)
        return out, cache

    def store_spans(self, prompt: ResolvedPrompt, cache, segments: Sequence[int], *, row: int = 0,
                    offset: int = 0) -> None:
        """Store spans ``segments`` of ``prompt`` from batch row ``row`` of ``cache``, where
        the prompt starts at slot ``offset`` (after left padding)."""
        ranges = prompt.span_ranges()
        for i in segments:
            start, end = ranges[i]
            self.store.put(prompt.segments[i].key, kvops.extract(cache, offset + start, offset + end, row))

    # -- options, chat, batch, async (chat.py, options.py, batch.py, aio.py) ----------------

    def options(self, max_new_tokens: int | None = None, **generate_kwargs) -> CallOptions:
        """The effective options of a call with these arguments (``generation_defaults``
        under them; the rule is in ``spanctx.options``)."""
        call = dict(generate_kwargs)
        if max_new_tokens is not None:
            call["max_new_tokens"] = max_new_tokens
        return merge_options(self.generation_defaults, call)

    @property
    def pad_token_id(self) -> int | None:
        """The id that fills padding: the tokenizer's pad token, else its EOS."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def chat_rendering(self, ctx: Context) -> ChatRendering:
        """How the chat template renders the conversation in ``ctx`` and where it is cut
        into spans (``.split`` is False when some messages share a span)."""
        return self.resolver.chat.rendering(ctx.spans)

    def generate_batch(self, contexts: Sequence[Context | str], max_new_tokens: int | None = None, *,
                       reuse: bool = True, **generate_kwargs) -> list[Result]:
        """Generate after several contexts (or plain strings) in one left-padded batch, each
        row reusing its own stored spans; greedy results equal one ``generate`` per row."""
        from .batch import generate_batch

        return generate_batch(self, contexts, self.options(max_new_tokens, **generate_kwargs), reuse)

    async def agenerate(self, ctx: Context, max_new_tokens: int | None = None, *, reuse: bool = True,
                        **generate_kwargs) -> Result:
        """``generate`` in a worker thread, at most ``max_concurrency`` requests at once."""
        from .aio import agenerate

        return await agenerate(self, ctx, max_new_tokens, reuse=reuse, **generate_kwargs)

    def astream(self, ctx: Context, max_new_tokens: int | None = None, *, reuse: bool = True,
                **generate_kwargs) -> AsyncIterator[str]:
        """``stream`` as an async iterator; leaving it early stops the generation."""
        from .aio import astream

        return astream(self, ctx, max_new_tokens, reuse=reuse, **generate_kwargs)

    # -- execution ---------------------------------------------------------------------

    def _prepare(self, prompt: ResolvedPrompt, reuse: bool, max_new_tokens: int, started: float) -> PreparedCall:
        self._check_length(prompt.num_tokens + max_new_tokens)
        input_ids = self._input_ids(prompt)
        if not reuse:
            return PreparedCall(prompt, None, None, input_ids, started)
        keys = [seg.key for seg in prompt.segments]
        with self.store.locked(keys):
            found = {key: self.store.lookup(key) for key in keys}
            plan = plan_prompt(prompt.segments, lambda key: found[key] is not None, self.min_reuse_fraction)
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
                self.store_spans(prompt, cache, step.segments)
                pieces = [kvops.KVSlice.whole(kvops.as_slices(cache))]
        return kvops.assemble(pieces)

    def _generate(self, call: PreparedCall, opts: CallOptions, streamer: BaseStreamer, *,
                  output_scores: bool = False, output_logits: bool = False) -> GenerateDecoderOnlyOutput:
        kwargs = opts.hf_kwargs(self.pad_token_id)
        if call.cache is not None:
            kwargs["past_key_values"] = call.cache
        out = self.model.generate(
            input_ids=call.input_ids, attention_mask=torch.ones_like(call.input_ids), streamer=streamer,
            return_dict_in_generate=True, output_scores=output_scores, output_logits=output_logits, **kwargs)
        if call.cache is not None:
            self.store_spans(call.prompt, call.cache, call.plan.tail.segments)
        return out

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

    def _input_ids(self, prompt) -> torch.Tensor:
        """``[1, S]`` on the model's device; through an int64 buffer, because
        ``torch.tensor`` over a long tuple of ints costs milliseconds."""
        return torch.frombuffer(array("q", prompt.token_ids), dtype=torch.long)[None].to(self.device)

    # -- parallel spans (parallel.py) -------------------------------------------------------

    def _refuse_adapter_on_parallel(self, adapter: str | None) -> None:
        if adapter is not None:
            raise ValueError("adapters on prompts with parallel groups are not supported; "
                             "append the group's spans as dependent spans to use an adapter")

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
        input_ids = self._input_ids(prompt)
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
    """Records when generate hands over its first new token (the prompt comes first), and
    passes everything on to ``then`` (a caller's streamer), if any."""

    def __init__(self, then: BaseStreamer | None = None) -> None:
        self.calls = 0
        self.first_token_at: float | None = None
        self.then = then

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_at = time.perf_counter()
        if self.then is not None:
            self.then.put(value)

    def end(self) -> None:
        if self.then is not None:
            self.then.end()


def _first_row(steps: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
    """Row 0 of each ``[1, V]`` step of a batch-of-one ``generate``: ``[V]`` per step."""
    return None if steps is None else tuple(step[0] for step in steps)


def _max_positions(config) -> int | None:
    text = config.get_text_config()
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
