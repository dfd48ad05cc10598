"""Issue 19's targets that the ``spanctx.bench`` scenarios do not measure, one section per call:

    python benchmarks/fastpath_bench.py chat  --out DIR/chat.json  [--model M --device D ...]
    python benchmarks/fastpath_bench.py long  --out DIR/long.json  [...]
    python benchmarks/fastpath_bench.py batch --out DIR/batch.json [...]

- ``chat``: a growing conversation (``spanctx.bench.scenarios.chat_turns``' builder) run
  ONCE in this fresh process, with no warm-up: TTFT of every turn as a user meets it
  (``fresh``), then the same conversation again from an empty store (``warm``: graphs and
  kernels already there), then full prefill of each turn's prompt (TTFT baseline, one token).
- ``long``: a long cached prefix (32K on the GPU) and a new question per call: the first
  call's TTFT and the median of the next ones, with the executor and any fallback reason;
  an exception is recorded with its message and the time it took. Baseline: full prefill.
- ``batch``: ``generate_batch`` of R rows (a shared cached context + each row's own
  question) against one row's ``generate``. Decode tokens/s = rows x (new tokens - 1) /
  (end-to-end time - TTFT): the first token comes out of the prefill, so TTFT is excluded
  (and reported separately).

Every figure records the executor that ran it and ``executor_fallback`` (the runtime's
reason for stepping aside), and every fallback is printed. Each section writes its JSON
when it ends (``spanctx.bench.records.write_json``: atomic). Speed claims live here, never
in tests.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import attrs
import peft
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spanctx.bench import baselines  # noqa: E402
from spanctx.bench.agreement import match_fraction  # noqa: E402
from spanctx.bench.harness import Harness, load_bench_model, make_harness  # noqa: E402
from spanctx.bench.records import device_name, distinct, write_json  # noqa: E402
from spanctx.bench.scenarios import chat_turns  # noqa: E402
from spanctx.bench.scenarios.common import spanctx_generate  # noqa: E402
from spanctx.bench.timing import Outcome, Sample, now, timed  # noqa: E402
from spanctx.bench.random_adapters import INVOCATION_TEXT, make_adapter  # noqa: E402
from spanctx.bench.workloads import requirements  # noqa: E402
from spanctx.core.spans import Context  # noqa: E402


def load(args) -> tuple[Harness, float]:
    """The model and a fresh runtime (``--executor``, ``auto`` by default); the runtime's construction time."""
    model, tokenizer = load_bench_model(args.model, args.device, None, args.seed, "sdpa")
    started = time.perf_counter()
    h = make_harness(model, tokenizer, args.model, seed=args.seed, warmup=0, repeats=1, executor=args.executor)
    return h, time.perf_counter() - started


