"""``Runtime``: the public API. It composes the session (``spanctx.session``: resolve,
assemble, final calls, generate, stream, adapters) with the features
(``spanctx.features``), each a function of the session bound here as a method; it runs
nothing itself. Nothing in spanctx imports it but the apps (CLI, demo, bench, serve,
integrations).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cache.tiers import Tier
from .features import aio, batch, checks, scoring, states, structured, tools
from .session.session import Session

__all__ = ["Runtime"]


class Runtime(Session):
    """Generation over span contexts with a bounded, shared KV store.

    ``store_bytes`` bounds the store (default: half of free GPU memory, or a quarter of
    free RAM on CPU). Pass ``store=`` to share one store between runtimes: entries are
    namespaced by model fingerprint (every weight is read; or ``model_identity``, the
    user's promise that other weights get another identity), so they never mix.
    ``salt`` keeps this runtime's spans apart from other tenants' in a shared store
    (calls may pass their own ``salt=``). ``repair`` is the default repair mode of
    prompts with parallel groups (``Context.parallel``): "none", "head:k", "blend:r" or
    "full" (see ``spanctx.core.placement``).

    ``generation_defaults`` are generation options for every call, overridden per call
    (merge rule in ``spanctx.core.options``). ``max_concurrency`` bounds the async requests
    handed to worker threads at once (``agenerate``, ``astream``).

    ``min_reuse_fraction``: stored spans are reused only when they cover at least this
    fraction of the tokens the call must compute anyway; below it the prompt is computed
    from position 0 (see ``spanctx.core.plan``). 0 reuses every hit.

    ``executor``: what runs a call's final step and decode loop. ``"eager"``: HF's own
    forward and ``generate``. ``"static"``: fixed KV buffers (their memory is taken off the
    store's budget, grown on demand up to the model's positions) with CUDA graphs on a GPU
    (``spanctx.engine.static``); calls it refuses (generation options it does not build)
    run eagerly and the stats say why (``executor_fallback``). ``"auto"`` (default):
    static for a generating model on one CUDA device (no device map, no quantized
    weights), eager elsewhere.
    ``compile``: the static executor runs the model through ``torch.compile`` (fused
    kernels; each new shape compiles once, 25-50 s on an 8B model). ``warm_up`` (with
    graphs, not compiled): capture every single-row step at construction, so that no
    request pays a capture (``rt.engine.warm_up`` says what it cost; docs/fast-path.md).
    ``static_tokens``: slots of the static buffers (default: the model's positions, at
    most 16,384); a longer call grows them, paying a warm-up of the new lengths then, so
    size them here where long contexts are expected.
    ``close()`` (or
    leaving a ``with Runtime(...)`` block) gives the static buffers' reservation back to
    the store; a collected runtime gives it back too. What is and is not isolated between
    tenants: docs/tenancy.md.

    ``tiers``: lower tiers of the store, fastest first: URLs (``"pinned"``, ``"cpu"``,
    ``"disk:///path"``, ``"redis://host:port/0"``) or ``Tier`` objects, or a ``TierStack``.
    Spans are written through to them, fetched from them on a miss when that is expected
    to beat recomputing, and shared by every process that opens the same disk or server
    (``docs/tiers.md``; ``rt.tiers.flush()`` waits for pending writes).
    """

    # the features, as methods (each takes the session first)
    generate_batch = batch.generate_batch
    agenerate = aio.agenerate
    astream = aio.astream
    check = checks.check
    check_loop = checks.check_loop
    score = scoring.score
    rank = scoring.rank
    hidden_states = states.hidden_states
    generate_json = structured.generate_json
    tool_turn = tools.tool_turn
    run_tools = tools.run_tools

    def __repr__(self) -> str:
        name = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__
        executor = "static" if self.engine.static is not None else "eager"
        stats = self.store.stats
        return (f"Runtime(model={name!r}, device={self.device}, dtype={str(self.model.dtype).removeprefix('torch.')}, "
                f"executor={executor!r}, store={stats.entries} spans, {stats.bytes_used / 2**20:.1f} of "
                f"{stats.bytes_budget / 2**20:.0f} MiB)")

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str | None = None,
                        dtype: torch.dtype | str | None = None, device_map: str | dict | None = None,
                        quantization: str | None = None, max_gpu_memory: str | int | None = None,
                        store_bytes: int | None = None, tiers: Sequence[Tier | str] | None = None,
                        model_identity: str | None = None, **model_kwargs) -> Runtime:
        """A runtime on a preset (random weights, see ``spanctx.PRESETS``), a local model
        folder, or a hub id. Device defaults to cuda, then mps, then cpu; the loading
        options are documented in ``spanctx.loading``; ``tiers`` and ``model_identity`` are
        the constructor's."""
        from .loading import load_model

        model, tokenizer = load_model(name_or_path, device=device, dtype=dtype, device_map=device_map,
                                      quantization=quantization, max_gpu_memory=max_gpu_memory, **model_kwargs)
        return cls(model, tokenizer, store_bytes, tiers=tiers, model_identity=model_identity)
