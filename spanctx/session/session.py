"""The session layer: what one call holds and the building blocks every feature uses.

One request: hold the session (its lock, inference mode), resolve the context into one
prompt (``prompt.py``: chat, BOS, parallel groups, aLoRA invocation, salt), switch the
adapter on, let the engine assemble the prompt's cache through the store and make the
final call (``engine/``), build the stats (``results.GenerationStats``, in one place).
The session never runs the model itself. ``Runtime`` (``runtime.py``) is the user-facing
API on top; features (batches, checks, scores, hidden states, ...) use only the public
methods here: ``holding``, ``resolve`` with ``activated``, ``prepared`` and the final
calls (``forward_tail``, ``forward_whole``, ``generate_prepared``), the row calls
(``assemble_shared``, ``forward_rows``, ``generate_rows``), and ``stats``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import attrs
import torch
from transformers.generation.streamers import BaseStreamer

from ..cache.fingerprint import model_namespace
from ..cache.index import EvictionPolicy, lru
from ..cache.store import KVStore, default_budget_bytes
from ..core.chat import ChatRendering
from ..core.options import CallOptions, merge_options
from ..core.placement import Repair
from ..core.prompt import PromptResolver, ResolvedPrompt
from ..core.spans import Context
from ..engine import Assembly, Engine, Generated, StopWhenSet, with_stopping_criterion
from .adapters import Activation, AdapterSet
from .results import GenerationStats

__all__ = ["PreparedCall", "Session"]


@attrs.frozen(eq=False)
class PreparedCall:
    """A call held by ``Runtime.prepared``: its assembled prompt and when it started."""

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


class Session:
    """One model, its tokenizer, a bounded store, and the engine that runs them (see
    ``Runtime`` for the arguments)."""

    def __init__(self, model, tokenizer, store_bytes: int | None = None, *, store: KVStore | None = None,
                 policy: EvictionPolicy = lru, repair: str | Repair = "head:16",
                 generation_defaults: Mapping[str, object] | None = None,
                 min_reuse_fraction: float = 0.125, salt: str | None = None,
                 model_identity: str | None = None, executor: str = "auto", compile: bool = False) -> None:
        if store is not None and store_bytes is not None:
            raise ValueError("pass store_bytes or store, not both")
        if not 0.0 <= min_reuse_fraction:
            raise ValueError(f"min_reuse_fraction must be >= 0, got {min_reuse_fraction}")
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
        self.engine = Engine(self.model, self.store, min_reuse_fraction=min_reuse_fraction, executor=executor,
                             compile=compile)
        self.adapters = AdapterSet(self.model, self.resolver, self.namespace)
        self.generation_defaults: dict[str, object] = dict(generation_defaults or {})
        merge_options(self.generation_defaults, {})  # reject bad defaults now, not at the first call

    @property
    def min_reuse_fraction(self) -> float:
        return self.engine.min_reuse_fraction

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
            ctx, repair=self._repair_mode(repair),
            salt=self.salt if salt is None else _check_salt(salt),
            adapter_namespace=None if info is None else info.namespace,
            invocation=None if info is None else info.invocation_ids,
            invocation_in_prompt=info is not None and info.alora_start == "in_prompt")
        return prompt, self.adapters.activation(prompt, adapter)

    def _repair_mode(self, repair: str | Repair | None) -> Repair:
        """A call's repair mode: its own, else the runtime's."""
        return self.repair if repair is None else Repair.parse(repair)

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
            mode = self._repair_mode(repair)
            prompt, activation = self.resolve(ctx, adapter=adapter, repair=mode, salt=salt)
            self.check_length(prompt.num_tokens + max_new_tokens)
            with self.adapters.activated(activation):
                yield PreparedCall(self.engine.assemble(prompt, reuse=reuse, repair=mode), started, activation)

    def forward_tail(self, call: PreparedCall, *, logits_to_keep: int | None = 1, hidden: bool = False):
        """The final forward of a prepared call: the prompt tokens its cache lacks (stored
        afterwards). Returns ``(output, cache)``; ``hidden``: the backbone's hidden states."""
        return self.engine.forward_tail(call.assembly, logits_to_keep=logits_to_keep, hidden=hidden)

    def forward_whole(self, prompt: ResolvedPrompt, *, hidden: bool, store: bool):
        """One causal forward of the whole of ``prompt`` (see ``Engine.forward_whole``)."""
        return self.engine.forward_whole(prompt, hidden=hidden, store=store)

    def generate_prepared(self, call: PreparedCall, opts: CallOptions, *, streamer: BaseStreamer | None = None,
                          cancel: threading.Event | None = None, output_scores: bool = False,
                          output_logits: bool = False) -> Generated:
        """Decode after a prepared call; ``streamer`` gets the tokens, a set ``cancel`` stops
        within a step; ``output_scores`` / ``output_logits`` keep each step's."""
        kwargs = self.generate_kwargs(opts, streamer=streamer, cancel=cancel)
        return self.engine.generate(call.assembly, opts, {**kwargs, "output_scores": output_scores,
                                                          "output_logits": output_logits},
                                    adapter_on=call.activation is not None)

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
                      opts: CallOptions) -> Generated:
        """Decode after several prepared calls in one left-padded batch (see ``spanctx.batch``)."""
        return self.engine.generate_rows([c.assembly for c in calls], kept, cached_width, self.generate_kwargs(opts))

    def stats(self, call: PreparedCall, new_tokens: int, first_token_at: float | None, *,
              cached_tokens: int | None = None, started: float | None = None, end: float | None = None,
              generated: Generated | None = None) -> GenerationStats:
        """The stats of a call (the one place they are built): ``cached_tokens`` defaults to
        what the call's plan reused, ``started`` to when the call was prepared; ``generated``
        names the executor that decoded (and why not the static one)."""
        return GenerationStats.measured(
            prompt_tokens=call.prompt.num_tokens,
            cached_tokens=call.cached_tokens if cached_tokens is None else cached_tokens,
            new_tokens=new_tokens, started=call.started if started is None else started,
            first_token_at=first_token_at, end=end, parallel=call.assembly.parallel,
            executor=generated.executor if generated else "eager",
            executor_fallback=generated.fallback if generated else None)

    def check_length(self, num_tokens: int) -> None:
        """Refuse a call that would run past the model's positions."""
        if self.max_positions is not None and num_tokens > self.max_positions:
            raise ValueError(f"prompt + new tokens = {num_tokens} exceeds the model's "
                             f"{self.max_positions} positions")


def first_row(steps: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
    """Row 0 of each ``[B, V]`` step tensor (None when the call did not ask for them)."""
    return None if steps is None else tuple(step[0] for step in steps)


def _check_salt(salt: str | None) -> str | None:
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError(f"a salt is a non-empty str (or None), got {salt!r}")
    return salt


def _max_positions(config) -> int | None:
    text = config.get_text_config()
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)

