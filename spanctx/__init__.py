"""spanctx: prompts as trees of hashed spans; each span's KV is prefilled once.

What a user writes is here; everything else is importable from its module (the layers
are in docs/architecture.md): ``spanctx.core.plan.plan_prompt``, ``spanctx.cache.index.SpanIndex``,
``spanctx.cache.rope.key_mover``, ``spanctx.features.tools.parse_tool_calls``, ...
"""

from .cache.store import KVStore
from .core.chat import ChatSplitWarning
from .core.media import Image
from .core.messages import Message
from .core.placement import Repair
from .core.spans import Context, Span
from .engine import KVLayoutMismatch
from .features.checks import CheckConfig, Verdict
from .features.fidelity import Fidelity, fidelity
from .features.scoring import Ranked, Score
from .features.structured import JsonResult, StructuredOutputError
from .features.tools import Tool, ToolCall, ToolCallError, ToolLoopLimit
from .loading import load_model
from .presets import PRESETS, load_preset
from .reward import RewardModel
from .runtime import Runtime
from .seq2seq import Seq2SeqRuntime
from .session.adapters import AdapterError
from .session.results import GenerationStats, Result
from .version import __version__

__all__ = [
    "__version__",
    "PRESETS",
    "AdapterError",
    "ChatSplitWarning",
    "CheckConfig",
    "Context",
    "Fidelity",
    "GenerationStats",
    "Image",
    "JsonResult",
    "KVLayoutMismatch",
    "KVStore",
    "Message",
    "Ranked",
    "Repair",
    "Result",
    "RewardModel",
    "Runtime",
    "Score",
    "Seq2SeqRuntime",
    "Span",
    "StructuredOutputError",
    "Tool",
    "ToolCall",
    "ToolCallError",
    "ToolLoopLimit",
    "Verdict",
    "fidelity",
    "load_model",
    "load_preset",
]
