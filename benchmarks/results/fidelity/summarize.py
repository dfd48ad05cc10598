"""Tables and plots of the fidelity runs in this folder (run from the repository root):

    python benchmarks/results/fidelity/summarize.py [FOLDER]

Reads every ``*.json`` result of the ``fidelity`` scenario in FOLDER (default: here), groups them by device,
and writes ``results.md`` (per device: the goal table at K = 16, accuracy by K and
question kind) and one ``<device>-k16.png`` and ``<device>-by-k.png`` per device.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure

HERE = Path(__file__).parent
GOAL_KEPT, GOAL_RECOMPUTED, GOAL_K = 0.95, 0.15, 16
KINDS = ("single", "two")
BY_K = ("full", "naive-concat", "parallel:none", "parallel:head:16", "parallel:blend:0.15",
        "parallel:head:8+blend:0.05", "parallel-root:none")


def load(folder: Path) -> dict[str, dict]:
    """Per device: its runs' rows (fidelity only) and run settings."""
    out: dict[str, dict] = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "rows" not in data:
            continue
        entry = out.setdefault(data["device"], {"rows": [], "runs": []})
        entry["rows"] += [r for r in data["rows"] if r["scenario"] == "fidelity"]
        entry["runs"].append(f"`{path.name}`: {data['date'][:16]}, torch {data['torch']}, transformers "
                             f"{data['transformers']}, {data['dtype']}, prompts per K {sorted({r['docs'] for r in data['rows']})}")
    return out


def cell(rows: list[dict], k: int, kind: str, method: str) -> dict | None:
    return next((r for r in rows if (r["docs"], r["question"], r["method"]) == (k, kind, method)), None)


def pct(share: float | None) -> str:
    return "–" if share is None else f"{share:.0%}"


def goal_table(rows: list[dict]) -> list[str]:
    methods = list(dict.fromkeys(r["method"] for r in rows if r["docs"] == GOAL_K))
    lines = [f"| method (K = {GOAL_K}) | single: exact match | kept | two: exact match | kept | recomputed "
             "| blend-checked | goal |", "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        got = {kind: cell(rows, GOAL_K, kind, m) for kind in KINDS}
        full = {kind: cell(rows, GOAL_K, kind, "full") for kind in KINDS}
        if any(v is None for v in (*got.values(), *full.values())):
            continue
        kept = {kind: got[kind]["accuracy"] / full[kind]["accuracy"] if full[kind]["accuracy"] else None
                for kind in KINDS}
        recomputed = max(got[kind]["recomputed_fraction"] for kind in KINDS)
        checked = max(got[kind]["checked_fraction"] for kind in KINDS)
        met = m != "full" and all(v is not None and v >= GOAL_KEPT for v in kept.values()) \
            and recomputed <= GOAL_RECOMPUTED
        n = {kind: got[kind]["repeats"] for kind in KINDS}
        lines.append(f"| `{m}` | {got['single']['accuracy']:.3f} ({round(got['single']['accuracy'] * n['single'])}"
                     f"/{n['single']}) | {pct(kept['single'])} | {got['two']['accuracy']:.3f} "
                     f"({round(got['two']['accuracy'] * n['two'])}/{n['two']}) | {pct(kept['two'])} | "
                     f"{recomputed:.1%} | {checked:.0%} | {'–' if m == 'full' else 'yes' if met else 'no'} |")
    return lines


def by_k_table(rows: list[dict]) -> list[str]:
    ks = sorted({r["docs"] for r in rows})
    lines = ["| method | " + " | ".join(f"K={k} single | K={k} two" for k in ks) + " |",
             "|---|" + "---|" * (2 * len(ks))]
    for m in BY_K:
        cells = []
        for k in ks:
            for kind in KINDS:
                r = cell(rows, k, kind, m)
                cells.append("–" if r is None else f"{r['accuracy']:.2f} ({r['repeats']})")
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return lines


def plots(device: str, rows: list[dict], folder: Path) -> list[str]:
    slug = device.lower().replace(" ", "-").replace("(", "").replace(")", "")
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    for ax, kind in zip(fig.subplots(1, 2, sharey=True), KINDS):
        mine = [r for r in rows if r["docs"] == GOAL_K and r["question"] == kind]
        full = next(r["accuracy"] for r in mine if r["method"] == "full")
        for r in mine:
            marker = "x" if r["method"] == "naive-concat" else "s" if r["method"].startswith("parallel-root") else "o"
            ax.plot(r["recomputed_fraction"], r["accuracy"], marker=marker, linestyle="")
            ax.annotate(r["method"].replace("parallel:", ""), (r["recomputed_fraction"], r["accuracy"]), fontsize=6,
                        xytext=(2, 2), textcoords="offset points")
        ax.axhline(full, color="black", linestyle="--", linewidth=1, label="full prefill")
        ax.axhline(GOAL_KEPT * full, color="grey", linestyle=":", linewidth=1, label="95% of full")
        ax.axvline(GOAL_RECOMPUTED, color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="recomputed fraction of document tokens", ylabel="exact match", ylim=(-0.02, 1.02),
               title=f"K = {GOAL_K}, {kind}-document questions ({mine[0]['repeats']} prompts)")
        ax.legend(fontsize=7)
    fig.suptitle(f"tiny-trained on {device}: answers with parallel documents")
    first = f"{slug}-k16.png"
    fig.savefig(folder / first, dpi=120)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ks = sorted({r["docs"] for r in rows})
    for ax, kind in zip(fig.subplots(1, 2, sharey=True), KINDS):
        for i, m in enumerate(BY_K):  # styles differ, so methods with equal accuracy stay visible
            points = [(k, c["accuracy"]) for k in ks if (c := cell(rows, k, kind, m))]
            ax.plot([k for k, _ in points], [a for _, a in points], marker="osD^vx*"[i % 7],
                    linestyle=("-", "--", ":")[i % 3], markersize=8 - i * 0.7, label=m)
        ax.set(xscale="log", xticks=ks, xticklabels=[str(k) for k in ks], xlabel="documents (K)",
               ylabel="exact match", ylim=(-0.02, 1.02), title=f"{kind}-document questions")
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.suptitle(f"tiny-trained on {device}: accuracy by K")
    second = f"{slug}-by-k.png"
    fig.savefig(folder / second, dpi=120)
    return [first, second]


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    out = ["# Fidelity results (generated by `summarize.py`; the notes are in NOTES.md)", ""]
    for device, entry in load(folder).items():
        rows = entry["rows"]
        out += [f"## {device}", "", *(f"- {line}" for line in entry["runs"]), ""]
        out += [f"Goal: keep ≥ {GOAL_KEPT:.0%} of full prefill's exact match on both kinds at ≤ "
                f"{GOAL_RECOMPUTED:.0%} of document tokens recomputed, K = {GOAL_K}. `kept` = accuracy / full's; "
                "recomputed and blend-checked are fractions of all document tokens of the row's prompts.", ""]
        out += goal_table(rows) + ["", "Exact match by K (prompts in brackets):", ""] + by_k_table(rows) + [""]
        out += [f"![{name}]({name})" for name in plots(device, rows, folder)] + [""]
    (folder / "results.md").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
