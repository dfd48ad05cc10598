"""A bounded load test of one server on loopback (tiny model, CPU): ``--requests`` chat
requests from ``--clients`` concurrent ``openai`` clients (half of them streamed), all
sharing a system prompt, stopped at ``--max-seconds``. Records latency percentiles,
throughput, 429s, the scheduler's batch sizes and the cached share of prompt tokens.

    python benchmarks/serve_load.py --out benchmarks/results/serve/load_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import torch

from spanctx import Runtime
from spanctx.presets import load_preset
from spanctx.serve.app import create_app, serving
from spanctx.serve.local import LocalBackend

SYSTEM = "You are the support assistant of a pump maker; answer from the manual, briefly. " * 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=180)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_preset("tiny-llama", device="cpu")
    backend = LocalBackend(Runtime(model, tokenizer, store_bytes=256 << 20), max_batch=args.max_batch,
                           max_queue=args.max_queue)
    deadline = time.monotonic() + args.max_seconds
    outcomes: collections.Counter = collections.Counter()
    latencies, ttfts, prompt, cached, generated = [], [], [0], [0], [0]
    lock = threading.Lock()

    with serving(create_app(backend, "tiny")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def one(i: int) -> None:
            if time.monotonic() > deadline:
                with lock:
                    outcomes["skipped (time limit)"] += 1
                return
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}: how often?"}]
            start = time.perf_counter()
            try:
                if i % 2:
                    first, usage = None, None
                    for chunk in client.chat.completions.create(model="tiny", messages=msgs, max_tokens=args.max_tokens,
                                                                stream=True, stream_options={"include_usage": True}):
                        if chunk.choices and chunk.choices[0].delta.content and first is None:
                            first = time.perf_counter() - start
                        usage = chunk.usage or usage
                else:
                    usage = client.chat.completions.create(model="tiny", messages=msgs,
                                                           max_tokens=args.max_tokens).usage
                    first = None
            except openai.RateLimitError:
                with lock:
                    outcomes["429"] += 1
                return
            with lock:
                outcomes["ok"] += 1
                latencies.append(time.perf_counter() - start)
                if first is not None:
                    ttfts.append(first)
                prompt[0] += usage.prompt_tokens
                cached[0] += usage.prompt_tokens_details.cached_tokens
                generated[0] += usage.completion_tokens

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - start
    backend.scheduler.close()

    def pct(values, q):
        return 1000 * sorted(values)[int(q * (len(values) - 1))] if values else None

    sizes = collections.Counter(backend.scheduler.batch_sizes)
    record = {"args": vars(args), "outcomes": dict(outcomes), "wall_s": wall,
              "requests_per_s": outcomes["ok"] / wall, "generated_tokens_per_s": generated[0] / wall,
              "latency_ms": {"p50": pct(latencies, 0.5), "p90": pct(latencies, 0.9), "p99": pct(latencies, 0.99)},
              "stream_ttft_ms": {"p50": pct(ttfts, 0.5), "p90": pct(ttfts, 0.9)},
              "cached_fraction": cached[0] / max(1, prompt[0]), "batch_sizes": dict(sorted(sizes.items())),
              "mean_batch": statistics.mean(backend.scheduler.batch_sizes) if sizes else 0,
              "machine": "2-core CPU (shared dev box), tiny-llama fp32", "load_average": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps({k: v for k, v in record.items() if k not in ("args",)}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
