"""Span-affinity routing on a local Ray cluster (CPU): 4 distinct long contexts x 32 questions
in random order, sent by 4 concurrent clients, through

- ``affinity``: 2 replicas behind ``SpanAffinityRouter``;
- ``default``: 2 replicas behind Ray's default router (power of two choices: by load,
  blind to what a replica holds; the "random routing" baseline);
- ``single``: 1 replica.

Reported per mode: the fraction of prompt tokens served from a store (``cached``), the
fraction of requests whose document came from the store (``doc_hits``), each replica's
store hits/misses, and wall time. ``--store-docs``: each replica's store budget in
documents (0: unbounded). Loopback only; bounded by ``--questions``.

    python benchmarks/serve_affinity.py --out benchmarks/results/serve/affinity_cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ray
from ray import serve

from spanctx.serve.local import RuntimeSpec
from spanctx.serve.ray_app import build_app

KV_BYTES_PER_TOKEN = 4 * 2 * 2 * 32 * 4  # tiny-llama: layers x (k, v) x kv heads x head dim x fp32


def documents(n: int, tokens: int) -> list[str]:
    out = []
    for d in range(n):
        text, i = "", 0
        while len(text) < tokens:
            text += f"Document {d}, clause {i}: the {['red', 'blue', 'green', 'grey'][d % 4]} valve opens at {i * 7 % 97} bar. "
            i += 1
        out.append(text[:tokens])
    return out


def run_mode(url: str, workload: list[tuple[int, str]], docs: list[str], clients: int) -> dict:
    def ask(item):
        d, question = item
        body = {"context": [docs[d], f"Question: {question} Answer:"], "max_tokens": 1}
        return d, httpx.post(url + "/v1/spanctx/generate", json=body, timeout=300).json()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        replies = list(pool.map(ask, workload))
    wall = time.perf_counter() - start
    prompt = sum(r["usage"]["prompt_tokens"] for _, r in replies)
    cached = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for _, r in replies)
    doc_hits = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(docs[d]) for d, r in replies)
    stores = {}
    for _, r in replies:  # the last reply of each replica carries its final counters
        stores[r["replica"]] = r["store"]
    placement = {}
    for d, r in replies:
        placement.setdefault(d, set()).add(r["replica"])
    return {"requests": len(replies), "wall_s": wall, "cached_fraction": cached / prompt,
            "doc_hit_rate": doc_hits / len(replies),
            "store_hits": sum(s["hits"] for s in stores.values()),
            "store_misses": sum(s["misses"] for s in stores.values()),
            "store_evictions": sum(s["evictions"] for s in stores.values()),
            "replicas_per_doc": {d: len(rs) for d, rs in sorted(placement.items())},
            "per_replica": stores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--doc-tokens", type=int, default=1500)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--store-docs", type=float, default=0, help="store budget per replica, in documents (0: unbounded)")
    parser.add_argument("--modes", default="affinity,default,single")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    docs = documents(args.docs, args.doc_tokens)
    workload = [(d, f"what does clause {q} of document {d} say?") for d in range(args.docs) for q in range(args.questions)]
    random.Random(args.seed).shuffle(workload)
    store = int(args.store_docs * args.doc_tokens * KV_BYTES_PER_TOKEN) if args.store_docs else 256 << 20
    spec = RuntimeSpec("tiny-llama", device="cpu", store_bytes=store)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = {}
    try:
        for mode in args.modes.split(","):
            app = build_app(spec, "tiny", replicas=1 if mode == "single" else 2,
                            router="default" if mode == "default" else "affinity")
            serve.run(app, name=f"spanctx-{mode}", route_prefix="/")
            results[mode] = run_mode(f"http://127.0.0.1:{port}", workload, docs, args.clients)
            serve.delete(f"spanctx-{mode}")
            r = results[mode]
            print(f"{mode:>9}: cached {r['cached_fraction']:.3f}  doc hits {r['doc_hit_rate']:.3f}  store hits "
                  f"{r['store_hits']} misses {r['store_misses']} evictions {r['store_evictions']}  "
                  f"replicas/doc {r['replicas_per_doc']}  {r['wall_s']:.1f} s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    if "single" in results:
        for mode, r in results.items():
            r["doc_hit_rate_vs_single"] = r["doc_hit_rate"] / results["single"]["doc_hit_rate"]
            r["cached_vs_single"] = r["cached_fraction"] / results["single"]["cached_fraction"]
            print(f"{mode:>9}: doc hit rate {r['doc_hit_rate_vs_single']:.3f}x single, cached tokens "
                  f"{r['cached_vs_single']:.3f}x single")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results, "machine": "2-core CPU (shared dev box), tiny-llama fp32",
                       "ray": ray.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                      f, indent=1, default=sorted)


if __name__ == "__main__":
    main()
