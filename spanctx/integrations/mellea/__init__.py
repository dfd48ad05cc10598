"""spanctx as a Mellea backend (the ``mellea`` extra: ``pip install 'spanctx[mellea]'``).

``SpanctxBackend`` is Mellea's ``LocalHFBackend`` with every model call run by spanctx:
construct it like ``LocalHFBackend`` and pass it to ``MelleaSession(backend,
ctx=ChatContext())``. Each chat turn reuses the KV of every earlier turn, and aLoRA
requirement checks run the adapter on the base model's reused cache.
``LocalIntrinsicAdapter`` serves an intrinsic's adapter and io.yaml from local disk.
"""

try:
    import mellea.backends.huggingface  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("spanctx.integrations.mellea needs Mellea's Hugging Face backend: "
                      "pip install 'spanctx[mellea]'") from exc

from .backend import SpanctxBackend, TokenCounts
from .intrinsics import LocalIntrinsicAdapter

__all__ = ["LocalIntrinsicAdapter", "SpanctxBackend", "TokenCounts"]