def header(h: Harness, section: str, startup_s: float, executor: str) -> dict:
    return {"section": section, "device": device_name(h.device), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "model": h.model_name,
            "dtype": str(h.model.dtype).removeprefix("torch."),
            "attn_implementation": h.model.config._attn_implementation, "executor_setting": executor,
            "runtime": repr(h.runtime), "runtime_startup_s": startup_s,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def call_row(sample: Sample, **extra) -> dict:
    """One spanctx call: its times (ms), tokens, executor and fallback."""
    o = sample.outcome
    return {**extra, "ttft_ms": o.ttft_s * 1e3, "total_ms": sample.total_s * 1e3, "computed_tokens": o.computed_tokens,
            "cached_tokens": o.cached_tokens, "new_tokens": len(o.new_ids), "executor": o.executor,
            "executor_fallback": o.executor_fallback}


def executor_text(row: dict) -> str:
    fallback = row.get("executor_fallback")
    return f"{row.get('executor')}" + (f" (FALLBACK: {fallback})" if fallback else "")


# ---- chat: first visits in a fresh process --------------------------------------------------


def chat_pass(h: Harness, turns: list[list[tuple[int, ...]]], new_tokens: int) -> dict:
    """The whole conversation (``chat_turns.conversation``'s blocks per turn) once from an
    empty store: one row per turn, and the worst turn after turn 1 against the median of
    the turns after turn 1."""
    h.runtime.store.clear()
    rows = []
    for t, blocks in enumerate(turns):
        ctx = Context().extend(blocks)
        sample = timed(lambda ctx=ctx: spanctx_generate(h.runtime, ctx, new_tokens), h.device)
        rows.append(call_row(sample, turn=t + 1, prompt_tokens=len(h.prompt_ids(*blocks))))
    later = [r["ttft_ms"] for r in rows[1:]]
    summary = {}
    if later:
        worst = max(range(1, len(rows)), key=lambda i: rows[i]["ttft_ms"])
        median = statistics.median(later)
        summary = {"worst_turn": worst + 1, "worst_ttft_ms": rows[worst]["ttft_ms"], "median_ttft_ms": median,
                   "worst_over_median": rows[worst]["ttft_ms"] / median}
    return {"turns": rows, **summary}


def run_chat(args) -> None:
    h, startup = load(args)
    config = chat_turns.Config(turns=args.turns, system_tokens=args.system_tokens, user_tokens=args.user_tokens,
                               reply_tokens=args.reply_tokens, new_tokens=args.new_tokens)
    turns = chat_turns.conversation(h, config)
    record = {**header(h, "chat", startup, args.executor), "config": attrs.asdict(config), "passes": {}}
    for name in ("fresh", "warm"):
        result = record["passes"][name] = chat_pass(h, turns, config.new_tokens)
        for row in result["turns"]:
            print(f"chat {name} turn {row['turn']:2}: TTFT {row['ttft_ms']:8.2f} ms  ({row['prompt_tokens']} "
                  f"tokens, {row['cached_tokens']} cached)  executor {executor_text(row)}", flush=True)
        if "worst_turn" in result:
            print(f"chat {name}: worst turn after turn 1 = turn {result['worst_turn']} at "
                  f"{result['worst_ttft_ms']:.2f} ms; median {result['median_ttft_ms']:.2f} ms; "
                  f"ratio {result['worst_over_median']:.2f}", flush=True)
        write_json(record, args.out)
    h.runtime.store.clear()
    full = [baselines.generate(h.model, h.tokenizer, h.prompt_ids(*blocks), 1, h.device).ttft_s * 1e3
            for blocks in turns]
    record["full_ttft_ms"] = full
    print("chat full prefill TTFT per turn (ms): " + " ".join(f"{v:.1f}" for v in full), flush=True)
    write_json(record, args.out)
    if args.checks:
        record["checks"] = checks_first_visit(h, args.checks, args.checks_context)
        write_json(record, args.out)


def checks_first_visit(h: Harness, count: int, context_tokens: int, calls: int = 4) -> dict:
    """``count`` aLoRA checks on a fresh, already stored context per call, in this process:
    the first call pays what a user's first check pays beyond the adapter's warm-up (which
    ``add_adapter`` runs on a warmed-up executor, timed here as ``adapter_load_s``)."""
    invocation = h.tokenizer(INVOCATION_TEXT, add_special_tokens=False)["input_ids"]
    with tempfile.TemporaryDirectory(prefix="fastpath-alora-") as tmp:
        folder = make_adapter(h.model, f"{tmp}/alora", rank=32, invocation_ids=invocation, seed=1)
        started = time.perf_counter()
        h.runtime.add_adapter("fastpath-check", folder, invocation=INVOCATION_TEXT)
        load_s = time.perf_counter() - started
    warm = h.runtime.adapter_warm_ups.get("fastpath-check")
    print(f"add_adapter: {load_s:.1f} s (warm-up: {warm})", flush=True)
    reqs = requirements(count)
    rows = []
    for i in range(calls):
        ctx = Context().append(h.source.block(context_tokens, "fastpath-checks", i))
        h.runtime.next_token_logits(ctx)  # the context is stored, as after a generation over it
        sample = timed(lambda ctx=ctx: h.runtime.check(ctx, reqs, adapter="fastpath-check"), h.device)
        stats = sample.outcome[0].stats
        rows.append({"call": i + 1, "total_ms": sample.total_s * 1e3, "executor": stats.executor,
                     "executor_fallback": stats.executor_fallback,
                     "builds": stats.static.builds if stats.static else None})
        print(f"checks call {i + 1}: {count} checks in {rows[-1]['total_ms']:.1f} ms, executor {stats.executor}, "
              f"buckets built {rows[-1]['builds']}", flush=True)
    later = statistics.median(r["total_ms"] for r in rows[1:])
    return {"count": count, "context_tokens": context_tokens, "calls": rows, "median_later_ms": later,
            "first_over_median": rows[0]["total_ms"] / later, "adapter_load_s": load_s,
            "adapter_warm_up": None if warm is None else attrs.asdict(warm)}


# ---- long: a long cached prefix ------------------------------------------------------------


def run_long(args) -> None:
    h, startup = load(args)
    record = {**header(h, "long", startup, args.executor), "context_tokens": args.context,
              "question_tokens": args.question_tokens, "new_tokens": args.new_tokens}
    context = h.source.block(args.context, "long-context")
    questions = [h.source.block(args.question_tokens, "long-question", i) for i in range(1 + args.repeats)]
    base = Context().append(context)
    started = now(h.device)
    try:  # the prefix into the store (untimed for the calls below)
        h.runtime.next_token_logits(base)
    except Exception as exc:
        record["store_prefix_error"] = f"{type(exc).__name__}: {exc}"
        print(f"long: storing the {args.context}-token prefix REFUSED: {record['store_prefix_error']}", flush=True)
    record["store_prefix_s"] = now(h.device) - started
    calls = []
    for i, question in enumerate(questions):
        started = now(h.device)
        try:
            sample = timed(lambda q=question: spanctx_generate(h.runtime, base.append(q), args.new_tokens), h.device)
            row = call_row(sample, call=i + 1)
        except Exception as exc:
            row = {"call": i + 1, "error": f"{type(exc).__name__}: {exc}", "total_ms": (now(h.device) - started) * 1e3}
            print(f"long call {i + 1}: REFUSED after {row['total_ms']:.1f} ms: {row['error']}", flush=True)
        else:
            print(f"long call {i + 1}: TTFT {row['ttft_ms']:8.2f} ms over {row['cached_tokens']} cached tokens  "
                  f"executor {executor_text(row)}", flush=True)
        calls.append(row)
    record["calls"] = calls
    timed_ttft = [r["ttft_ms"] for r in calls[1:] if "ttft_ms" in r]
    record["first_ttft_ms"] = calls[0].get("ttft_ms")
    record["median_ttft_ms"] = statistics.median(timed_ttft) if timed_ttft else None
    write_json(record, args.out)
    h.runtime.store.clear()
    if h.device.type == "cuda":
        torch.cuda.empty_cache()
    full = [baselines.generate(h.model, h.tokenizer, h.prompt_ids(context, q), 1, h.device).ttft_s * 1e3
            for q in questions[: args.full_repeats]]
    record["full_ttft_ms"] = statistics.median(full)
    record["full_ttft_runs_ms"] = full
    print(f"long full prefill TTFT: {record['full_ttft_ms']:.1f} ms (runs: {', '.join(f'{v:.1f}' for v in full)})",
          flush=True)
    write_json(record, args.out)


# ---- batch: generate_batch over a shared context -------------------------------------------


def decode_rate(sample: Sample, rows: int, new_tokens: int) -> float:
    """Decode tokens/s of one call: every row's tokens after its first, over the time after TTFT."""
    return rows * (new_tokens - 1) / (sample.total_s - sample.outcome.ttft_s)


def batch_generate(h: Harness, contexts: list[Context], new_tokens: int, held: list) -> Outcome:
    """``generate_batch`` of exactly ``new_tokens`` per row as one ``Outcome`` (TTFT: the
    batch's first token; tokens summed over rows); the rows' results land in ``held``."""
    held[:] = results = h.runtime.generate_batch(contexts, new_tokens, min_new_tokens=new_tokens)
    stats = [r.stats for r in results]
    return Outcome(min(s.ttft_s for s in stats), results[0].token_ids, sum(s.computed_tokens for s in stats),
                   sum(s.cached_tokens for s in stats), executor=distinct(s.executor for s in stats),
                   executor_fallback=distinct(s.executor_fallback for s in stats))


def run_batch(args) -> None:
    h, startup = load(args)
    record = {**header(h, "batch", startup, args.executor), "rows": args.rows, "context_tokens": args.context,
              "question_tokens": args.question_tokens, "new_tokens": args.new_tokens,
              "rate": "rows x (new_tokens - 1) / (total - TTFT); TTFT reported separately"}
    base = Context().append(h.source.block(args.context, "batch-shared"))
    h.runtime.next_token_logits(base)  # the shared context into the store, untimed

    def row_contexts(i: int) -> list[Context]:
        return [base.append(h.source.block(args.question_tokens, "batch-question", i, r)) for r in range(args.rows)]

    for method in ("single", "batch"):
        calls = []
        for i in range(1 + args.repeats):  # call 1: first visit (reported, not in the median)
            contexts = row_contexts(1000 * (method == "batch") + i)
            if method == "single":
                sample = timed(lambda c=contexts[0]: spanctx_generate(h.runtime, c, args.new_tokens), h.device)
                rows, tokens = 1, [sample.outcome.new_ids]
            else:
                held: list = []
                sample = timed(lambda c=contexts, out=held: batch_generate(h, c, args.new_tokens, out), h.device)
                rows, tokens = args.rows, [r.token_ids for r in held]
            if any(len(t) != args.new_tokens for t in tokens):
                raise RuntimeError(f"{method}: rows generated {[len(t) for t in tokens]} tokens, "
                                   f"not {args.new_tokens} each")
            row = call_row(sample, call=i + 1, tokens_per_s=decode_rate(sample, rows, args.new_tokens))
            print(f"batch {method} call {i + 1}: {row['tokens_per_s']:9.1f} decode tokens/s, TTFT "
                  f"{row['ttft_ms']:.2f} ms, total {row['total_ms']:.1f} ms  executor {executor_text(row)}",
                  flush=True)
            calls.append(row)
        record[method] = {"calls": calls,
                          "median_tokens_per_s": statistics.median(c["tokens_per_s"] for c in calls[1:]),
                          "median_ttft_ms": statistics.median(c["ttft_ms"] for c in calls[1:])}
        write_json(record, args.out)
    # greedy agreement: each batch row of the last call against one generate of the same context
    contexts = row_contexts(1000 + args.repeats)
    batch_tokens = [r.token_ids for r in h.runtime.generate_batch(contexts, args.new_tokens,
                                                                  min_new_tokens=args.new_tokens)]
    single_tokens = [h.runtime.generate(c, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens).token_ids
                     for c in contexts[: args.agreement_rows]]
    record["greedy_agreement"] = statistics.mean(match_fraction(s, b) for s, b in zip(single_tokens, batch_tokens))
    ratio = record["batch"]["median_tokens_per_s"] / record["single"]["median_tokens_per_s"]
    record["ratio"] = ratio
    print(f"batch: {record['batch']['median_tokens_per_s']:.1f} vs one row {record['single']['median_tokens_per_s']:.1f}"
          f" decode tokens/s = {ratio:.2f}x; greedy agreement with generate {record['greedy_agreement']:.3f}",
          flush=True)
    write_json(record, args.out)


# ---- command line --------------------------------------------------------------------------

SECTIONS = {"chat": run_chat, "long": run_long, "batch": run_batch}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=list(SECTIONS))
    parser.add_argument("--out", type=Path, required=True, help="the section's JSON file")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--executor", choices=["auto", "eager", "static"], default="auto", help="Runtime(executor=)")
    parser.add_argument("--context", type=int, help="long: cached prefix tokens (32768); batch: shared (4096)")
    parser.add_argument("--question-tokens", type=int, help="long: 64; batch: each row's question (32)")
    parser.add_argument("--new-tokens", type=int, help="chat: 32; long: 8; batch: 32")
    parser.add_argument("--repeats", type=int, default=3, help="long, batch: timed calls after the first")
    parser.add_argument("--full-repeats", type=int, default=2, help="long: full-prefill baseline runs")
    parser.add_argument("--rows", type=int, default=8, help="batch: rows")
    parser.add_argument("--agreement-rows", type=int, default=2, help="batch: rows compared with generate")
    parser.add_argument("--turns", type=int, default=12, help="chat: turns")
    parser.add_argument("--checks", type=int, default=10, help="chat: then N aLoRA checks, first visit (0: none)")
    parser.add_argument("--checks-context", type=int, default=4096, help="chat: the checks' context tokens")
    parser.add_argument("--system-tokens", type=int, default=1024, help="chat: system prompt tokens")
    parser.add_argument("--user-tokens", type=int, default=48, help="chat: tokens per user turn")
    parser.add_argument("--reply-tokens", type=int, default=32, help="chat: tokens per reply in the conversation")
    args = parser.parse_args(argv)
    defaults = {"chat": (None, None, 32), "long": (32768, 64, 8), "batch": (4096, 32, 32)}[args.section]
    for name, value in zip(("context", "question_tokens", "new_tokens"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    SECTIONS[args.section](args)


if __name__ == "__main__":
    main()
