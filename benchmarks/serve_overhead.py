"""What the server adds to a request (tiny model, CPU): the same completion through

- ``direct``: ``Runtime.generate`` in this process;
- ``scheduler``: the scheduler in this process (queue, worker thread, text rows), no HTTP;
- ``http``: ``POST /v1/completions`` to the server on loopback (uvicorn in a thread here,
  one keep-alive ``httpx`` client), and ``http_stream`` the same with SSE;
- without the model: ``noop_job`` (an empty job through the scheduler's queue and worker
  thread) and ``http_health`` (``GET /health``): the serving layers' own cost, which on a
  loaded machine is mostly the OS waking threads (``load_average`` is recorded).

The calls are interleaved (one of each per round), so a noisy shared CPU slows each alike;
the overhead is the difference of medians against ``direct``.

    python benchmarks/serve_overhead.py --out benchmarks/results/serve/overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import time

import httpx
import torch

from spanctx import Context, Runtime
from spanctx.presets import load_preset
from spanctx.serve.app import create_app, serving
from spanctx.serve.jobs import Done, Job
from spanctx.serve.local import LocalBackend
from spanctx.serve.protocol import GenRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_preset("tiny-llama", device="cpu")
    rt = Runtime(model, tokenizer, store_bytes=64 << 20)
    backend = LocalBackend(rt, max_batch=1)
    prompt = "The manual's first chapter says that the pump " * 4
    ctx = Context().append(prompt)
    n = args.max_tokens

    def direct():
        rt.generate(ctx, n)

    def scheduler():
        events: queue.Queue = queue.Queue()
        backend.scheduler.submit(Job(events.put, request=GenRequest(ctx, n, {}), opts=rt.options(n)))
        while not isinstance(events.get(), Done):
            pass

    def noop_job():
        events: queue.Queue = queue.Queue()
        backend.scheduler.submit(Job(events.put, call=lambda rt: None))
        events.get()

    times: dict[str, list[float]] = {name: [] for name in ("direct", "scheduler", "http", "http_stream",
                                                            "noop_job", "http_health")}
    with serving(create_app(backend, "tiny")) as url, httpx.Client(base_url=url, timeout=60) as client:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": n}

        def http():
            assert client.post("/v1/completions", json=body).status_code == 200

        def http_stream():
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                for _ in response.iter_lines():
                    pass

        def http_health():
            assert client.get("/health").status_code == 200

        calls = {"direct": direct, "scheduler": scheduler, "http": http, "http_stream": http_stream,
                 "noop_job": noop_job, "http_health": http_health}
        for _ in range(5):  # warm-up: the prompt's spans are stored, connections open
            for call in calls.values():
                call()
        for _ in range(args.rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    backend.scheduler.close()
    medians = {name: 1000 * statistics.median(t) for name, t in times.items()}
    record = {"args": vars(args), "median_ms": medians,
              "overhead_ms": {name: medians[name] - medians["direct"] for name in medians if name != "direct"},
              "p90_ms": {name: 1000 * sorted(t)[int(0.9 * (len(t) - 1))] for name, t in times.items()},
              "machine": f"{platform.machine()} CPU, 2 cores shared (dev box), torch threads 1",
              "load_average": os.getloadavg(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name, ms in medians.items():
        print(f"{name:>12}: median {ms:7.2f} ms  vs direct {ms - medians['direct']:+6.2f} ms")
    print(f"load average {os.getloadavg()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
