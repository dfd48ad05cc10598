"""spanctx: prompts as trees of hashed spans; each span's KV is prefilled once."""

from .adapters import AdapterError, AdapterInfo
from .core.media import Image
from .batch import BatchLayout, plan_batch
from .chat import ChatRendering, ChatSplitWarning
from .checks import Attempt, CheckConfig, CheckLoopResult, Verdict
from .engine import KVLayoutMismatch
from .fidelity import Fidelity, fidelity
from .index import EntryInfo, SpanIndex, lru
from .loading import load_model
from .logprobs import TokenLogprob, token_logprobs
from .messages import Message
from .options import CallOptions, merge_options
from .placement import PlacementPlan, Repair, plan_placement
from .plan import Compute, Plan, PlanSegment, Reuse, plan_prompt
from .presets import DEFAULT_PRESET, PRESETS, load_preset, preset_config
from .results import GenerationStats, ParallelStats, Result
from .reward import RewardModel
from .rope import KeyMover, key_mover
from .runtime import Runtime
from .scoring import Ranked, Score
from .seq2seq import Seq2SeqRuntime
from .spans import Context, ParallelGroup, Span
from .store import KVStore, SpanKV, StoreStats
from .structured import JsonResult, StructuredOutputError
from .tokenizer import byte_tokenizer
from .tools import (
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
    "Image",
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
    "Seq2SeqRuntime",
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
