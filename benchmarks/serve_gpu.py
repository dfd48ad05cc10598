"""Concurrent chat sessions sharing a long system prompt: the scheduler vs the alternatives.

In-process (no HTTP: the GPU box has no fastapi/uvicorn), the same workload six ways:

- ``lone``: ONE session calling ``Runtime.generate`` (the static executor's own decode
  loop on a GPU): the fastest single-session path, the reference of every ratio;
- ``lone_lanes``: ONE session through the continuous scheduler (a lane alone);
- ``lanes``: S sessions at once through the continuous scheduler (``engine.lanes``: turns
  join and leave the running decode between steps);
- ``grouped``: S sessions through the scheduler without lanes (waiting turns run as one
  batched call when the model frees; what the server did before lanes);
- ``lock``: S threads calling ``Runtime.generate`` directly (serialised by its lock);
- ``hf_threads``: S threads calling HF ``model.generate`` on the full prompt (no reuse), as
  an in-process server over plain transformers does.

Each session runs ``--turns`` turns: a user message, a reply of up to ``--new-tokens``
tokens (``--exact``: exactly, through ``min_new_tokens``; random weights almost never emit
EOS, and the tokens actually made are counted), the reply appended. TTFT is measured from
a turn's submission to its first token (queueing included). Writes JSON to ``--out``;
prints a table.

    python benchmarks/serve_gpu.py --model llama-3.1-8b --out $OUT/serve_gpu.json
    python benchmarks/serve_gpu.py --model tiny-llama --device cpu --system-tokens 256   # dry run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import queue
import statistics
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from spanctx import Context, Runtime
from spanctx.engine.calls import FinalCall
from spanctx.presets import load_preset
from spanctx.serve.jobs import Done, Job
from spanctx.serve.protocol import GenRequest
from spanctx.serve.scheduler import Scheduler


class FirstToken(BaseStreamer):
    """Records when the first new token reaches the host (the prompt's put is skipped)."""

    def __init__(self) -> None:
        self.puts, self.at = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2 and self.at is None:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def system_prompt(tokens: int) -> str:
    line = "Rule {i}: answer with care, cite the manual, and keep replies short and exact. "
    text, i = "", 0
    while len(text) < tokens:  # byte tokenizer: one token per byte
        text += line.format(i=i)
        i += 1
    return text[:tokens]


def turn_context(system: str, tag: str, session: int, history: list[tuple[str, str]], turn: int) -> Context:
    msgs = [{"role": "system", "content": system}]
    for user, reply in history:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    msgs.append({"role": "user", "content": f"[{tag:>10}] Session {session}, turn {turn}: what does rule {7 * session + turn} say?"})
    return Context.chat(msgs)


EXTRA: dict = {}  # min_new_tokens with --exact


def via_scheduler(scheduler: Scheduler, rt: Runtime, ctx: Context, new_tokens: int) -> tuple[str, float, int]:
    events: queue.Queue = queue.Queue()
    kwargs = dict(EXTRA)
    job = Job(events.put, request=GenRequest(ctx, new_tokens, kwargs), opts=rt.options(new_tokens, **kwargs))
    start = time.perf_counter()
    scheduler.submit(job)
    pieces, first = [], None
    while not isinstance(event := events.get(), Done):
        first = first or time.perf_counter()
        pieces.append(event)
    if event.error:
        raise event.error
    # a whole reply's text comes at its end (decoded once): the worker's first-token time is the TTFT
    ttft = event.ttft_s if event.ttft_s is not None else (first or time.perf_counter()) - start
    return "".join(pieces), ttft, event.completion_tokens


def via_lock(rt: Runtime, ctx: Context, new_tokens: int) -> tuple[str, float, int]:
    streamer, start = FirstToken(), time.perf_counter()
    result = rt.generate(ctx, new_tokens, streamer=streamer, **EXTRA)
    return result.text, (streamer.at or time.perf_counter()) - start, len(result.token_ids)


def via_hf(rt: Runtime, ctx: Context, new_tokens: int) -> tuple[str, float, int]:
    ids = torch.tensor([rt.token_ids(ctx)], device=rt.device)
    streamer, start = FirstToken(), time.perf_counter()
    with torch.inference_mode():
        out = rt.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                do_sample=False, streamer=streamer,
                                pad_token_id=rt.pad_token_id, **EXTRA)
    new = out[0, ids.shape[1]:].tolist()
    return rt.tokenizer.decode(new, skip_special_tokens=True), (streamer.at or time.perf_counter()) - start, len(new)


