"""spanctx: prompts as trees of hashed spans; each span's KV is prefilled once."""

from .index import EntryInfo, SpanIndex, lru
from .plan import Compute, Plan, PlanSegment, Reuse, plan_prompt
from .presets import DEFAULT_PRESET, PRESETS, load_preset, preset_config
from .runtime import GenerationStats, KVLayoutMismatch, Result, Runtime
from .spans import Context, Span
from .store import KVStore, SpanKV, StoreStats
from .tokenizer import byte_tokenizer

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "Compute",
    "Context",
    "EntryInfo",
    "GenerationStats",
    "KVLayoutMismatch",
    "KVStore",
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
    "plan_prompt",
    "preset_config",
]
