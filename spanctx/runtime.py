"""The runtime: plans a prompt against the store, assembles its cache, runs the model.

One request is: resolve the context (ids + span keys), look every span up in the store,
plan (``plan.py``), execute the plan's steps (reuse stored KV, compute missing runs),
hand the assembled cache and the full ids to the final call (``generate`` or a logits
forward), then store the spans that the final call computed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence

import attrs
import torch
from transformers import TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from . import kv as kvops
from .chat import ChatRendering
from .index import EvictionPolicy, lru
from .keys import model_namespace
from .options import CallOptions, merge_options, seeded
from .plan import Compute, Plan, Reuse, plan_prompt
from .prompt import PromptResolver, ResolvedPrompt
from .spans import Context
from .store import KVStore, SpanKV, default_budget_bytes


@attrs.frozen
class GenerationStats:
    """Where one call's prompt tokens came from, and how long it took (seconds)."""

    prompt_tokens: int
    cached_tokens: int  # reused from the store
    computed_tokens: int  # run through the model
    new_tokens: int
    ttft_s: float  # call start to the first new token on the host
    total_s: float


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
    plan: Plan | None
    input_ids: torch.Tensor  # [1, S] the whole prompt
    started: float

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
    namespaced by model fingerprint, so they never mix.

    ``generation_defaults`` are generation options for every call, overridden per call
    (merge rule in ``spanctx.options``). ``max_concurrency`` bounds the async requests
    handed to worker threads at once (``agenerate``, ``astream``).
    """

    def __init__(self, model, tokenizer, store_bytes: int | None = None, *, store: KVStore | None = None,
                 policy: EvictionPolicy = lru, generation_defaults: Mapping[str, object] | None = None,
                 max_concurrency: int = 4) -> None:
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
        self._lock = threading.RLock()
        self._kv_layout = self._probe_layout()
        self.generation_defaults: dict[str, object] = dict(generation_defaults or {})
        merge_options(self.generation_defaults, {})  # reject bad defaults now, not at the first call
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.max_concurrency = max_concurrency

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
        return list(self.resolver.resolve(ctx).token_ids)

    def generate(self, ctx: Context, max_new_tokens: int | None = None, *, reuse: bool = True,
                 **generate_kwargs) -> Result:
        """Generate after ``ctx``: greedy unless sampling kwargs are given; ``seed=`` makes
        sampling reproducible; other HF ``generate`` kwargs pass through; unset options come
        from ``generation_defaults``. ``reuse=False`` is an ordinary full prefill of the same
        ids that neither reads nor writes the store."""
        opts = self.options(max_new_tokens, **generate_kwargs)
        with self._lock, torch.inference_mode(), seeded(opts.seed, self.device):
            call = self._prepare(ctx, reuse, opts.max_new_tokens)
            timer = _FirstTokenTimer()
            out = self._generate(call, opts, timer)
            new_ids = tuple(out[0, call.prompt.num_tokens:].tolist())
            return Result(
                text=self.tokenizer.decode(new_ids, skip_special_tokens=True),
                token_ids=new_ids,
                stats=self._stats(call, len(new_ids), timer.first_token_at),
            )

    def stream(self, ctx: Context, max_new_tokens: int | None = None, *, reuse: bool = True,
               **generate_kwargs) -> Iterator[str]:
        """Like ``generate``, yielding text pieces as they are decoded."""
        opts = self.options(max_new_tokens, **generate_kwargs)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock, torch.inference_mode(), seeded(opts.seed, self.device):
                    call = self._prepare(ctx, reuse, opts.max_new_tokens)
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

    def next_token_logits(self, ctx: Context, *, reuse: bool = True) -> torch.Tensor:
        """Logits ``[vocab]`` (float32, on the model's device) for the token after ``ctx``."""
        with self._lock, torch.inference_mode():
            call = self._prepare(ctx, reuse, 0)
            tail = call.input_ids[:, call.tail_start:]
            cache = call.cache if reuse else kvops.empty_cache()
            out = self.model(input_ids=tail, past_key_values=cache, use_cache=reuse, logits_to_keep=1)
            if reuse:
                self._store_tail(call, cache)
            return out.logits[0, -1].float()

    # -- options, chat, batch, async (issue 5: chat.py, options.py, batch.py, aio.py) -------

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

    def _prepare(self, ctx: Context, reuse: bool, max_new_tokens: int) -> PreparedCall:
        started = time.perf_counter()
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

    def _generate(self, call: PreparedCall, opts: CallOptions, streamer: BaseStreamer) -> torch.Tensor:
        kwargs = opts.hf_kwargs(self.pad_token_id)
        if call.cache is not None:
            kwargs["past_key_values"] = call.cache
        out = self.model.generate(
            input_ids=call.input_ids, attention_mask=torch.ones_like(call.input_ids), streamer=streamer, **kwargs)
        if call.cache is not None:
            self._store_tail(call, call.cache)
        return out

    def _store_tail(self, call: PreparedCall, cache) -> None:
        """Store the spans the final call computed; ``cache`` holds the whole prompt now."""
        self._store_segments(call.plan.tail, call.prompt, cache)

    def _store_segments(self, step: Compute, prompt: ResolvedPrompt, cache, row: int = 0, offset: int = 0) -> None:
        """Store ``step``'s spans from batch row ``row`` of ``cache``, where the prompt starts
        at slot ``offset`` (after left padding)."""
        ranges = prompt.span_ranges()
        for i in step.segments:
            start, end = ranges[i]
            self.store.put(prompt.segments[i].key, kvops.extract(cache, offset + start, offset + end, row))

    def _stats(self, call: PreparedCall, new_tokens: int, first_token_at: float | None) -> GenerationStats:
        now = time.perf_counter()
        return GenerationStats(
            prompt_tokens=call.prompt.num_tokens,
            cached_tokens=call.cached_tokens,
            computed_tokens=call.prompt.num_tokens - call.cached_tokens,
            new_tokens=new_tokens,
            ttft_s=(first_token_at or now) - call.started,
            total_s=now - call.started,
        )

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


def _max_positions(config) -> int | None:
    text = config.get_text_config()
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
