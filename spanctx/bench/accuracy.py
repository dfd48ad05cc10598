"""The ``fidelity`` scenario's summary: accuracy pooled over K, the goal, the plot.

Rows of the scenario are per (K, question kind, method). Pooling over K weights each
row by its prompts (``repeats``): accuracy is the share of all prompts of one kind that
the method answered exactly; the recomputed fraction is the prompt-weighted mean of the
rows' fractions (recomputed tokens over document tokens). A method keeps a share
``accuracy / full's accuracy`` of full prefill's accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from matplotlib.figure import Figure

__all__ = ["GOAL_KEPT", "GOAL_RECOMPUTED", "Pooled", "curves", "goal_lines", "markdown_lines", "plot_accuracy",
           "pooled"]

SCENARIO = "fidelity"
KINDS = ("single", "two")
GOAL_KEPT = 0.95  # share of full prefill's accuracy to keep ...
GOAL_RECOMPUTED = 0.15  # ... at most this fraction of document tokens recomputed


@attrs.frozen
class Pooled:
    """One method on one question kind, over every K of the run."""

    method: str
    kind: str
    prompts: int
    accuracy: float
    kept: float | None  # accuracy / full's accuracy (None without full, or full at 0)
    recomputed_fraction: float
    checked_fraction: float
    top1_agreement: float | None
    kl: float | None


def _weighted(rows: Sequence[dict], key: str) -> float | None:
    values = [(r[key], r["repeats"]) for r in rows if r.get(key) is not None]
    if not values:
        return None
    return sum(v * n for v, n in values) / sum(n for _, n in values)


def pooled(results: dict) -> list[Pooled]:
    """Per method and question kind, in the run's method order."""
    rows = [r for r in results["rows"] if r["scenario"] == SCENARIO]
    out = []
    for kind in KINDS:
        mine = [r for r in rows if r.get("question") == kind]
        full = _weighted([r for r in mine if r["method"] == "full"], "accuracy")
        for method in dict.fromkeys(r["method"] for r in mine):
            group = [r for r in mine if r["method"] == method]
            accuracy = _weighted(group, "accuracy")
            out.append(Pooled(method, kind, sum(r["repeats"] for r in group), accuracy,
                              accuracy / full if full else None, _weighted(group, "recomputed_fraction") or 0.0,
                              _weighted(group, "checked_fraction") or 0.0, _weighted(group, "top1_agreement"),
                              _weighted(group, "kl")))
    return out


def goal_lines(results: dict) -> list[str]:
    """One target row per method: keeps >= 95% of full's accuracy on both kinds at <= 15%
    recomputed (rows for markdown's target table)."""
    summary = pooled(results)
    lines = []
    for method in dict.fromkeys(p.method for p in summary if p.method != "full"):
        mine = {p.kind: p for p in summary if p.method == method}
        if set(mine) != set(KINDS) or any(p.kept is None for p in mine.values()):
            continue
        recomputed = max(p.recomputed_fraction for p in mine.values())
        met = all(p.kept >= GOAL_KEPT for p in mine.values()) and recomputed <= GOAL_RECOMPUTED
        shown = ", ".join(f"{k} {mine[k].kept:.0%}" for k in KINDS) + f" at {recomputed:.1%} recomputed"
        lines.append(f"| fidelity: `{method}` keeps ≥ {GOAL_KEPT:.0%} of full's accuracy (single, two-document) "
                     f"at ≤ {GOAL_RECOMPUTED:.0%} recomputed | {shown} | {'yes' if met else 'no'} |")
    return lines


def markdown_lines(results: dict) -> list[str]:
    """The pooled table: accuracy, share of full's, recomputed and checked fractions."""
    summary = pooled(results)
    if not summary:
        return []
    lines = ["| method | questions | prompts | exact match | share of full's | recomputed | blend-checked "
             "| top-1 agree | KL |", "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(summary, key=lambda p: (KINDS.index(p.kind), _order(summary, p.method))):
        lines.append(f"| `{p.method}` | {p.kind} | {p.prompts} | {p.accuracy:.3f} | "
                     f"{'–' if p.kept is None else f'{p.kept:.1%}'} | {p.recomputed_fraction:.1%} | "
                     f"{p.checked_fraction:.0%} | {'–' if p.top1_agreement is None else f'{p.top1_agreement:.2f}'} | "
                     f"{'–' if p.kl is None else f'{p.kl:.3g}'} |")
    return lines


def _order(summary: list[Pooled], method: str) -> int:
    return list(dict.fromkeys(p.method for p in summary)).index(method)


def curves(methods: Sequence[str]) -> dict[str, list[str]]:
    """The plot's curves: each repair family with its zero-recompute start (``none``)."""
    out: dict[str, list[str]] = {}
    for anchor in ("parallel", "parallel-root"):
        none = f"{anchor}:none"
        for family in ("head", "blend", "head+blend"):
            members = [m for m in methods if m.startswith(f"{anchor}:{family.split('+')[0]}:")
                       and ("+blend:" in m) == (family == "head+blend")]
            if members:
                out[f"{anchor} {family}:*"] = ([none] if none in methods else []) + members
        if none in methods and not any(none in c for c in out.values()):
            out[none] = [none]
    return out


def plot_accuracy(results: dict) -> Figure | None:
    """Exact-match accuracy vs recomputed fraction, one curve per method, one panel per
    question kind (pooled over K); full prefill and naive concatenation as references."""
    summary = pooled(results)
    if not summary:
        return None
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, len(KINDS), sharey=True)
    for ax, kind in zip(axes, KINDS):
        by_method = {p.method: p for p in summary if p.kind == kind}
        for label, members in curves(list(by_method)).items():
            points = sorted((by_method[m].recomputed_fraction, by_method[m].accuracy, m) for m in members)
            ax.plot([x for x, _, _ in points], [y for _, y, _ in points], marker="o", label=label)
            for x, y, m in points:
                ax.annotate(m.rsplit(":", 1)[-1], (x, y), fontsize=6, xytext=(2, 3), textcoords="offset points")
        if "full" in by_method:
            full = by_method["full"].accuracy
            ax.axhline(full, color="black", linestyle="--", linewidth=1, label="full prefill")
            ax.axhline(GOAL_KEPT * full, color="grey", linestyle=":", linewidth=1, label="95% of full")
        if "naive-concat" in by_method:
            ax.plot([0.0], [by_method["naive-concat"].accuracy], marker="x", color="red", linestyle="",
                    markersize=9, label="naive-concat (Mellea)")
        ax.axvline(GOAL_RECOMPUTED, color="grey", linestyle=":", linewidth=1)
        prompts = max(p.prompts for p in by_method.values())
        ax.set(xlabel="recomputed fraction of document tokens", ylabel="exact-match accuracy", ylim=(-0.02, 1.02),
               title=f"{'single' if kind == 'single' else 'two'}-document questions ({prompts} prompts)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{results['model']} on {results['device']}: answers with parallel documents")
    return fig
