"""Where a warm TTFT over a cached prefix goes, phase by phase (the static executor).

    python benchmarks/static_breakdown.py [--model llama-3.1-8b --device cuda --context 8192 --question 64]

One runtime, one cached context, a fresh ``--question``-token question per call, one new
token per call. First the calls as a user makes them (no synchronisation added: TTFT as
``stats.ttft_s``); then the same calls with each phase wrapped in a device
synchronisation, so each phase's own time shows (the sum exceeds the plain TTFT by the
overlap that synchronising removes). Prints a table; ``--out`` writes JSON. A diagnostic,
not a target: the fast-path targets are in ``run_fastpath_gpu.sh``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spanctx import Context  # noqa: E402
from spanctx.bench.harness import load_bench_model, make_harness  # noqa: E402
from spanctx.bench.random_adapters import INVOCATION_TEXT, make_adapter  # noqa: E402
from spanctx.bench.workloads import requirements  # noqa: E402
from spanctx.engine import decoding, engine, interpreter, static  # noqa: E402
from spanctx.session import session  # noqa: E402

PHASES = {  # name: (owner, attribute)
    "resolve (tokens, keys)": (session.Session, "resolve"),
    "assemble (store, plan)": (engine.Engine, "assemble"),
    "static refuses": (static.StaticExecutor, "refuses"),
    "chooser from options": (decoding.TokenChooser, "from_options"),
    "prepare (copy, owners)": (static.StaticExecutor, "_prepare"),
    "tail step": (static.StaticExecutor, "_run_tail"),
    "choose + host sync": (decoding.HostMirror, "receive"),
    "assemble shared context": (engine.Engine, "assemble_shared"),
    "final call (engine.run)": (engine.Engine, "run"),
    "store spans": (interpreter.Interpreter, "store_spans"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def phases_timed(device: torch.device, spent: dict[str, list[float]]):
    """Wrap each phase so that its time (device work included) is recorded."""
    originals = []
    for name, (owner, attribute) in PHASES.items():
        raw = owner.__dict__[attribute]
        function = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw

        def timed(*args, _function=function, _name=name, **kwargs):
            sync(device)
            started = time.perf_counter()
            try:
                return _function(*args, **kwargs)
            finally:
                sync(device)
                spent[_name].append((time.perf_counter() - started) * 1e3)

        wrapped = classmethod(timed) if isinstance(raw, classmethod) else timed
        originals.append((owner, attribute, raw))
        setattr(owner, attribute, wrapped)
    try:
        yield
    finally:
        for owner, attribute, raw in originals:
            setattr(owner, attribute, raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--question", type=int, default=64)
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--executor", default="auto")
    parser.add_argument("--checks", type=int, default=0,
                        help="time N aLoRA requirement checks on the context instead of a generation")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model, tokenizer = load_bench_model(args.model, args.device, None, 0, "sdpa")
    h = make_harness(model, tokenizer, args.model, executor=args.executor)
    rt, device = h.runtime, h.device
    ctx = Context().append(h.source.block(args.context, "breakdown", 0))
    questions = [ctx.append(h.source.block(args.question, "breakdown-q", i)) for i in range(3 + 2 * args.calls)]
    if args.checks:  # a fresh context per call, already stored (as after a generation over it)
        invocation = tokenizer(INVOCATION_TEXT, add_special_tokens=False)["input_ids"]
        with tempfile.TemporaryDirectory() as tmp:
            rt.add_adapter("check", make_adapter(model, f"{tmp}/alora", rank=32, invocation_ids=invocation, seed=1),
                           invocation=INVOCATION_TEXT)
        reqs = requirements(args.checks)
        contexts = [Context().append(h.source.block(args.context, "breakdown-c", i)) for i in range(3 + 2 * args.calls)]
        for c in contexts:
            rt.next_token_logits(c)

        def call(i):
            verdicts = rt.check(contexts[i], reqs, adapter="check")
            return verdicts[0].stats
    else:
        def call(i):
            return rt.generate(questions[i], 1).stats
    for i in range(3):  # store the context, build the buckets
        call(i)
    plain = []
    for i in range(3, 3 + args.calls):
        stats = call(i)
        plain.append((stats.total_s if args.checks else stats.ttft_s) * 1e3)
        executor = stats.executor, stats.executor_fallback
    spent: dict[str, list[float]] = defaultdict(list)
    whole = []
    with phases_timed(device, spent):
        for i in range(3 + args.calls, 3 + 2 * args.calls):
            sync(device)
            started = time.perf_counter()
            call(i)
            sync(device)
            whole.append((time.perf_counter() - started) * 1e3)
    rows = {"plain TTFT" if not args.checks else f"plain, {args.checks} checks": statistics.median(plain), "whole call, phases synchronised": statistics.median(whole)}
    rows |= {name: statistics.median(times) for name, times in spent.items()}
    print(f"{args.model} on {torch.cuda.get_device_name() if device.type == 'cuda' else device}, "
          f"{args.context}-token context + {args.question}-token question, executor {executor}")
    print("| phase | median ms |\n|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} |")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "executor": executor,
                                        "median_ms": rows}, indent=2))


if __name__ == "__main__":
    main()
