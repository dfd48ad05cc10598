"""spanctx: prompts as trees of hashed spans; each span's KV is prefilled once."""

from .adapters import AdapterError, AdapterInfo
from .checks import Attempt, CheckConfig, CheckLoopResult, Verdict
from .index import EntryInfo, SpanIndex, lru, lru_large_first
from .plan import Compute, Plan, PlanSegment, Reuse, plan_prompt
from .presets import DEFAULT_PRESET, PRESETS, load_preset, preset_config
from .runtime import GenerationStats, KVLayoutMismatch, Result, Runtime
from .spans import Context, Span
from .store import KVStore, SpanKV, StoreStats
from .tokenizer import byte_tokenizer

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "AdapterError",
    "AdapterInfo",
    "Attempt",
    "CheckConfig",
    "CheckLoopResult",
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
    "Verdict",
    "byte_tokenizer",
    "load_preset",
    "lru",
    "lru_large_first",
    "plan_prompt",
    "preset_config",
]
