"""The ``bench`` command: run scenarios over one model, write JSON, markdown and plots.

Wired by the main CLI as ``spanctx bench SCENARIO... --model M --device D --out DIR``
(``add_arguments`` fills its parser, ``run`` executes it); also ``python -m spanctx.bench``.
The results file is rewritten after every scenario, so a killed run keeps what it did.
"""

from __future__ import annotations

import argparse
import traceback

import attrs
import torch

from ..presets import DEFAULT_PRESET
from . import report
from .floor import measure_floor
from .harness import DTYPES, load_bench_model, make_harness
from .records import new_results, results_stem, write_json
from .scenarios import SCENARIOS, run_scenario


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

    sizes = parser.add_argument_group("workload sizes (defaults: each scenario's Config)")
    for field, owners in _shared_fields().items():
        defaults = {getattr(SCENARIOS[o].Config(), field) for o in owners}
        if field == "new_tokens":  # N,SCENARIO=M: one default, the scenarios that differ
            per = {o: SCENARIOS[o].Config().new_tokens for o in owners}
            base = max(set(per.values()), key=list(per.values()).count)
            default = ",".join([str(base), *(f"{o}={n}" for o, n in per.items() if n != base)])
            sizes.add_argument("--new-tokens", type=_per_scenario, default=default,
                               help=f"{', '.join(owners)}: tokens generated per request: N, or N,SCENARIO=M,...")
            continue
        value = defaults.pop() if len(defaults) == 1 else None  # None: each scenario's own default
        sizes.add_argument(_flag(field), type=_parser(value), default=value,
                           help=f"{', '.join(owners)}: {field.replace('_', ' ')}")
    for name, field in _own_fields():
        sizes.add_argument(field.metadata.get("flag") or _flag(f"{name}_{field.name}"), dest=_dest(name, field),
                           type=_parser(field.default), default=field.default,
                           help=f"{name}: {field.name.replace('_', ' ')} (default %(default)s)")


# Config fields that one flag sets for every scenario that has them
SHARED = ("contexts", "question_tokens", "new_tokens")


def _configs() -> dict[str, type]:
    """Each Config class once, with the scenarios that use it."""
    return {name: module.Config for name, module in SCENARIOS.items()}


def _shared_fields() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, config in _configs().items():
        for field in attrs.fields(config):
            if field.name in SHARED:
                out.setdefault(field.name, []).append(name)
    return out


def _own_fields():
    """``(scenario, field)`` of every Config field that is not shared, each Config class once."""
    seen: set[type] = set()
    for name, config in _configs().items():
        if config not in seen:
            seen.add(config)
            yield from ((name, f) for f in attrs.fields(config) if f.name not in SHARED)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _dest(scenario: str, field) -> str:
    return (field.metadata.get("flag") or _flag(f"{scenario}_{field.name}")).removeprefix("--").replace("-", "_")


def _parser(default):
    """How a flag's text becomes a value of the type of ``default`` (None: an int)."""
    if isinstance(default, tuple):
        return _ints
    return str if isinstance(default, str) else int


def configs(args: argparse.Namespace) -> dict:
    """Each scenario's ``Config`` from the parsed arguments (unset: the Config's default)."""
    default_new, override_new = args.new_tokens
    out = {}
    for name, config in _configs().items():
        values = {}
        for field in attrs.fields(config):
            if field.name == "new_tokens":
                value = override_new.get(name, default_new)
            elif field.name in SHARED:
                value = getattr(args, field.name)
            else:
                value = getattr(args, _dest(name, field))
            if value is not None:
                values[field.name] = value
        out[name] = config(**values)
    return out


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 if every scenario ran, 1 if any failed or lacked a feature."""
    names = list(SCENARIOS) if "all" in args.scenarios else list(dict.fromkeys(args.scenarios))
    _check_methods(names, args.methods)
    repeats, scenario_repeats = args.repeats
    progress = None
    if not args.no_progress:
        from tqdm import tqdm as progress

    print(f"loading {args.model} on {args.device} ...", flush=True)
    model, tokenizer = load_bench_model(args.model, args.device, args.dtype, args.seed, args.attn)
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
    """A short plain-text table of every row, with speedups vs full and the executor of
    spanctx rows; then every row whose calls stepped off the static executor, and why."""
    lines = [f"{'scenario':8} {'case':>16} {'method':28} {'TTFT ms':>9} {'total ms':>9} {'speedup':>8}  executor"]
    for row in results["rows"]:
        metric = report.SPEEDUP_METRIC.get(row["scenario"], "ttft_ms")
        s = report.speedup(results["rows"], row, metric)
        lines.append(f"{row['scenario']:8} {report.case_label(row):>16} {row['method']:28} "
                     f"{row['ttft_ms']:9.2f} {row['total_ms']:9.2f} {'' if s is None else f'{s:7.2f}x':>8}  "
                     f"{row.get('executor', '')}")
    lines.append(f"floor (weights read once): {results['floor_ms']:.2f} ms")
    lines += [f"fallback: {row['scenario']} {report.case_label(row)} {row['method']}: {row['executor_fallback']}"
              for row in results["rows"] if row.get("executor_fallback")]
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
