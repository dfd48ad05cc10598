"""The session: one model, its store, resolver, adapters and engine behind one lock.

One request: hold the session (its lock, inference mode, the call's seed), resolve the
context into one prompt (``core.prompt``: chat, BOS, parallel groups, their repair, aLoRA
invocation, salt), switch the adapter on, let the engine assemble the prompt's cache
through the store (``prepared``) and make the final call (``engine/``), build the stats
(``stats``, the one place). The session never runs the model itself.

``generate``, ``stream``, ``next_token_logits`` and the adapter calls are the session's
own calls. Features (``spanctx.features``) use only what ``session.api.SessionAPI``
lists; ``Runtime`` (``spanctx.runtime``) composes the session and the features.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import attrs
import torch
import xxhash
from transformers import TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from ..cache.fingerprint import model_namespace
from ..cache.index import EvictionPolicy, lru
from ..cache.store import KVStore, default_budget_bytes
from ..cache.tiers import Tier, TierStack, tier_stack
from ..core import inputs
from ..core.chat import ChatRendering
from ..core.options import CallOptions, merge_options
from ..core.placement import Repair
from ..core.prompt import PromptResolver, ResolvedPrompt
from ..core.spans import Context, Span, as_context
from ..engine import Assembly, Engine, FinalCall, FinalOutput, StopWhenSet, with_stopping_criterion
from ..engine.decoding import seeded
from ..engine.interpreter import store_reads
from ..engine.static_warmup import WarmUpStats
from ..engine.vision import image_support
from ..hf import max_positions
from .adapters import Activation, AdapterInfo, AdapterSet
from .results import GenerationStats, Result

__all__ = ["PreparedCall", "Session"]


@attrs.frozen(eq=False)
class PreparedCall:
    """A call held by ``Session.prepared``: its assembled prompt and when it started."""

    assembly: Assembly
    started: float
    activation: Activation | None = None

    @property
    def prompt(self) -> ResolvedPrompt:
        return self.assembly.prompt

    @property
    def input_ids(self) -> torch.Tensor:
        return self.assembly.input_ids

    @property
    def cached_tokens(self) -> int:
        return self.assembly.cached_tokens

    @property
    def alora_start(self) -> int | None:
        """The prompt index of the call's aLoRA invocation (None: no aLoRA switched on)."""
        starts = None if self.activation is None else self.activation.alora_starts
        return None if starts is None else starts[0]

    def reused_before(self, end: int, excluding: set[bytes] = frozenset()) -> int:
        """How many prompt tokens in ``[0, end)`` this call read from the store, leaving
        out what it read under the keys ``excluding``."""
        if self.assembly.plan is None:
            return 0
        return sum(max(0, min(read_end, end) - start)
                   for key, start, read_end in store_reads(self.assembly.plan, self.prompt) if key not in excluding)


