"""TTFT when a span's KV comes from each tier, against recomputing it.

    python benchmarks/tiers_bench.py --out DIR [--preset tiny-llama|llama-3.2-1b|llama-3.1-8b]
        [--span 4096] [--sources tier0,pinned,cpu,disk,redis,recompute] [--redis-server PATH]

One prompt: a ``--span``-token document, then a 16-token question; one new token. For
each source the document's span reaches tier 0 of an otherwise empty store from there:
``tier0`` (already stored), ``pinned`` / ``cpu`` (host memory), ``disk`` (safetensors;
the files are fsynced and dropped from the page cache with posix_fadvise before each
read, so bytes come from the device), ``redis`` (a redis-server started here on a free
loopback port), ``recompute`` (a full prefill, ``reuse=False``). Lower tiers are read
with cost-aware fetching off (what the tier costs) and on (what the policy does:
``*-policy`` rows). Each row: median TTFT over ``--repeats`` (after one warm-up), bytes
fetched and their rate. Writes DIR/tiers-<label>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spanctx  # noqa: E402
from spanctx import Context  # noqa: E402
from spanctx.cache.tiers import DiskTier, TierStack, open_tier  # noqa: E402

SHAPES = {  # preset and overrides: random weights in a public model's shape
    "tiny-llama": ("tiny-llama", {}),
    "llama-3.2-1b": ("llama-3.1-8b", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                          num_attention_heads=32, num_key_value_heads=8)),
    "llama-3.1-8b": ("llama-3.1-8b", {}),
}


@contextlib.contextmanager
def redis_server(exe: str, maxmemory: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--maxmemory", str(maxmemory), "--maxmemory-policy", "allkeys-lru"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def drop_page_cache(tier: DiskTier) -> None:
    """fsync the tier's files and ask the kernel to drop them from the page cache."""
    for path in tier.root.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(rt, ctx, repeats: int, before=None, reuse: bool = True, warmup: bool = True) -> dict:
    """Median TTFT of ``repeats`` one-token calls (after a warm-up call unless ``warmup``
    is False), and the last call's tier stats."""
    times, last = [], None
    for i in range(repeats + warmup):
        if before:
            before()
        result = rt.generate(ctx, 1, reuse=reuse)
        if i or not warmup:
            times.append(result.stats.ttft_s)
        last = result.stats
    row = {"ttft_ms": statistics.median(times) * 1e3, "ttft_all_ms": [t * 1e3 for t in times],
           "cached_tokens": last.cached_tokens, "computed_tokens": last.computed_tokens}
    if last.tiers is not None:
        t = last.tiers
        row.update(fetched_bytes=t.bytes, fetch_ms=t.fetch_s * 1e3, hits=t.hits, recomputed=t.recomputed,
                   rate_gb_s=t.bytes / t.fetch_s / 1e9 if t.fetch_s else None, decisions=list(t.decisions))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="tiny-llama", choices=sorted(SHAPES))
    ap.add_argument("--span", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--sources", default="tier0,pinned,disk,redis,recompute")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--recompute-repeats", type=int, default=None, help="default: --repeats")
    ap.add_argument("--redis-server", default=shutil.which("redis-server"))
    ap.add_argument("--disk-dir", default=None)
    ap.add_argument("--executor", default="auto")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = args.sources.split(",")

    preset, overrides = SHAPES[args.preset]
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tok = spanctx.load_preset(preset, device=args.device, dtype=dtype, **overrides)
    identity = f"bench-{args.preset}"
    ctx = Context().append(("spans outlive the process. " * (args.span // 27 + 1))[:args.span]) \
                   .append("Which tier is it?")
    span_bytes = None

    def runtime(tiers=None):
        return spanctx.Runtime(model, tok, store_bytes=8 * (args.span + 64) * kv_per_token + (1 << 30),
                               tiers=tiers, model_identity=identity, executor=args.executor)

    probe = spanctx.Runtime(model, tok, store_bytes=1 << 30, model_identity=identity, executor="eager")
    kv_per_token = probe.engine.kv_bytes_per_token
    span_bytes = args.span * kv_per_token
    del probe
    rows: dict[str, dict] = {}
    started = time.perf_counter()
    result = {
        "benchmark": "tiers", "preset": args.preset, "span_tokens": args.span, "span_bytes": span_bytes,
        "kv_bytes_per_token": kv_per_token, "dtype": str(model.dtype), "device": _device_name(args.device),
        "executor": args.executor, "repeats": args.repeats,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0], "redis_server": _redis_version(args.redis_server)},
        "cpu_threads": torch.get_num_threads(), "rows": rows,
    }
    label = f"{args.preset}-{args.span}-{result['device'].replace(' ', '-').lower()}"

    def save(name: str) -> None:
        """Print one row and rewrite the JSON (a run cut short keeps what finished)."""
        print(f"{name}: {rows[name]['ttft_ms']:.1f} ms", flush=True)
        result["seconds"] = time.perf_counter() - started
        (out / f"tiers-{label}.json").write_text(json.dumps(result, indent=1))

    with contextlib.ExitStack() as stack:
        disk_dir = args.disk_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="spanctx-tiers-"))
        urls = {"pinned": "pinned?max_bytes=64G", "cpu": "cpu?max_bytes=64G", "disk": f"disk://{disk_dir}"}
        if "redis" in sources:
            if not args.redis_server:
                print("redis: no redis-server binary, skipped")
                sources.remove("redis")
            else:
                urls["redis"] = stack.enter_context(redis_server(args.redis_server, 4 * span_bytes + (1 << 30)))
        source = runtime()
        source.generate(ctx, 1)  # computes the prompt once (and warms the model up); its spans feed every tier
        if "recompute" in sources:
            rows["recompute"] = measure(source, ctx, args.recompute_repeats or args.repeats, reuse=False,
                                        warmup=False)
            save("recompute")
        if "tier0" in sources:
            rows["tier0"] = measure(source, ctx, args.repeats)
            save("tier0")
        spans = {entry.key: source.store.lookup(entry.key) for entry in source.store.index.entries()}
        for name in [s for s in sources if s in urls]:
            tier = open_tier(urls[name])
            writer = TierStack([tier])
            for key, kv in spans.items():
                writer.stored(key, kv)
            writer.flush()
            for policy in (False, True):
                rt = runtime(TierStack([tier], cost_aware=policy))
                rt.engine.prefill_cost  # noqa: B018 (the policy's one probe, paid once per runtime: not timed)

                def before(rt=rt, tier=tier):
                    rt.store.clear()
                    if isinstance(tier, DiskTier):
                        drop_page_cache(tier)

                row = f"{name}-policy" if policy else name
                rows[row] = measure(rt, ctx, args.repeats, before)
                save(row)
                rt.store.clear()
                del rt
                gc.collect()
    (out / f"tiers-{label}.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / f"tiers-{label}.md").write_text(table)
    print(table)
    plot(result, out / f"tiers-{label}.png")
    return 0


def markdown(result: dict) -> str:
    rows = result["rows"]
    base = rows.get("recompute", {}).get("ttft_ms")
    zero = rows.get("tier0", {}).get("ttft_ms")
    lines = [f"# Tiers: {result['preset']} shape, {result['span_tokens']}-token span "
             f"({result['span_bytes'] / 2**20:.0f} MiB of KV), {result['device']}, {result['date']}",
             "", f"torch {result['versions']['torch']}, transformers {result['versions']['transformers']}, "
             f"{result['dtype']}, executor {result['executor']}, median of {result['repeats']}", "",
             "| source | TTFT ms | vs recompute | vs tier 0 | fetched MiB | fetch ms | GB/s | policy |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        speed = f"{base / row['ttft_ms']:.1f}x faster" if base else ""
        ratio = f"{row['ttft_ms'] / zero:.2f}x" if zero else ""
        fetched, fetch_ms, rate = row.get("fetched_bytes"), row.get("fetch_ms"), row.get("rate_gb_s")
        policy = ("fetched" if row.get("hits") else "recomputed" if row.get("recomputed") else "") \
            if name.endswith("-policy") else ""
        cells = ["" if fetched is None else f"{fetched / 2**20:.0f}", "" if fetch_ms is None else f"{fetch_ms:.1f}",
                 "" if not rate else f"{rate:.2f}"]
        lines.append(f"| {name} | {row['ttft_ms']:.1f} | {speed} | {ratio} | {' | '.join(cells)} | {policy} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    names = list(result["rows"])
    values = [result["rows"][n]["ttft_ms"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(names, values, color=["tab:red" if n == "recompute" else "tab:blue" for n in names])
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms, log scale)")
    ax.set_title(f"{result['preset']} shape, {result['span_tokens']}-token span, {result['device']}")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def _redis_version(exe: str | None) -> str | None:
    if not exe:
        return None
    try:
        return subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
