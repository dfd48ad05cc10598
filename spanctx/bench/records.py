"""The results file: one JSON object per run, one row per (scenario, case, method).

Schema (keys always present unless marked optional)::

    {"device", "torch", "transformers", "peft", "model", "dtype", "date",
     "attn_implementation", "cpu_threads", "model_shape", "floor_ms", "floor", "settings",
     "skipped": [{"scenario", "error"}],
     "rows": [{"scenario", "method", "context_tokens", "new_tokens",
               "ttft_ms", "ttft_p90_ms", "total_ms", "total_p90_ms",
               "computed_tokens", "cached_tokens", "peak_mem_mb", "repeats",
               optional: "docs" (rag and fidelity K), "turn" (chat), "checks" (checks count),
               "question" (fidelity: "single" or "two" documents),
               "greedy_match", "top1_agreement", "kl", "verdict_agreement",
               spanctx rows: "executor", "executor_fallback" (distinct values over the timed calls),
               fidelity: "accuracy", "answer_agreement", "recomputed_fraction", "checked_fraction"}]}

Times are milliseconds (median, and p90, over the timed repeats); ``peak_mem_mb`` is
null on CPU. Speedups are not stored: the report computes them against the ``full`` row
of the same case of the same run.
"""

from __future__ import annotations

import datetime
import json
import platform
import re
from pathlib import Path

import attrs
import peft
import torch
import transformers

from .floor import Floor
from .harness import Harness
from .timing import Measured, summarize

REQUIRED_KEYS = ("device", "torch", "transformers", "peft", "model", "dtype", "date", "attn_implementation",
                 "model_shape", "floor_ms", "rows")
REQUIRED_ROW_KEYS = ("scenario", "method", "context_tokens", "new_tokens", "ttft_ms", "ttft_p90_ms", "total_ms",
                     "total_p90_ms", "computed_tokens", "cached_tokens", "peak_mem_mb", "repeats")
CASE_KEYS = ("docs", "turn", "checks", "question")  # with context_tokens, what makes rows of one scenario comparable


def _drop_none(attribute: attrs.Attribute, value: object) -> bool:
    return value is not None or attribute.name in REQUIRED_ROW_KEYS


@attrs.frozen
class Row:
    """One measured (scenario, case, method)."""

    scenario: str
    method: str
    context_tokens: int
    new_tokens: int
    ttft_ms: float
    ttft_p90_ms: float
    total_ms: float
    total_p90_ms: float
    computed_tokens: int
    cached_tokens: int
    peak_mem_mb: float | None
    repeats: int
    docs: int | None = None
    turn: int | None = None
    checks: int | None = None
    greedy_match: float | None = None
    top1_agreement: float | None = None
    kl: float | None = None
    verdict_agreement: float | None = None
    question: str | None = None
    accuracy: float | None = None
    answer_agreement: float | None = None
    recomputed_fraction: float | None = None
    checked_fraction: float | None = None
    executor: str | None = None  # spanctx rows: the executor(s) that ran the timed calls
    executor_fallback: str | None = None  # spanctx rows: why the static executor stepped aside, if it did

    @classmethod
    def measured(cls, scenario: str, method: str, context_tokens: int, new_tokens: int, measured: Measured,
                 **extra) -> Row:
        s = summarize(measured.samples)
        outcomes = [sample.outcome for sample in measured.samples]
        executors = distinct(o.executor for o in outcomes)
        fallbacks = distinct(o.executor_fallback for o in outcomes)
        return cls(scenario, method, context_tokens, new_tokens, s.ttft_ms, s.ttft_p90_ms, s.total_ms,
                   s.total_p90_ms, s.computed_tokens, s.cached_tokens, measured.peak_mem_mb, s.repeats,
                   executor=executors, executor_fallback=fallbacks, **extra)

    def to_json(self) -> dict:
        return attrs.asdict(self, filter=_drop_none)


def distinct(values) -> str | None:
    """The distinct non-empty ``values`` in first-seen order, joined by "; " (None if none)."""
    seen = list(dict.fromkeys(v for v in values if v))
    return "; ".join(seen) or None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def slug(text: str) -> str:
    """A file-name-safe lowercase form of ``text``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def model_shape(model: torch.nn.Module) -> dict:
    text = model.config.get_text_config()
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "max_position_embeddings")
    shape = {k: getattr(text, k, None) for k in keys}
    shape["parameters"] = sum(p.numel() for p in model.parameters())
    return shape


def new_results(h: Harness, floor: Floor, settings: dict) -> dict:
    """The run's header: environment, model, floor; rows are appended as scenarios finish."""
    return {
        "device": device_name(h.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "model": h.model_name,
        "dtype": str(h.model.dtype).removeprefix("torch."),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "attn_implementation": h.model.config._attn_implementation,
        "cpu_threads": torch.get_num_threads(),
        "model_shape": model_shape(h.model),
        "floor_ms": floor.floor_ms,
        "floor": attrs.asdict(floor),
        "settings": settings,
        "skipped": [],
        "rows": [],
    }


def results_stem(out_dir: str | Path, results: dict) -> Path:
    """``<out>/<date>-<device>-<model>``: the JSON, markdown and PNGs share this stem."""
    device = "cpu" if results["device"].startswith("cpu") else slug(results["device"])
    model = slug(Path(results["model"]).name)
    executor = results["settings"].get("executor", "auto")
    suffix = "" if executor == "auto" else f"-{executor}"
    suffix += "-compiled" if results["settings"].get("compile") else ""
    return Path(out_dir) / f"{results['date'][:10]}-{device}-{model}{suffix}"


def write_json(results: dict, path: str | Path) -> Path:
    """Write atomically (a killed run never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)
    return path


def load_results(path: str | Path) -> dict:
    """Read a results file and check it has the schema's keys."""
    results = json.loads(Path(path).read_text())
    validate(results)
    return results


def validate(results: dict) -> None:
    lacking = [k for k in REQUIRED_KEYS if k not in results]
    if lacking:
        raise ValueError(f"not a spanctx results file: missing keys {lacking}")
    for i, row in enumerate(results["rows"]):
        lacking = [k for k in REQUIRED_ROW_KEYS if k not in row]
        if lacking:
            raise ValueError(f"row {i} ({row.get('scenario')}/{row.get('method')}) lacks {lacking}")