class Session:
    """One model, its tokenizer, a bounded store, and the engine that runs them (see
    ``Runtime`` for the arguments). ``engine`` is public for its final calls
    (``api.FinalCalls``)."""

    def __init__(self, model, tokenizer, store_bytes: int | None = None, *, store: KVStore | None = None,
                 policy: EvictionPolicy = lru, repair: str | Repair = "head:16",
                 generation_defaults: Mapping[str, object] | None = None,
                 min_reuse_fraction: float = 0.125, salt: str | None = None,
                 model_identity: str | None = None, executor: str = "auto", compile: bool = False,
                 warm_up: bool = True, static_tokens: int | None = None,
                 max_concurrency: int = 4,
                 tiers: TierStack | Sequence[Tier | str] | None = None) -> None:
        store_bytes = inputs.byte_count(store_bytes, "store_bytes")
        if store is not None and store_bytes is not None:
            raise ValueError("pass store_bytes or store, not both")
        if not 0.0 <= min_reuse_fraction:
            raise ValueError(f"min_reuse_fraction must be >= 0, got {min_reuse_fraction}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.max_concurrency = max_concurrency
        self.model = model.eval()
        processor = tokenizer if getattr(tokenizer, "image_processor", None) is not None else None
        self.tokenizer = tokenizer = getattr(processor, "tokenizer", tokenizer)  # a processor's own tokenizer
        self.device = model.device
        self.namespace = model_namespace(model, inputs.identity(model_identity))
        self.salt = inputs.salt(salt)
        # not ``store or ...``: an empty KVStore is falsy (it has __len__)
        self.store = store if store is not None else KVStore(
            default_budget_bytes(self.device) if store_bytes is None else store_bytes, policy)
        if model_identity is not None:  # without one, the namespace reads every weight already
            self.store.claim(self.namespace, _weight_sample(model), model_identity)
        if tiers is not None:
            if self.store.tiers is not None:
                raise ValueError("this store already has tiers: pass tiers= to the runtime that made it only")
            self.store.tiers = tier_stack(tiers)
        self.vocab_size: int = model.config.get_text_config().vocab_size
        self.resolver = PromptResolver(tokenizer, self.namespace, self.vocab_size)
        self.resolver.images = image_support(model, processor)  # None for a text model (engine/vision.py)
        self.resolver.chat.image_token = getattr(self.resolver.images, "image_token", None)
        self.max_positions = max_positions(model.config)
        self.repair = Repair.parse(repair)
        self._lock = threading.RLock()
        self._closed = False
        self.engine = Engine(self.model, self.store, min_reuse_fraction=min_reuse_fraction, executor=executor,
                             compile=compile, warm_up=warm_up, static_tokens=static_tokens)
        self.adapters = AdapterSet(self.model, self.resolver, self.namespace)
        self.adapter_warm_ups: dict[str, WarmUpStats | None] = {}  # what add_adapter's warm-up built
        self.generation_defaults: dict[str, object] = dict(generation_defaults or {})
        merge_options(self.generation_defaults, {})  # reject bad defaults now, not at the first call

    @property
    def tiers(self) -> TierStack | None:
        """The store's lower tiers (``tiers=``; ``spanctx.cache.tiers``), or None."""
        return self.store.tiers

    @property
    def min_reuse_fraction(self) -> float:
        return self.engine.min_reuse_fraction

    # -- options and chat ------------------------------------------------------------------

    def options(self, max_new_tokens: int | None = None, **generate_kwargs) -> CallOptions:
        """The effective options of a call with these arguments (``generation_defaults``
        under them; the rule is in ``spanctx.core.options``)."""
        call = dict(generate_kwargs)
        if max_new_tokens is not None:
            call["max_new_tokens"] = max_new_tokens
        return merge_options(self.generation_defaults, call)

    @property
    def pad_token_id(self) -> int | None:
        """The id that fills padding: the tokenizer's pad token, else its EOS."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    @property
    def generation_config(self):
        """The model's ``generation_config`` (its EOS ids, its decoding defaults)."""
        return self.model.generation_config

    def chat_rendering(self, ctx: Context) -> ChatRendering:
        """How the chat template renders the conversation in ``ctx`` and where it is cut
        into spans (``.split`` is False when some messages share a span)."""
        return self.resolver.chat.rendering(ctx.spans)

    def span_ids(self, span: Span) -> tuple[int, ...]:
        """The token ids of ``span`` alone (memoized)."""
        return self.resolver.span_ids(span)

    def unstored(self, prompt: ResolvedPrompt) -> set[bytes]:
        """The keys of ``prompt``'s spans that the store does not hold."""
        return {seg.key for seg in prompt.segments if seg.key not in self.store}

    # -- building blocks for features (api.SessionAPI) -----------------------------

    @contextlib.contextmanager
    def holding(self, seed: int | None = None) -> Iterator[None]:
        """Hold the session: its lock (other calls wait), inference mode and, with a
        ``seed``, freshly seeded RNGs (restored afterwards). Re-entrant. Refused once the
        session is closed."""
        with self._lock, torch.inference_mode():
            if self.closed:
                raise RuntimeError("this runtime is closed; make a new Runtime")
            with seeded(seed, self.device):
                yield

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Give the static executor's buffer reservation back to the store and refuse
        later calls. Idempotent; a runtime that is collected gives it back too."""
        with self._lock:
            self._closed = True
            self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def resolve(self, ctx: Context | str, *, adapter: str | None = None, repair: str | Repair | None = None,
                salt: str | None = None) -> tuple[ResolvedPrompt, Activation | None]:
        """``ctx``'s prompt for a call with ``adapter`` (None: base), and what that call
        switches on."""
        ctx = as_context(ctx, "this call")
        info = None if adapter is None else self.adapters.get(adapter)
        prompt = self.resolver.resolve(
            ctx, repair=self.repair if repair is None else Repair.parse(repair),
            salt=self.salt if salt is None else inputs.salt(salt),
            adapter_namespace=None if info is None else info.namespace,
            invocation=None if info is None else info.invocation_ids,
            invocation_in_prompt=info is not None and info.alora_start == "in_prompt")
        return prompt, self.adapters.activation(prompt, adapter)

    def activated(self, activation: Activation | None):
        """A context that runs model calls with ``activation``'s adapter switched on."""
        return self.adapters.activated(activation)

    @contextlib.contextmanager
    def prepared(self, ctx: Context, *, reuse: bool = True, max_new_tokens: int = 0, adapter: str | None = None,
                 repair: str | None = None, salt: str | None = None, seed: int | None = None
                 ) -> Iterator[PreparedCall]:
        """Hold the session (seeded with ``seed``), switch ``adapter`` on, and yield
        ``ctx``'s prompt with its cache assembled up to its tail (no cache when
        ``reuse=False``). The caller makes the final call inside the block:
        ``generate_prepared`` or ``engine.run(FinalCall.tails([call.assembly]))``."""
        with self.holding(seed):
            started = time.perf_counter()
            prompt, activation = self.resolve(ctx, adapter=adapter, repair=repair, salt=salt)
            self.check_length(prompt.num_tokens + max_new_tokens)
            with self.adapters.activated(activation):
                yield PreparedCall(self.engine.assemble(prompt, reuse=reuse), started, activation)

    def generate_prepared(self, call: PreparedCall, opts: CallOptions, *, streamer: BaseStreamer | None = None,
                          cancel: threading.Event | None = None, output_scores: bool = False,
                          output_logits: bool = False) -> FinalOutput:
        """Decode after a prepared call; ``streamer`` gets the tokens, a set ``cancel`` stops
        within a step; ``output_scores`` / ``output_logits`` keep each step's."""
        kwargs = self.generate_kwargs(opts, streamer=streamer, cancel=cancel)
        kwargs = {**kwargs, "output_scores": output_scores, "output_logits": output_logits}
        return self.engine.run(FinalCall.tails([call.assembly], alora_starts=[call.alora_start], decode=opts,
                                               kwargs=kwargs))

    def generate_kwargs(self, opts: CallOptions, *, streamer=None, cancel: threading.Event | None = None) -> dict:
        """HF ``generate`` kwargs of a call with ``opts`` (a streamer only when streaming)."""
        kwargs = opts.hf_kwargs(self.pad_token_id)
        if kwargs.get("stop_strings"):  # HF matches stop strings through the tokenizer's vocabulary
            kwargs["tokenizer"] = self.tokenizer
        if streamer is not None:
            kwargs["streamer"] = streamer
        return kwargs if cancel is None else with_stopping_criterion(kwargs, StopWhenSet(cancel))

    def stats(self, call: PreparedCall | ResolvedPrompt, new_tokens: int, first_token_at: float | None, *,
              cached_tokens: int | None = None, started: float | None = None, end: float | None = None,
              generated: FinalOutput | None = None) -> GenerationStats:
        """The stats of a call (the one place they are built). For a prepared ``call``,
        ``cached_tokens`` defaults to what its plan reused and ``started`` to when it was
        prepared; for a bare prompt (a row of a batched call) both are required.
        ``generated`` (the final call's ``FinalOutput``) names the executor that ran the final
        call (and why not the static one)."""
        prepared = isinstance(call, PreparedCall)
        if not prepared and (cached_tokens is None or started is None):
            raise ValueError("the stats of a bare prompt need cached_tokens and started")
        return GenerationStats.measured(
            prompt_tokens=call.prompt.num_tokens if prepared else call.num_tokens,
            cached_tokens=call.cached_tokens if cached_tokens is None else cached_tokens,
            new_tokens=new_tokens, started=call.started if started is None else started,
            first_token_at=first_token_at, end=end, parallel=call.assembly.parallel if prepared else None,
            executor=generated.executor if generated else "eager",
            executor_fallback=generated.fallback if generated else None,
            static=generated.static if generated else None,
            tiers=call.assembly.tiers if prepared else None)

    def check_length(self, num_tokens: int) -> None:
        """Refuse a call that would run past the model's positions."""
        if self.max_positions is not None and num_tokens > self.max_positions:
            raise ValueError(f"prompt + new tokens = {num_tokens} exceeds the model's "
                             f"{self.max_positions} positions")


    # -- the session's own calls --------------------------------------------------------

    def token_ids(self, ctx: Context | str, *, adapter: str | None = None) -> list[int]:
        """The exact prompt ids of ``ctx`` (with an aLoRA ``adapter``: its invocation
        appended), the same with and without reuse."""
        with self._lock:
            return list(self.resolve(ctx, adapter=adapter)[0].token_ids)

    def generate(self, ctx: Context | str, max_new_tokens: int | None = None, *, reuse: bool = True,
                 adapter: str | None = None, repair: str | None = None, salt: str | None = None,
                 output_scores: bool = False, output_logits: bool = False, streamer: BaseStreamer | None = None,
                 cancel: threading.Event | None = None, **generate_kwargs) -> Result:
        """Generate after ``ctx``: greedy unless sampling kwargs are given; ``seed=`` makes
        sampling reproducible; other HF ``generate`` kwargs pass through (beam search and
        several return sequences are refused: see ``spanctx.core.options``); unset options
        come from ``generation_defaults``. ``reuse=False`` is an ordinary full prefill of the
        same ids that neither reads nor writes the store. ``adapter`` names a loaded adapter
        (see ``add_adapter``); an aLoRA's invocation is appended to ``ctx``. ``repair``
        overrides the runtime's repair mode for parallel groups; ``salt`` the runtime's.
        ``output_scores`` / ``output_logits`` keep each new token's processed scores / raw
        logits on the result (``Result.logprobs``; see ``spanctx.session.logprobs``);
        ``streamer`` (an HF ``BaseStreamer``) gets the prompt, then the new tokens as they are
        decoded; setting ``cancel`` (a ``threading.Event``) stops decoding within a step."""
        opts = self.options(max_new_tokens, **generate_kwargs)
        with self.prepared(ctx, reuse=reuse, max_new_tokens=opts.max_new_tokens, adapter=adapter, repair=repair,
                           salt=salt, seed=opts.seed) as call:
            out = self.generate_prepared(call, opts, streamer=streamer, cancel=cancel, output_scores=output_scores,
                                         output_logits=output_logits)
            new_ids = tuple(out.sequences[0, call.prompt.num_tokens:].tolist())
            return Result(text=self.tokenizer.decode(new_ids, skip_special_tokens=True), token_ids=new_ids,
                          stats=self.stats(call, len(new_ids), out.first_token_at, generated=out),
                          scores=first_row(out.scores), logits=first_row(out.step_logits))

    def stream(self, ctx: Context | str, max_new_tokens: int | None = None, *, reuse: bool = True,
               adapter: str | None = None, repair: str | None = None, salt: str | None = None,
               cancel: threading.Event | None = None, **generate_kwargs) -> Iterator[str]:
        """Like ``generate``, yielding text pieces as they are decoded. Leaving the loop
        early (or closing the iterator) stops the generation within a decode step, as does
        setting ``cancel`` (which leaving the loop sets)."""
        opts = self.options(max_new_tokens, **generate_kwargs)  # bad arguments raise here, at the call
        return self._streamed(as_context(ctx, "stream"), opts, reuse=reuse, adapter=adapter, repair=repair,
                              salt=salt, cancel=cancel if cancel is not None else threading.Event())

    def _streamed(self, ctx: Context, opts: CallOptions, *, reuse: bool, adapter: str | None,
                  repair: str | None, salt: str | None, cancel: threading.Event) -> Iterator[str]:
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with self.prepared(ctx, reuse=reuse, max_new_tokens=opts.max_new_tokens, adapter=adapter,
                                   repair=repair, salt=salt, seed=opts.seed) as call:
                    self.generate_prepared(call, opts, streamer=streamer, cancel=cancel)
            except BaseException as exc:  # re-raised in the consumer's thread
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            yield from (piece for piece in streamer if piece)
        finally:
            cancel.set()  # a no-op once generation has ended
            worker.join()
        if failure:
            raise failure[0]

    def next_token_logits(self, ctx: Context | str, *, reuse: bool = True, adapter: str | None = None,
                          repair: str | None = None, salt: str | None = None) -> torch.Tensor:
        """Logits ``[vocab]`` (float32, on the model's device) for the token after ``ctx``
        (with ``adapter``: after ``ctx`` and, for an aLoRA, its invocation)."""
        with self.prepared(ctx, reuse=reuse, adapter=adapter, repair=repair, salt=salt) as call:
            out = self.engine.run(FinalCall.tails([call.assembly], alora_starts=[call.alora_start]))
            return out.logits[0, -1].float()

    # -- adapters (adapters.py) ------------------------------------------------------------

    def add_adapter(self, name: str, path: str | Path, *, invocation: str | None = None,
                    alora_start: str = "append") -> AdapterInfo:
        """Load the PEFT adapter folder ``path`` (LoRA, or aLoRA when its config has
        ``alora_invocation_tokens``) as ``name``. The model is adapted in place and never
        reloaded; base calls keep running on base weights. ``invocation``: the aLoRA's
        invocation text, checked against the configured token ids. ``alora_start``: where
        an aLoRA's invocation is in a call's prompt: ``"append"`` (after the context,
        unless it ends with it) or ``"in_prompt"`` (the context holds it; the adapter
        applies from its last occurrence, as PEFT does). See ``spanctx.core.prompt``.

        On a warmed-up static executor (CUDA) the adapter's steps are built now, as the
        base model's were at start-up (``adapter_warm_ups[name]`` says what it cost)."""
        with self._lock:
            info = self.adapters.add(name, path, invocation, alora_start)
            with self.adapters.activated(Activation(name, None)):  # switched on, no aLoRA offsets
                self.adapter_warm_ups[name] = self.engine.warm_up_adapter(alora=info.is_alora)
            return info

    def list_adapters(self) -> dict[str, AdapterInfo]:
        """The loaded adapters by name, in load order."""
        with self._lock:
            return self.adapters.infos()

    def unload_adapter(self, name: str) -> None:
        """Remove adapter ``name`` from the model (its store entries age out by LRU)."""
        with self._lock:
            self.engine.forget_adapter(self.adapters.peft_name(name))
            self.adapter_warm_ups.pop(name, None)
            self.adapters.remove(name)


def first_row(steps: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
    """Row 0 of each ``[B, V]`` step tensor (None when the call did not ask for them)."""
    return None if steps is None else tuple(step[0] for step in steps)


def _weight_sample(model, per_tensor: int = 64) -> bytes:
    """A digest of a few elements of the model's first, middle and last weights (strided
    views: a few KB read), to tell apart models that share one ``model_identity``."""
    params = [p for p in model.parameters() if p.device.type != "meta" and p.numel()]
    h = xxhash.xxh3_64()
    for p in {id(p): p for p in (params[0], params[len(params) // 2], params[-1])}.values() if params else ():
        flat = p.detach().reshape(-1)
        h.update(flat[:: max(1, flat.numel() // per_tensor)][:per_tensor].float().cpu().numpy().tobytes())
    return h.digest()