def run_sessions(ask, tag: str, sessions: int, turns: int, system: str, new_tokens: int) -> dict:
    """``sessions`` threads of ``turns`` turns each; ``tag`` makes the user messages new (only
    the system prompt is shared with other runs)."""
    ttfts, tokens = [], [0]
    lock = threading.Lock()

    def session(s: int) -> None:
        history = []
        for t in range(turns):
            ctx = turn_context(system, tag, s, history, t)
            text, ttft, n = ask(ctx, new_tokens)
            with lock:
                ttfts.append(ttft)
                tokens[0] += n
            history.append((ctx.spans[-2].content.content, text))

    start = time.perf_counter()
    with ThreadPoolExecutor(sessions) as pool:
        list(pool.map(session, range(sessions)))
    wall = time.perf_counter() - start
    return {"sessions": sessions, "turns": turns, "tokens": tokens[0], "wall_s": wall,
            "tokens_per_s": tokens[0] / wall, "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p90_ms": 1000 * sorted(ttfts)[math.ceil(0.9 * (len(ttfts) - 1))], "turn_ttfts_ms": [1000 * t for t in ttfts]}


def lanes_direct(rt: Runtime, system: str, sessions: int, new_tokens: int) -> dict:
    """The first turn of each session run as lanes directly (``Engine.lanes``, no threads):
    what admitting them costs, the step they join in, the decode steps after; then each
    alone through ``Runtime.generate``: how many replies have identical token ids (bf16: a
    row's arithmetic depends on its batch), and where the first difference is."""
    def sync() -> float:
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    contexts = [turn_context(system, "direct", s, [], 0) for s in range(sessions)]
    opts = rt.options(new_tokens, **EXTRA)
    made = []
    with rt.holding(), rt.engine.lanes(sessions) as lanes:
        started = sync()
        for ctx in contexts:
            with rt.prepared(ctx, max_new_tokens=new_tokens) as prepared:
                call = FinalCall.tails([prepared.assembly], decode=opts)
            assert lanes.refuses(call) is None
            made.append(lanes.admit(call))
        admitted = sync()
        tail_tokens = sum(lane.tail_ids.shape[0] for lane in lanes.lanes)
        lanes.step()
        joined = sync()
        steps = []
        while len(lanes):
            before = sync()
            lanes.step()
            steps.append(sync() - before)
    tokens = [lane.tokens for lane in made]
    alone = [list(rt.generate(ctx, new_tokens, **EXTRA).token_ids) for ctx in contexts]
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(alone, tokens)]
    return {"admit_ms": 1000 * (admitted - started), "join_step_ms": 1000 * (joined - admitted),
            "join_tail_tokens": tail_tokens, "decode_step_ms_p50": 1000 * statistics.median(steps),
            "identical": sum(a == b for a, b in zip(alone, tokens)), "of": sessions,
            "first_difference_at_token": first_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--system-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--modes", default="lone,lone_lanes,lanes,grouped,lock,hf_threads")
    parser.add_argument("--exact", action="store_true", help="replies of exactly --new-tokens (min_new_tokens)")
    parser.add_argument("--join-tokens", type=int, default=None, help="the lanes' join budget (Scheduler)")
    parser.add_argument("--check-model", default="tiny-trained",
                        help="first, lanes vs Runtime.generate on this model in fp32 (token agreement); '' to skip")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.exact:
        EXTRA["min_new_tokens"] = args.new_tokens

    check = None
    if args.check_model:  # lanes against alone where the arithmetic is exact enough to compare tokens
        small, small_tokenizer = load_preset(args.check_model, device=args.device, dtype=torch.float32)
        small_rt = Runtime(small, small_tokenizer, store_bytes=1 << 30,
                           **({} if args.device == "cuda" else {"executor": "static"}))
        small_rt.engine.warm_up_rows(range(2, args.sessions + 1))
        check = lanes_direct(small_rt, system_prompt(512), args.sessions, 24)
        print(f"{args.check_model} fp32, lanes vs alone: {check}", flush=True)
        small_rt.close()
        del small, small_rt
    model, tokenizer = load_preset(args.model, device=args.device)
    rt = Runtime(model, tokenizer, store_bytes=8 << 30 if args.device == "cuda" else 1 << 30,
                 **({} if args.device == "cuda" else {"executor": "static"}))  # lanes need the static executor
    started = time.perf_counter()
    warm = rt.engine.warm_up_rows(range(2, args.sessions + 1))  # as the server does at start
    print(f"warm_up_rows: {time.perf_counter() - started:.1f} s ({warm})", flush=True)
    budget = {} if args.join_tokens is None else {"join_tokens": args.join_tokens}
    lanes = Scheduler(rt, max_batch=args.sessions, max_queue=4 * args.sessions, continuous=True, **budget)
    grouped = Scheduler(rt, max_batch=args.sessions, max_queue=4 * args.sessions, continuous=False)
    system = system_prompt(args.system_tokens)
    asks = {"lone": lambda c, n: via_lock(rt, c, n), "lone_lanes": lambda c, n: via_scheduler(lanes, rt, c, n),
            "lanes": lambda c, n: via_scheduler(lanes, rt, c, n),
            "grouped": lambda c, n: via_scheduler(grouped, rt, c, n),
            "lock": lambda c, n: via_lock(rt, c, n), "hf_threads": lambda c, n: via_hf(rt, c, n)}
    # warm-up: the system prompt is stored, every path has run once
    for mode in ("lanes", "grouped", "lone"):
        run_sessions(asks[mode], "warm" + mode, args.sessions if mode != "lone" else 1, 1, system, 4)
    results, failures = {}, {}
    direct = lanes_direct(rt, system, args.sessions, args.new_tokens)
    print(f"lanes direct: {direct}", flush=True)
    for mode in args.modes.split(","):
        sessions = 1 if mode.startswith("lone") else args.sessions
        batches, counts, seconds = len(grouped.batch_sizes), dict(lanes.counts), dict(lanes.seconds)
        try:
            results[mode] = run_sessions(asks[mode], mode, sessions, args.turns, system, args.new_tokens)
        except Exception as exc:  # noqa: BLE001 - one failing mode must not lose the others' figures
            traceback.print_exc()
            failures[mode] = repr(exc)
            continue
        if mode == "grouped":
            results[mode]["batch_sizes"] = grouped.batch_sizes[batches:]
        if mode in ("lanes", "lone_lanes"):
            steps = lanes.counts["lane_steps"] - counts.get("lane_steps", 0)
            results[mode]["lane_steps"] = steps
            results[mode]["tokens_per_step"] = results[mode]["tokens"] / max(steps, 1)
            results[mode]["join_steps"] = lanes.counts["join_steps"] - counts.get("join_steps", 0)
            results[mode]["seconds"] = {k: v - seconds.get(k, 0.0) for k, v in lanes.seconds.items()}
        print(f"{mode:>11}: {results[mode]['tokens_per_s']:8.1f} tok/s  TTFT p50 {results[mode]['ttft_p50_ms']:8.1f} ms"
              f"  p90 {results[mode]['ttft_p90_ms']:8.1f} ms  ({results[mode]['tokens']} tokens, "
              f"{results[mode]['wall_s']:.1f} s)", flush=True)
    lanes.close()
    grouped.close()
    lone = results.get("lone")
    if lone:
        for mode, r in results.items():
            r["vs_lone_throughput"] = r["tokens_per_s"] / lone["tokens_per_s"]
            r["vs_lone_ttft_p50"] = r["ttft_p50_ms"] / lone["ttft_p50_ms"]
            print(f"{mode:>11}: throughput {r['vs_lone_throughput']:.2f}x lone, TTFT p50 {r['vs_lone_ttft_p50']:.2f}x lone")
    record = {"args": vars(args), "results": results, "failures": failures, "lanes_direct": direct, "check_fp32": check,
              "join_tokens": lanes.join_tokens,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
