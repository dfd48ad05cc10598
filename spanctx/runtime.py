"""``Runtime``: the public API, on the session layer (``session.py``). It never runs the
model itself: every call goes through the session's building blocks to the engine.

Features live in their own modules (batch, checks, scoring, states, structured, tools,
aio) and use only the session's public methods; the methods here hand calls to them.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from transformers import TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from .cache.index import EvictionPolicy, lru
from .cache.store import KVStore
from .core.placement import Repair
from .core.spans import Context
from .engine.decoding import seeded
from .features import batch, checks, scoring, states, structured
from .features import tools as tools_mod
from .features.scoring import Candidate, Ranked, Score
from .features.structured import JsonResult
from .features.tools import ToolRun, ToolTurn
from .session.adapters import AdapterInfo
from .session.results import Result
from .session.session import PreparedCall, Session, first_row

__all__ = ["PreparedCall", "Runtime"]


class Runtime(Session):
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

    ``executor``: what runs a generation's final call and decode loop. ``"eager"``: HF's
    own ``generate``. ``"static"``: fixed KV buffers (their memory is taken off the store's
    budget) with CUDA graphs on a GPU (``spanctx.engine.static``); calls it cannot run
    (adapters, per-token scores, options it does not build) run eagerly and the stats say
    why (``executor_fallback``). ``"auto"`` (default): static for a generating model on one
    CUDA device (no device map, no quantized weights), eager elsewhere.
    ``compile``: the static executor runs the model through ``torch.compile`` (fused
    kernels; each new shape compiles once, 25-50 s on an 8B model).
    """

    def __init__(self, model, tokenizer, store_bytes: int | None = None, *, store: KVStore | None = None,
                 policy: EvictionPolicy = lru, repair: str | Repair = "head:16",
                 generation_defaults: Mapping[str, object] | None = None, max_concurrency: int = 4,
                 min_reuse_fraction: float = 0.125, salt: str | None = None,
                 model_identity: str | None = None, executor: str = "auto", compile: bool = False) -> None:
        super().__init__(model, tokenizer, store_bytes, store=store, policy=policy, repair=repair,
                         generation_defaults=generation_defaults, min_reuse_fraction=min_reuse_fraction,
                         salt=salt, model_identity=model_identity, executor=executor, compile=compile)
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

    # -- generation ----------------------------------------------------------------------

    def token_ids(self, ctx: Context, *, adapter: str | None = None) -> list[int]:
        """The exact prompt ids of ``ctx`` (with an aLoRA ``adapter``: its invocation
        appended), the same with and without reuse."""
        with self._lock:
            return list(self.resolve(ctx, adapter=adapter)[0].token_ids)

    def generate(self, ctx: Context, max_new_tokens: int | None = None, *, reuse: bool = True,
                 adapter: str | None = None, repair: str | None = None, salt: str | None = None,
                 output_scores: bool = False, output_logits: bool = False, streamer: BaseStreamer | None = None,
                 **generate_kwargs) -> Result:
        """Generate after ``ctx``: greedy unless sampling kwargs are given; ``seed=`` makes
        sampling reproducible; other HF ``generate`` kwargs pass through (beam search and
        several return sequences are refused: see ``spanctx.options``); unset options come
        from ``generation_defaults``. ``reuse=False`` is an ordinary full prefill of the
        same ids that neither reads nor writes the store. ``adapter`` names a loaded adapter
        (see ``add_adapter``); an aLoRA's invocation is appended to ``ctx``. ``repair``
        overrides the runtime's repair mode for parallel groups; ``salt`` the runtime's.
        ``output_scores`` / ``output_logits`` keep each new token's processed scores / raw
        logits on the result (``Result.logprobs``; see ``spanctx.logprobs``); ``streamer``
        (an HF ``BaseStreamer``) gets the prompt, then the new tokens as they are decoded."""
        opts = self.options(max_new_tokens, **generate_kwargs)
        with self.prepared(ctx, reuse=reuse, max_new_tokens=opts.max_new_tokens, adapter=adapter, repair=repair,
                           salt=salt) as call, seeded(opts.seed, self.device):
            out = self.generate_prepared(call, opts, streamer=streamer, output_scores=output_scores,
                                         output_logits=output_logits)
            new_ids = tuple(out.sequences[0, call.prompt.num_tokens:].tolist())
            return Result(text=self.tokenizer.decode(new_ids, skip_special_tokens=True), token_ids=new_ids,
                          stats=self.stats(call, len(new_ids), out.first_token_at, generated=out),
                          scores=first_row(out.scores), logits=first_row(out.logits))

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
        from .features.aio import agenerate

        return await agenerate(self, ctx, max_new_tokens, reuse=reuse, **generate_kwargs)

    def astream(self, ctx: Context, max_new_tokens: int | None = None, *, reuse: bool = True,
                **generate_kwargs) -> AsyncIterator[str]:
        """``stream`` as an async iterator; leaving it early stops the generation."""
        from .features.aio import astream

        return astream(self, ctx, max_new_tokens, reuse=reuse, **generate_kwargs)

    # -- adapters and constraint checks (adapters.py, checks.py) ------------------------

    def add_adapter(self, name: str, path: str | Path, *, invocation: str | None = None,
                    alora_start: str = "append") -> AdapterInfo:
        """Load the PEFT adapter folder ``path`` (LoRA, or aLoRA when its config has
        ``alora_invocation_tokens``) as ``name``. The model is adapted in place and never
        reloaded; base calls keep running on base weights. ``invocation``: the aLoRA's
        invocation text, checked against the configured token ids. ``alora_start``: where
        an aLoRA's invocation is in a call's prompt: ``"append"`` (after the context,
        unless it ends with it) or ``"in_prompt"`` (the context holds it; the adapter
        applies from its last occurrence, as PEFT does). See ``spanctx.prompt``."""
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

