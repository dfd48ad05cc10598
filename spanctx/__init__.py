"""spanctx: prompts as trees of hashed spans; each span's KV is prefilled once."""

from .cache.index import EntryInfo, SpanIndex, lru
from .cache.rope import KeyMover, key_mover
from .cache.store import KVStore, SpanKV, StoreStats
from .core.chat import ChatRendering, ChatSplitWarning
from .core.messages import Message
from .core.options import CallOptions, merge_options
from .core.placement import PlacementPlan, Repair, plan_placement
from .core.plan import Compute, Plan, PlanSegment, Reuse, plan_prompt
from .core.spans import Context, ParallelGroup, Span
from .engine import KVLayoutMismatch
from .engine.engine import ParallelStats
from .features.batch import BatchLayout, plan_batch
from .features.checks import Attempt, CheckConfig, CheckLoopResult, Verdict
from .features.fidelity import Fidelity, fidelity
from .features.reward import RewardModel
from .features.scoring import Ranked, Score
from .features.structured import JsonResult, StructuredOutputError
from .features.tools import (
    AssistantReply,
    InvalidArguments,
    MalformedToolCall,
    Tool,
    ToolCall,
    ToolCallError,
    ToolLoopLimit,
    ToolRun,
    ToolTurn,
    UnknownTool,
    parse_tool_calls,
)
from .loading import load_model
from .presets import DEFAULT_PRESET, PRESETS, load_preset, preset_config
from .runtime import Runtime
from .session.adapters import AdapterError, AdapterInfo
from .session.logprobs import TokenLogprob, token_logprobs
from .session.results import GenerationStats, Result
from .tokenizer import byte_tokenizer

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "AdapterError",
    "AdapterInfo",
    "AssistantReply",
    "Attempt",
    "BatchLayout",
    "CallOptions",
    "ChatRendering",
    "ChatSplitWarning",
    "CheckConfig",
    "CheckLoopResult",
    "Compute",
    "Context",
    "EntryInfo",
    "Fidelity",
    "GenerationStats",
    "InvalidArguments",
    "JsonResult",
    "KVLayoutMismatch",
    "KVStore",
    "KeyMover",
    "MalformedToolCall",
    "Message",
    "ParallelGroup",
    "ParallelStats",
    "PlacementPlan",
    "Plan",
    "PlanSegment",
    "Ranked",
    "Repair",
    "Result",
    "Reuse",
    "RewardModel",
    "Runtime",
    "Score",
    "Span",
    "SpanIndex",
    "SpanKV",
    "StoreStats",
    "StructuredOutputError",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "ToolCallError",
    "ToolLoopLimit",
    "ToolRun",
    "ToolTurn",
    "UnknownTool",
    "Verdict",
    "byte_tokenizer",
    "fidelity",
    "key_mover",
    "load_model",
    "load_preset",
    "lru",
    "merge_options",
    "parse_tool_calls",
    "plan_batch",
    "plan_placement",
    "plan_prompt",
    "preset_config",
    "token_logprobs",
]
