"""spanctx: prompts as trees of hashed spans; each span's KV is prefilled once."""

from .batch import BatchLayout, plan_batch
from .chat import ChatRendering, ChatSplitWarning, Message
from .index import EntryInfo, SpanIndex, lru, lru_large_first
from .options import CallOptions, merge_options
from .plan import Compute, Plan, PlanSegment, Reuse, plan_prompt
from .presets import DEFAULT_PRESET, PRESETS, load_preset, preset_config
from .runtime import GenerationStats, KVLayoutMismatch, Result, Runtime
from .spans import Context, Span
from .store import KVStore, SpanKV, StoreStats
from .tokenizer import byte_tokenizer

__all__ = [
    "BatchLayout",
    "CallOptions",
    "ChatRendering",
    "ChatSplitWarning",
    "Compute",
    "Context",
    "DEFAULT_PRESET",
    "EntryInfo",
    "GenerationStats",
    "KVLayoutMismatch",
    "KVStore",
    "Message",
    "PRESETS",
    "Plan",
    "PlanSegment",
    "Result",
    "Reuse",
    "Runtime",
    "Span",
    "SpanIndex",
    "SpanKV",
    "StoreStats",
    "byte_tokenizer",
    "load_preset",
    "lru",
    "lru_large_first",
    "merge_options",
    "plan_batch",
    "plan_prompt",
    "preset_config",
]
