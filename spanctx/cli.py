"""Command line: ``spanctx demo`` (the cache-reuse demo) and ``spanctx bench`` (the benchmark matrix)."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spanctx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="shared-context workload with and without span reuse")
    demo.add_argument("--model", default=None,
                      help="preset name (default tiny-llama, random weights; tiny-trained: a small trained "
                           "model) or a local model folder / hub id")
    demo.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    demo.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    demo.add_argument("--notes", type=int, default=24, help="size of the shared document (x ~190 tokens)")
    demo.add_argument("--max-new-tokens", type=int, default=16)

    from .bench import command as bench_cli

    bench = sub.add_parser("bench", help="benchmark matrix: spanctx vs full-prefill generation")
    bench_cli.add_arguments(bench)

    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return bench_cli.run(args)


def _demo(args) -> int:
    from .demo import format_table, run_demo
    from .presets import DEFAULT_PRESET, PRESETS
    from .runtime import Runtime

    name = args.model or DEFAULT_PRESET
    rt = Runtime.from_pretrained(name, device=args.device, dtype=DTYPES.get(args.dtype))
    if name in PRESETS and PRESETS[name].weights is not None:
        print(f"model: preset {name!r} ({PRESETS[name].description}, 6M parameters):\n"
              "       expect broken text outside retrieval prompts.")
    elif name in PRESETS:
        print(f"model: preset {name!r} ({PRESETS[name].description}) with RANDOM weights: "
              "its text is noise, its timings and reuse are real.\n"
              "       Point at a real model with --model PATH_OR_HUB_ID.")
    else:
        print(f"model: {name}")
    print(f"device: {rt.device}, dtype: {rt.model.dtype}\n")
    rows = run_demo(rt, num_notes=args.notes, max_new_tokens=args.max_new_tokens)
    print(format_table(rows))
    warm = rows[1:]
    speedup = sum(r.ttft_speedup for r in warm) / len(warm)
    same = all(r.identical for r in rows)
    stats = rt.store.stats
    print(f"\nfirst question: cold store (computes and stores the shared context);"
          f" the other {len(warm)}: mean TTFT speedup {speedup:.1f}x")
    print(f"outputs identical with and without reuse: {'yes' if same else 'NO'}")
    print(f"store: {stats.entries} spans, {stats.bytes_used / 2**20:.1f} MiB of "
          f"{stats.bytes_budget / 2**20:.0f} MiB, {stats.hits} hits, {stats.misses} misses, "
          f"{stats.evictions} evictions")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
