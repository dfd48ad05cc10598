"""The ``bench`` command: run scenarios over one model, write JSON, markdown and plots.

Wired by the main CLI as ``spanctx bench SCENARIO... --model M --device D --out DIR``
(``add_arguments`` fills its parser, ``run`` executes it); also ``python -m spanctx.bench``.
The results file is rewritten after every scenario, so a killed run keeps what it did.
"""

from __future__ import annotations

import argparse
import traceback

import torch

from ..presets import DEFAULT_PRESET
from . import report
from .floor import measure_floor
from .harness import DTYPES, load_model, make_harness
from .records import new_results, results_stem, write_json
from .scenarios import (
    SCENARIOS,
    chat,
    cold,
    prefix,
    rag,
    run_scenario,
)
from .scenarios import (
    parallel_fidelity as fidelity,
)
from .scenarios import (
    requirement_checks as checks,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenarios", nargs="+", metavar="SCENARIO", choices=[*SCENARIOS, "all"],
                        help=f"scenarios to run, in order: {', '.join(SCENARIOS)}, or all")
    parser.add_argument("--model", default=DEFAULT_PRESET, help="a preset name or a local model folder / hub id")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: the preset's dtype (or the model's)")
    parser.add_argument("--attn", help="attn_implementation (default: the model's default, sdpa)")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--repeats", default="5", type=_per_scenario,
                        help="timed repeats per row: N, or N,SCENARIO=M,... to override per scenario")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up requests per row")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of every workload")
    parser.add_argument("--methods", type=_names,
                        help="only these methods (comma separated): a plain name applies to every scenario "
                             "that has it, SCENARIO/METHOD to one scenario only (e.g. checks/lora-full)")
    parser.add_argument("--store-gb", type=float, help="spanctx store budget (default: the runtime's)")
    parser.add_argument("--executor", choices=["auto", "eager", "static"], default="auto",
                        help="spanctx's executor (Runtime(executor=...)): auto is static on CUDA, eager elsewhere")
    parser.add_argument("--compile", action="store_true", help="the static executor runs the model compiled")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")

    sizes = parser.add_argument_group("workload sizes (defaults: the issue's)")
    sizes.add_argument("--contexts", type=_ints, default=prefix.Config().contexts,
                       help="prefix and cold: context lengths in tokens")
    sizes.add_argument("--question-tokens", type=int, default=prefix.Config().question_tokens,
                       help="prefix, cold, rag: tokens of the new question")
    sizes.add_argument("--new-tokens", type=_per_scenario,
                       default=f"{prefix.Config().new_tokens},chat={chat.Config().new_tokens}",
                       help="tokens generated per request: N, or N,SCENARIO=M,... (checks read one answer token)")
    sizes.add_argument("--rag-docs", type=_ints, default=rag.Config().docs, help="rag: documents per prompt (K)")
    sizes.add_argument("--rag-doc-tokens", type=int, default=rag.Config().doc_tokens)
    sizes.add_argument("--rag-pool", type=int, default=rag.Config().pool, help="rag: documents in the pool")
    sizes.add_argument("--rag-system-tokens", type=int, default=rag.Config().system_tokens)
    sizes.add_argument("--rag-fidelity-prompts", type=int, default=rag.Config().fidelity_prompts,
                       help="rag: prompts over which top-1 agreement and KL are averaged")
    sizes.add_argument("--chat-turns", type=int, default=chat.Config().turns)
    sizes.add_argument("--chat-system-tokens", type=int, default=chat.Config().system_tokens)
    sizes.add_argument("--chat-user-tokens", type=int, default=chat.Config().user_tokens)
    sizes.add_argument("--chat-reply-tokens", type=int, default=chat.Config().reply_tokens)
    sizes.add_argument("--checks", type=int, default=checks.Config().checks, help="checks: requirements")
    sizes.add_argument("--checks-context", type=int, default=checks.Config().context_tokens)
    sizes.add_argument("--adapter-rank", type=int, default=checks.Config().rank)
    sizes.add_argument("--fidelity-docs", type=_ints, default=fidelity.Config().docs,
                       help="fidelity: documents per prompt (K), from the held-out set (2, 4, 8, 16, 32)")
    sizes.add_argument("--fidelity-worlds", type=int, default=fidelity.Config().worlds,
                       help="fidelity: held-out worlds per K (4 prompts each; default all 16)")


