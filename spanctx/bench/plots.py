"""The plots of a results dict (matplotlib, no pyplot state: figures are returned)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

from .accuracy import plot_accuracy
from .report import (
    SPEEDUP_METRIC,
    case_key,
    case_label,
    methods_of,
    rows_of,
    scenarios_in,
    speedup,
    tokens_label,
)


def plot_ttft(results: dict) -> Figure:
    """TTFT vs context length on log axes, one line per method, one panel per scenario."""
    scenarios = [s for s in scenarios_in(results) if s != "checks"]
    fig = Figure(figsize=(5 * max(len(scenarios), 1), 4.2), layout="constrained")
    axes = fig.subplots(1, max(len(scenarios), 1), squeeze=False)[0]
    for ax, scenario in zip(axes, scenarios):
        rows = rows_of(results, scenario)
        for method in methods_of(rows):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["context_tokens"])
            ax.plot([r["context_tokens"] for r in mine], [r["ttft_ms"] for r in mine], marker="o", label=method)
        ax.axhline(results["floor_ms"], color="grey", linestyle="--", linewidth=1, label="floor (weights once)")
        ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="TTFT (ms, median)", title=scenario)
        sizes = sorted({r["context_tokens"] for r in rows})
        if len(sizes) <= 8:
            ax.set_xticks(sizes, [tokens_label(n) for n in sizes])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['model']} on {results['device']} ({results['dtype']})")
    return fig


def plot_speedup(results: dict) -> Figure:
    """Speedup vs ``full`` per case, one bar per method, one panel per scenario."""
    scenarios = scenarios_in(results)
    fig = Figure(figsize=(5 * max(len(scenarios), 1), 4.2), layout="constrained")
    axes = fig.subplots(1, max(len(scenarios), 1), squeeze=False)[0]
    for ax, scenario in zip(axes, scenarios):
        rows = rows_of(results, scenario)
        metric = SPEEDUP_METRIC.get(scenario, "ttft_ms")
        cases = list(dict.fromkeys(case_key(r) for r in rows))
        labels = {case_key(r): case_label(r) for r in rows}
        methods = [m for m in methods_of(rows) if m != "full"]
        width = 0.8 / max(len(methods), 1)
        for j, method in enumerate(methods):
            values = []
            for case in cases:
                row = next((r for r in rows if r["method"] == method and case_key(r) == case), None)
                values.append((speedup(rows, row, metric) or 0.0) if row else 0.0)
            ax.bar([i + j * width for i in range(len(cases))], values, width, label=method)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(cases))],
                      [labels[c] for c in cases], rotation=45 if len(cases) > 6 else 0, fontsize=7)
        ax.set(ylabel=f"speedup vs full ({metric.removesuffix('_ms')})", title=scenario)
        if methods:
            ax.legend(fontsize=7)
    fig.suptitle(f"{results['model']} on {results['device']}: speedup over full prefill")
    return fig


def plot_fidelity(results: dict) -> Figure | None:
    """Fidelity (top-1 agreement, KL) vs TTFT speedup for the rag methods; None without rag rows."""
    rows = [r for r in rows_of(results, "rag") if r.get("top1_agreement") is not None]
    if not rows:
        return None
    all_rag = rows_of(results, "rag")
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    top1_ax, kl_ax = fig.subplots(1, 2)
    for method in methods_of(rows):
        mine = [r for r in rows if r["method"] == method]
        xs = [speedup(all_rag, r, "ttft_ms") or float("nan") for r in mine]
        top1_ax.scatter(xs, [r["top1_agreement"] for r in mine], label=method)
        kl_ax.scatter(xs, [max(r["kl"], 1e-9) for r in mine], label=method)
        for x, r in zip(xs, mine):
            top1_ax.annotate(f"K={r['docs']}", (x, r["top1_agreement"]), fontsize=6)
            kl_ax.annotate(f"K={r['docs']}", (x, max(r["kl"], 1e-9)), fontsize=6)
    top1_ax.set(xscale="log", xlabel="TTFT speedup vs full", ylabel="top-1 agreement with full", ylim=(-0.05, 1.05),
                title="rag: fidelity vs speed")
    kl_ax.set(xscale="log", yscale="log", xlabel="TTFT speedup vs full",
              ylabel="KL(full || method), nats (floored at 1e-9)", title="rag: KL vs speed")
    for ax in (top1_ax, kl_ax):
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def write_plots(results: dict, stem: str | Path) -> list[Path]:
    """Write the PNGs ``<stem>-ttft.png``, ``-speedup.png``, (with rag fidelity rows) ``-fidelity.png``
    and (with fidelity-scenario rows) ``-accuracy.png``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    figures = {"ttft": plot_ttft(results), "speedup": plot_speedup(results), "fidelity": plot_fidelity(results),
               "accuracy": plot_accuracy(results)}
    for name, fig in figures.items():
        if fig is not None:
            path = stem.parent / f"{stem.name}-{name}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
    return written
