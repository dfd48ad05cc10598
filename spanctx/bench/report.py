"""Human-readable results: the markdown report, from a results dict (plots: ``plots.py``).

Works on any results file (``results.load_results``), so a notebook can redraw an
H100 run on a laptop. Speedups are always against the ``full`` row of the same case of
the same run: ``full_time / method_time``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from . import accuracy
from .records import CASE_KEYS

# Scenario order in reports; the metric each one's speedup is read from.
SCENARIO_ORDER = ("prefix", "rag", "chat", "checks", "cold", "fidelity")
SPEEDUP_METRIC = {"prefix": "ttft_ms", "rag": "ttft_ms", "chat": "ttft_ms", "checks": "total_ms", "cold": "ttft_ms",
                  "fidelity": "ttft_ms"}
FIDELITY_KEYS = ("accuracy", "answer_agreement", "recomputed_fraction", "checked_fraction", "greedy_match",
                 "top1_agreement", "kl", "verdict_agreement")


# -- reading rows -----------------------------------------------------------------------

def case_key(row: dict) -> tuple:
    """What makes rows of one scenario comparable: context size, K, turn, checks."""
    return (row["scenario"], row["context_tokens"], *(row.get(k) for k in CASE_KEYS))


def case_label(row: dict) -> str:
    if row.get("docs") is not None:
        return f"K={row['docs']}" + (f", {row['question']}" if row.get("question") else "")
    if row.get("turn") is not None:
        return f"turn {row['turn']}"
    if row.get("checks") is not None:
        return f"{row['checks']} checks, {tokens_label(row['context_tokens'])}"
    return tokens_label(row["context_tokens"])


def speedup(rows: list[dict], row: dict, metric: str) -> float | None:
    """``full``'s ``metric`` over ``row``'s, in the same case (None without a full row)."""
    for other in rows:
        if other["method"] == "full" and case_key(other) == case_key(row):
            return other[metric] / row[metric] if row[metric] > 0 else None
    return None


def scenarios_in(results: dict) -> list[str]:
    present = {r["scenario"] for r in results["rows"]}
    return [s for s in SCENARIO_ORDER if s in present] + sorted(present - set(SCENARIO_ORDER))


def rows_of(results: dict, scenario: str) -> list[dict]:
    return [r for r in results["rows"] if r["scenario"] == scenario]


def methods_of(rows: Iterable[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


# -- markdown -----------------------------------------------------------------------------

def markdown(results: dict) -> str:
    """The whole report: header, floor, targets, one table per scenario."""
    shape = results["model_shape"]
    lines = [
        f"# spanctx benchmark: {results['model']} on {results['device']}",
        "",
        f"{results['date']} · torch {results['torch']} · transformers {results['transformers']} · "
        f"peft {results['peft']} · {results['dtype']} · attention `{results['attn_implementation']}` · "
        f"{shape.get('num_hidden_layers')} layers, hidden {shape.get('hidden_size')}, "
        f"{shape.get('num_attention_heads')}/{shape.get('num_key_value_heads')} heads (q/kv), "
        f"{_count(shape.get('parameters', 0))} parameters"
        + (f" · {results['cpu_threads']} CPU thread(s)" if results["device"].startswith("cpu") else ""),
        "",
        _floor_line(results),
        "",
        ("Times are medians over the timed repeats (p90 in parentheses), in ms. Speedups are "
         "`full`'s time over the method's, in the same case of this run. TTFT: call start to "
         "the first new token on the host (for `checks`: to the first verdict; its speedup plot uses "
         "the total time of all checks). Fidelity is against full prefill of the same ids."),
        "",
    ]
    targets = target_table(results)
    if targets:
        lines += ["## Targets", "", *targets, ""]
    for scenario in scenarios_in(results):
        lines += [f"## {scenario}", "", *scenario_table(results, scenario), ""]
    pooled = accuracy.markdown_lines(results)
    if pooled:
        lines += ["## fidelity, pooled over K", "", *pooled, ""]
    for skipped in results.get("skipped", []):
        lines += [f"**{skipped['scenario']} not run:**", "", "```", skipped["error"], "```", ""]
    return "\n".join(lines)


def _floor_line(results: dict) -> str:
    floor = results.get("floor") or {}
    detail = ""
    if floor:
        detail = (f" ({floor['weight_bytes'] / 1e6:,.1f} MB of weights at a measured copy bandwidth of "
                  f"{floor['bandwidth_gbps']:,.0f} GB/s)")
    return (f"**Floor:** reading the weights once takes {results['floor_ms']:.2f} ms{detail}: no forward of a "
            "short suffix can be faster.")


def scenario_table(results: dict, scenario: str) -> list[str]:
    rows = rows_of(results, scenario)
    fidelity = [k for k in FIDELITY_KEYS if any(r.get(k) is not None for r in rows)]
    header = ["case", "method", "TTFT ms", "total ms", "computed / cached", "peak MB",
              "TTFT speedup", "total speedup", *fidelity]
    if scenario == "prefix":
        header.insert(3, "TTFT / floor")
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [case_label(row), f"`{row['method']}`", f"{_ms(row['ttft_ms'])} ({_ms(row['ttft_p90_ms'])})",
                 f"{_ms(row['total_ms'])} ({_ms(row['total_p90_ms'])})",
                 f"{row['computed_tokens']} / {row['cached_tokens']}",
                 "–" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.0f}",
                 _x(speedup(rows, row, "ttft_ms")), _x(speedup(rows, row, "total_ms"))]
        if scenario == "prefix":
            cells.insert(3, f"{row['ttft_ms'] / results['floor_ms']:.1f}" if results["floor_ms"] else "–")
        cells += [_fraction_or_kl(k, row.get(k)) for k in fidelity]
        out.append("| " + " | ".join(cells) + " |")
    return out


def target_table(results: dict) -> list[str]:
    """The issue's targets, each with the measured figure (only those this run measured)."""
    rows = results["rows"]
    lines = []

    def pick(scenario, method, **case):
        return [r for r in rows if r["scenario"] == scenario and r["method"] == method
                and all(r.get(k) == v for k, v in case.items())]

    for n, goal in ((8192, 5.0), (16384, 10.0)):
        for row in pick("prefix", "spanctx", context_tokens=n):
            s = speedup(rows, row, "ttft_ms")
            lines.append(_target(f"prefix {tokens_label(n)}: spanctx TTFT ≥ {goal:g}x faster than full", s,
                                 s is not None and s >= goal, _x(s)))
    pairs = [(r, d) for r in pick("prefix", "spanctx") for d in pick("prefix", "hf-deepcopy")
             if d["context_tokens"] == r["context_tokens"]]
    if pairs:
        worst = max(r["ttft_ms"] / d["ttft_ms"] for r, d in pairs)
        lines.append(_target("prefix: spanctx not slower than hf-deepcopy anywhere (worst TTFT ratio)", worst,
                             worst <= 1.0, f"{worst:.2f}x"))
    naive = pick("rag", "naive-concat", docs=8)
    for row in [r for r in rows if r["scenario"] == "rag" and r.get("docs") == 8
                and r["method"].startswith("spanctx-parallel")]:
        s = speedup(rows, row, "ttft_ms")
        better = bool(naive) and row.get("kl") is not None and row["kl"] < naive[0].get("kl", float("inf"))
        lines.append(_target(f"rag K=8: {row['method']} TTFT ≥ 4x faster than full, KL below naive-concat", s,
                             s is not None and s >= 4.0 and better,
                             f"{_x(s)}, KL {_kl(row.get('kl'))} vs {_kl(naive[0].get('kl')) if naive else '–'}"))
    for row in pick("checks", "spanctx"):
        s = speedup(rows, row, "total_ms")
        agree = row.get("verdict_agreement")
        lines.append(_target(f"checks: {row['checks']} checks ≥ 5x faster end to end, identical verdicts", s,
                             s is not None and s >= 5.0 and agree == 1.0,
                             f"{_x(s)}, verdicts agree {_fraction_or_kl('verdict_agreement', agree)}"))
    lines += accuracy.goal_lines(results)
    cold = [(r, speedup(rows, r, "total_ms")) for r in pick("cold", "spanctx")]
    cold = [(r, s) for r, s in cold if s]
    if cold:
        worst = max(1 / s for _, s in cold)
        lines.append(_target("cold: spanctx ≤ 1.10x the time of full (worst end-to-end ratio)", worst,
                             worst <= 1.10, f"{worst:.2f}x"))
    if not lines:
        return []
    return ["| target | measured | met |", "|---|---|---|", *lines]


def _target(text: str, value, met: bool, shown: str) -> str:
    return f"| {text} | {shown} | {'–' if value is None else ('yes' if met else 'no')} |"


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _kl(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _fraction_or_kl(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    return _kl(value) if key == "kl" else f"{value:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def tokens_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def write_markdown(results: dict, stem: str | Path) -> Path:
    """Write ``<stem>.md``."""
    path = Path(stem).parent / f"{Path(stem).name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(results) + "\n")
    return path