def configs(args: argparse.Namespace) -> dict:
    """Each scenario's ``Config`` from the parsed arguments."""
    default, override = args.new_tokens

    def new_tokens(scenario: str) -> int:
        return override.get(scenario, default)
    return {
        "prefix": prefix.Config(args.contexts, args.question_tokens, new_tokens("prefix")),
        "cold": cold.Config(args.contexts, args.question_tokens, new_tokens("cold")),
        "rag": rag.Config(args.rag_docs, args.rag_doc_tokens, args.rag_pool, args.rag_system_tokens,
                          args.question_tokens, new_tokens("rag"), args.rag_fidelity_prompts),
        "chat": chat.Config(args.chat_turns, args.chat_system_tokens, args.chat_user_tokens,
                            args.chat_reply_tokens, new_tokens("chat")),
        "checks": checks.Config(args.checks_context, args.checks, args.adapter_rank),
        "fidelity": fidelity.Config(args.fidelity_docs, args.fidelity_worlds),
    }


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 if every scenario ran, 1 if any failed or lacked a feature."""
    names = list(SCENARIOS) if "all" in args.scenarios else list(dict.fromkeys(args.scenarios))
    _check_methods(names, args.methods)
    repeats, scenario_repeats = args.repeats
    progress = None
    if not args.no_progress:
        from tqdm import tqdm as progress

    print(f"loading {args.model} on {args.device} ...", flush=True)
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.seed, args.attn)
    store_bytes = None if args.store_gb is None else int(args.store_gb * 2**30)
    h = make_harness(model, tokenizer, args.model, seed=args.seed, warmup=args.warmup, repeats=repeats,
                     scenario_repeats=scenario_repeats, store_bytes=store_bytes, progress=progress,
                     executor=args.executor, compile=args.compile)
    floor = measure_floor(model, h.device)
    print(f"floor: {floor.floor_ms:.2f} ms to read {floor.weight_bytes / 1e9:.2f} GB at "
          f"{floor.bandwidth_gbps:.0f} GB/s", flush=True)
    settings = {k: v for k, v in vars(args).items() if k != "func" and _plain(v)}
    results = new_results(h, floor, settings)
    stem = results_stem(args.out, results)

    scenario_configs = configs(args)
    failed = False
    written = flush(results, stem)
    for name in names:
        methods = methods_for(name, args.methods)
        if methods == []:
            continue
        try:
            results["rows"] += [row.to_json() for row in run_scenario(h, name, scenario_configs[name], methods)]
        except Exception as exc:  # noqa: BLE001 (keep the other scenarios' results; report, exit 1)
            failed = True
            results["skipped"].append({"scenario": name, "error": f"{type(exc).__name__}: {exc}"})
            traceback.print_exc()
            h.runtime.store.clear()
            if h.device.type == "cuda":
                torch.cuda.empty_cache()
        written = flush(results, stem)

    print()
    print(summary_table(results))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 1 if failed else 0


def flush(results: dict, stem) -> list:
    """Write the JSON, the markdown and the plots of what has run so far."""
    from . import plots  # matplotlib: needed to draw, not to build the parser

    return [write_json(results, stem.parent / f"{stem.name}.json"), report.write_markdown(results, stem),
            *plots.write_plots(results, stem)]


def summary_table(results: dict) -> str:
    """A short plain-text table of every row, with speedups vs full."""
    lines = [f"{'scenario':8} {'case':>16} {'method':28} {'TTFT ms':>9} {'total ms':>9} {'speedup':>8}"]
    for row in results["rows"]:
        metric = report.SPEEDUP_METRIC.get(row["scenario"], "ttft_ms")
        s = report.speedup(results["rows"], row, metric)
        lines.append(f"{row['scenario']:8} {report.case_label(row):>16} {row['method']:28} "
                     f"{row['ttft_ms']:9.2f} {row['total_ms']:9.2f} {'' if s is None else f'{s:7.2f}x':>8}")
    lines.append(f"floor (weights read once): {results['floor_ms']:.2f} ms")
    return "\n".join(lines)


def methods_for(scenario: str, methods: list[str] | None) -> list[str] | None:
    """The ``--methods`` entries that apply to ``scenario`` (None: all its methods)."""
    if methods is None:
        return None
    mine = []
    for entry in methods:
        owner, slash, method = entry.partition("/")
        if not slash:
            owner, method = scenario, entry
        if owner == scenario and method in SCENARIOS[scenario].METHODS:
            mine.append(method)
    return mine


def _check_methods(names: list[str], methods: list[str] | None) -> None:
    if methods is None:
        return
    unknown = [m for m in methods if not any(methods_for(name, [m]) for name in names)]
    if unknown:
        known = sorted(m for name in names for m in SCENARIOS[name].METHODS)
        raise SystemExit(f"no scenario among {names} has method(s) {unknown}; known: {known}")


def _plain(value) -> bool:
    return isinstance(value, (str, int, float, bool, list, tuple, dict, type(None)))


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _per_scenario(text: str) -> tuple[int, dict[str, int]]:
    """``"5"`` or ``"5,rag=3,cold=2"`` -> (default, per-scenario overrides), all >= 1."""
    default, overrides = None, {}
    for part in _names(text):
        name, eq, value = part.partition("=")
        try:
            if eq:
                if name not in SCENARIOS:
                    raise argparse.ArgumentTypeError(f"unknown scenario {name!r} in {text!r}")
                overrides[name] = int(value)
            else:
                default = int(name)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad value {part!r} in {text!r}") from None
    if default is None or default < 1 or any(v < 1 for v in overrides.values()):
        raise argparse.ArgumentTypeError(f"expected a default N >= 1 and overrides >= 1 (e.g. 5,rag=3), got {text!r}")
    return default, overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spanctx.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
