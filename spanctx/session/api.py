"""What a feature may call: the session's public protocol.

A feature (``spanctx.features``) is a function of a ``SessionAPI`` and its arguments. It
resolves contexts, makes final calls through ``engine`` (``FinalCalls``: ``run`` of a
``FinalCall`` on an assembled prompt, nothing that plans or reaches the store), reads options and
stats, and never touches the model, the store or the resolver. ``Session`` (and so
``Runtime``) satisfies it; a test may pass anything that does.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from ..engine.calls import FinalCall  # the value a feature builds for ``engine.run``

if TYPE_CHECKING:
    import torch

    from ..core.chat import ChatRendering
    from ..core.options import CallOptions
    from ..core.placement import Repair
    from ..core.prompt import ResolvedPrompt
    from ..core.spans import Context, Span
    from ..engine import Assembly, FinalOutput
    from .adapters import Activation
    from .results import GenerationStats, Result
    from .session import PreparedCall

__all__ = ["FinalCall", "FinalCalls", "SessionAPI"]


class FinalCalls(Protocol):
    """The engine as features use it, on a prompt ``prepared`` (or ``assemble_shared``)
    assembled: one final call per ``run`` (a ``FinalCall``, built by ``FinalCall.tails``,
    ``after`` or ``whole``); see ``spanctx.engine.engine.Engine``."""

    def run(self, call: FinalCall) -> FinalOutput: ...

    def assemble_shared(self, prompt: ResolvedPrompt, shared: int, *, reuse: bool) -> Assembly: ...


class SessionAPI(Protocol):
    """The session as features see it (``spanctx.session.session.Session`` documents each)."""

    tokenizer: object
    device: torch.device
    repair: Repair
    vocab_size: int
    max_concurrency: int
    engine: FinalCalls

    @property
    def generation_config(self): ...

    def options(self, max_new_tokens: int | None = None, **generate_kwargs) -> CallOptions: ...

    def generate_kwargs(self, opts: CallOptions, *, streamer=None, cancel: threading.Event | None = None) -> dict: ...

    def chat_rendering(self, ctx: Context) -> ChatRendering: ...

    def span_ids(self, span: Span) -> tuple[int, ...]: ...

    def unstored(self, prompt: ResolvedPrompt) -> set[bytes]: ...

    def holding(self, seed: int | None = None) -> contextlib.AbstractContextManager[None]: ...

    def resolve(self, ctx: Context, *, adapter: str | None = None, repair: str | Repair | None = None,
                salt: str | None = None) -> tuple[ResolvedPrompt, Activation | None]: ...

    def activated(self, activation: Activation | None) -> contextlib.AbstractContextManager[None]: ...

    def check_length(self, num_tokens: int) -> None: ...

    def prepared(self, ctx: Context, *, reuse: bool = True, max_new_tokens: int = 0, adapter: str | None = None,
                 repair: str | None = None, salt: str | None = None,
                 seed: int | None = None) -> contextlib.AbstractContextManager[PreparedCall]: ...

    def stats(self, call: PreparedCall | ResolvedPrompt, new_tokens: int, first_token_at: float | None, *,
              cached_tokens: int | None = None, started: float | None = None, end: float | None = None,
              generated: FinalOutput | None = None) -> GenerationStats: ...

    def token_ids(self, ctx: Context, *, adapter: str | None = None) -> list[int]: ...

    def generate(self, ctx: Context, max_new_tokens: int | None = None, **kwargs) -> Result: ...

    def stream(self, ctx: Context, max_new_tokens: int | None = None, **kwargs) -> Iterator[str]: ...

    def next_token_logits(self, ctx: Context, **kwargs) -> torch.Tensor: ...
