"""The session layer: ``Runtime``, the public API. It never runs the model itself.

One request: hold the runtime (its lock, inference mode), resolve the context into one
prompt (``prompt.py``: chat, BOS, parallel groups, aLoRA invocation, salt), switch the
adapter on, let the engine assemble the prompt's cache through the store and make the
final call (``engine/``), build the stats (``results.GenerationStats``, in one place).

Features (batches, checks, scores, hidden states, rewards, JSON, tools, async) are built
on the public methods below: ``prepared`` and the final calls (``forward_tail``,
``generate_prepared``), ``holding``, ``resolve`` with ``activated``, and the row calls
(``assemble_shared``, ``forward_rows``, ``generate_rows``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path

import attrs
import torch
from transformers import TextIteratorStreamer

from . import batch, checks, scoring, states, structured
from . import tools as tools_mod
from .adapters import Activation, AdapterInfo, AdapterSet
from .chat import ChatRendering
from .engine import Assembly, Engine, StopWhenSet, with_stopping_criterion
from .index import EvictionPolicy, lru
from .keys import model_namespace
from .options import CallOptions, merge_options, seeded
from .placement import Repair
from .prompt import PromptResolver, ResolvedPrompt
from .results import GenerationStats, Result
from .scoring import Candidate, Ranked, Score
from .spans import Context
from .store import KVStore, default_budget_bytes
from .structured import JsonResult
from .tools import ToolRun, ToolTurn

__all__ = ["PreparedCall", "Runtime"]


@attrs.frozen(eq=False)
class PreparedCall:
    """A call held by ``Runtime.prepared``: its assembled prompt and when it started."""

    assembly: Assembly
    started: float

    @property
    def prompt(self) -> ResolvedPrompt:
        return self.assembly.prompt

    @property
    def input_ids(self) -> torch.Tensor:
        return self.assembly.input_ids

    @property
    def cached_tokens(self) -> int:
        return self.assembly.cached_tokens


class Runtime:
    """Generation over span contexts with a bounded, shared KV store.

    ``store_bytes`` bounds the store (default: half of free GPU memory, or a quarter of
    free RAM on CPU). Pass ``store=`` to share one store between runtimes: entries are
    namespaced by model fingerprint (every weight is read; or ``model_identity``, the
    user's promise that other weights get another identity), so they never mix.
    ``salt`` keeps this runtime's spans apart from other tenants' in a shared store
    (calls may pass their own ``salt=``). ``repair`` is the default repair mode of
    prompts with parallel groups (``Context.parallel``): "none", "head:k", "blend:r" or
    "full" (see ``spanctx.placement``).

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
                 min_reuse_fraction: float = 0.125, salt: str | None = None,
                 model_identity: str | None = None) -> None:
        if store is not None and store_bytes is not None:
            raise ValueError("pass store_bytes or store, not both")
        if not 0.0 <= min_reuse_fraction:
            raise ValueError(f"min_reuse_fraction must be >= 0, got {min_reuse_fraction}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.device
        self.namespace = model_namespace(model, model_identity)
        self.salt = _check_salt(salt)
        # not ``store or ...``: an empty KVStore is falsy (it has __len__)
        self.store = store if store is not None else KVStore(
            default_budget_bytes(self.device) if store_bytes is None else store_bytes, policy)
        self.resolver = PromptResolver(tokenizer, self.namespace, model.config.get_text_config().vocab_size)
        self.max_positions = _max_positions(model.config)
        self.repair = Repair.parse(repair)
        self._lock = threading.RLock()
        self.engine = Engine(self.model, self.store, min_reuse_fraction=min_reuse_fraction)
        self.adapters = AdapterSet(self.model, self.resolver, self.namespace)
        self.generation_defaults: dict[str, object] = dict(generation_defaults or {})
        merge_options(self.generation_defaults, {})  # reject bad defaults now, not at the first call
        self.max_concurrency = max_concurrency

    @property
    def min_reuse_fraction(self) -> float:
        return self.engine.min_reuse_fraction

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

    # -- generation ----------------------------------------------------------------------

    def token_ids(self, ctx: Context, *, adapter: str | None = None) -> list[int]:
        """The exact prompt ids of ``ctx`` (with an aLoRA ``adapter``: its invocation
        appended), the same with and without reuse."""
        with self._lock:
            return list(self.resolve(ctx, adapter=adapter)[0].token_ids)

    def generate(self, ctx: Context, max_new_tokens: int | None = None, *, reuse: bool = True,
                 adapter: str | None = None, repair: str | None = None, salt: str | None = None,
                 **generate_kwargs) -> Result:
        """Generate after ``ctx``: greedy unless sampling kwargs are given; ``seed=`` makes
        sampling reproducible; other HF ``generate`` kwargs pass through (beam search and
        several return sequences are refused: see ``spanctx.options``); unset options come
        from ``generation_defaults``. ``reuse=False`` is an ordinary full prefill of the
        same ids that neither reads nor writes the store. ``adapter`` names a loaded adapter
        (see ``add_adapter``); an aLoRA's invocation is appended to ``ctx``. ``repair``
        overrides the runtime's repair mode for parallel groups; ``salt`` the runtime's."""
        opts = self.options(max_new_tokens, **generate_kwargs)
        with self.prepared(ctx, reuse=reuse, max_new_tokens=opts.max_new_tokens, adapter=adapter, repair=repair,
                           salt=salt) as call, seeded(opts.seed, self.device):
            out, first_token_at = self.generate_prepared(call, opts)
            new_ids = tuple(out[0, call.prompt.num_tokens:].tolist())
            return Result(text=self.tokenizer.decode(new_ids, skip_special_tokens=True), token_ids=new_ids,
                          stats=self.stats(call, len(new_ids), first_token_at))

    def stream(self, ctx: Context, max_new_tokens: int | None = None, *, reuse: bool = True,
               adapter: str | None = None, repair: str | None = None, salt: str | None = None,
               **generate_kwargs) -> Iterator[str]:
        """Like ``generate``, yielding text pieces as they are decoded. Leaving the loop
        early (or closing the iterator) stops the generation within a decode step."""
        opts = self.options(max_new_tokens, **generate_kwargs)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with self.prepared(ctx, reuse=reuse, max_new_tokens=opts.max_new_tokens, adapter=adapter,
                                   repair=repair, salt=salt) as call, seeded(opts.seed, self.device):
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

    def next_token_logits(self, ctx: Context, *, reuse: bool = True, adapter: str | None = None,
                          repair: str | None = None, salt: str | None = None) -> torch.Tensor:
        """Logits ``[vocab]`` (float32, on the model's device) for the token after ``ctx``
        (with ``adapter``: after ``ctx`` and, for an aLoRA, its invocation)."""
        with self.prepared(ctx, reuse=reuse, adapter=adapter, repair=repair, salt=salt) as call:
            out, _ = self.forward_tail(call, logits_to_keep=1)
            return out.logits[0, -1].float()

    def generate_batch(self, contexts: Sequence[Context | str], max_new_tokens: int | None = None, *,
                       reuse: bool = True, salt: str | None = None, **generate_kwargs) -> list[Result]:
        """Generate after several contexts (or plain strings) in one left-padded batch, each
        row reusing its own stored spans; greedy results equal one ``generate`` per row."""
        return batch.generate_batch(self, contexts, self.options(max_new_tokens, **generate_kwargs), reuse, salt)

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

    # -- adapters and constraint checks (adapters.py, checks.py) ------------------------

    def add_adapter(self, name: str, path: str | Path, *, invocation: str | None = None) -> AdapterInfo:
        """Load the PEFT adapter folder ``path`` (LoRA, or aLoRA when its config has
        ``alora_invocation_tokens``) as ``name``. The model is adapted in place and never
        reloaded; base calls keep running on base weights. ``invocation``: the aLoRA's
        invocation text, checked against the configured token ids."""
        with self._lock:
            return self.adapters.add(name, path, invocation)

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

    # -- options and chat ------------------------------------------------------------------

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

    # -- building blocks for features (the session's public API) --------------------------

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Hold the runtime: its lock (other calls wait) and inference mode. Re-entrant."""
        with self._lock, torch.inference_mode():
            yield

    def resolve(self, ctx: Context, *, adapter: str | None = None, repair: str | Repair | None = None,
                salt: str | None = None) -> tuple[ResolvedPrompt, Activation | None]:
        """``ctx``'s prompt for a call with ``adapter`` (None: base), and what that call
        switches on."""
        info = None if adapter is None else self.adapters.get(adapter)
        prompt = self.resolver.resolve(
            ctx, repair=self.repair if repair is None else Repair.parse(repair),
            salt=self.salt if salt is None else _check_salt(salt),
            adapter_namespace=None if info is None else info.namespace,
            invocation=None if info is None else info.invocation_ids)
        return prompt, self.adapters.activation(prompt, adapter)

    def activated(self, activation: Activation | None):
        """A context that runs model calls with ``activation``'s adapter switched on."""
        return self.adapters.activated(activation)

    @contextlib.contextmanager
    def prepared(self, ctx: Context, *, reuse: bool = True, max_new_tokens: int = 0, adapter: str | None = None,
                 repair: str | None = None, salt: str | None = None) -> Iterator[PreparedCall]:
        """Hold the runtime, switch ``adapter`` on, and yield ``ctx``'s prompt with its cache
        assembled up to its tail (no cache when ``reuse=False``). The caller makes the final
        call inside the block: ``forward_tail`` or ``generate_prepared``."""
        with self.holding():
            started = time.perf_counter()
            prompt, activation = self.resolve(ctx, adapter=adapter, repair=repair, salt=salt)
            self.check_length(prompt.num_tokens + max_new_tokens)
            mode = self.repair if repair is None else Repair.parse(repair)
            with self.adapters.activated(activation):
                yield PreparedCall(self.engine.assemble(prompt, reuse=reuse, repair=mode), started)

    def forward_tail(self, call: PreparedCall, *, logits_to_keep: int | None = 1, hidden: bool = False):
        """The final forward of a prepared call: the prompt tokens its cache lacks (stored
        afterwards). Returns ``(output, cache)``; ``hidden``: the backbone's hidden states."""
        return self.engine.forward_tail(call.assembly, logits_to_keep=logits_to_keep, hidden=hidden)

    def forward_whole(self, prompt: ResolvedPrompt, *, hidden: bool, store: bool):
        """One causal forward of the whole of ``prompt`` (see ``Engine.forward_whole``)."""
        return self.engine.forward_whole(prompt, hidden=hidden, store=store)

    def generate_prepared(self, call: PreparedCall, opts: CallOptions, *, streamer=None,
                          cancel: threading.Event | None = None) -> tuple[torch.Tensor, float | None]:
        """Decode after a prepared call; ``streamer`` gets the tokens, a set ``cancel`` stops
        within a step. Returns the ids ``[1, S + N]`` and when the first new token came."""
        return self.engine.generate(call.assembly, self.generate_kwargs(opts, streamer=streamer, cancel=cancel))

    def generate_kwargs(self, opts: CallOptions, *, streamer=None, cancel: threading.Event | None = None) -> dict:
        """HF ``generate`` kwargs of a call with ``opts`` (a streamer only when streaming)."""
        kwargs = opts.hf_kwargs(self.pad_token_id)
        if streamer is not None:
            kwargs["streamer"] = streamer
        return kwargs if cancel is None else with_stopping_criterion(kwargs, StopWhenSet(cancel))

    def assemble_shared(self, prompt: ResolvedPrompt, shared: int, *, reuse: bool) -> Assembly:
        """The KV of all of the first ``shared`` spans of ``prompt`` (see ``Engine.assemble_shared``)."""
        return self.engine.assemble_shared(prompt, shared, reuse=reuse)

    def forward_rows(self, context, prompts: Sequence[ResolvedPrompt], start: int, *,
                     every_position: bool = False, store_from: int | None = None) -> torch.Tensor:
        """Rows of tokens after one shared cache (see ``Engine.forward_rows``)."""
        return self.engine.forward_rows(context, prompts, start, every_position=every_position,
                                        store_from=store_from)

    def generate_rows(self, calls: Sequence[PreparedCall], kept: Sequence[int], cached_width: int,
                      opts: CallOptions) -> tuple[torch.Tensor, float | None]:
        """Decode after several prepared calls in one left-padded batch (see ``spanctx.batch``)."""
        return self.engine.generate_rows([c.assembly for c in calls], kept, cached_width, self.generate_kwargs(opts))

    def stats(self, call: PreparedCall, new_tokens: int, first_token_at: float | None, *,
              cached_tokens: int | None = None, started: float | None = None,
              end: float | None = None) -> GenerationStats:
        """The stats of a call (the one place they are built): ``cached_tokens`` defaults to
        what the call's plan reused, ``started`` to when the call was prepared."""
        return GenerationStats.measured(
            prompt_tokens=call.prompt.num_tokens,
            cached_tokens=call.cached_tokens if cached_tokens is None else cached_tokens,
            new_tokens=new_tokens, started=call.started if started is None else started,
            first_token_at=first_token_at, end=end,
            parallel=call.assembly.parallel, executor=self.engine.executor.name)

    def check_length(self, num_tokens: int) -> None:
        """Refuse a call that would run past the model's positions."""
        if self.max_positions is not None and num_tokens > self.max_positions:
            raise ValueError(f"prompt + new tokens = {num_tokens} exceeds the model's "
                             f"{self.max_positions} positions")


def _check_salt(salt: str | None) -> str | None:
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError(f"a salt is a non-empty str (or None), got {salt!r}")
    return salt


def _max_positions(config) -> int | None:
    text = config.get_text_config()
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)

