"""spanctx: prompts as trees of hashed spans; each span's KV is prefilled once."""

from .fidelity import Fidelity, fidelity
from .index import EntryInfo, SpanIndex, lru, lru_large_first
from .parallel import ParallelStats
from .placement import PlacementPlan, Repair, plan_placement
from .plan import Compute, Plan, PlanSegment, Reuse, plan_prompt
from .presets import DEFAULT_PRESET, PRESETS, load_preset, preset_config
from .rope import KeyMover, key_mover
from .runtime import GenerationStats, KVLayoutMismatch, Result, Runtime
from .spans import Context, ParallelGroup, Span
from .store import KVStore, SpanKV, StoreStats
from .tokenizer import byte_tokenizer

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "Compute",
    "Context",
    "EntryInfo",
    "Fidelity",
    "GenerationStats",
    "KVLayoutMismatch",
    "KVStore",
    "KeyMover",
    "ParallelGroup",
    "ParallelStats",
    "PlacementPlan",
    "Plan",
    "PlanSegment",
    "Repair",
    "Result",
    "Reuse",
    "Runtime",
    "Span",
    "SpanIndex",
    "SpanKV",
    "StoreStats",
    "byte_tokenizer",
    "fidelity",
    "key_mover",
    "load_preset",
    "lru",
    "lru_large_first",
    "plan_placement",
    "plan_prompt",
    "preset_config",
]
