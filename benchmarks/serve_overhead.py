"""What the server adds to a request (tiny model, CPU): the same completion through

- ``direct``: ``Runtime.generate`` in this process;
- ``scheduler``: the scheduler in this process (queue, worker thread, text rows), no HTTP;
- ``http`` / ``http_stream``: ``POST /v1/completions`` (SSE for the second) to a server in
  THIS process (uvicorn in a thread, one keep-alive ``httpx`` client): client and server
  share one GIL, as in a notebook;
- ``proc_*``: the same to ``spanctx serve`` in a child process, as deployed: ``proc_httpx``
  (httpx, what the ``openai`` package uses), ``proc_raw`` / ``proc_raw_stream`` (a minimal
  HTTP/1.1 client on a socket: the server's share, with next to no client cost);
- ``base_*``: with ``--baseline DIR`` (another spanctx checkout), the same to its server
  in a second child process, interleaved with ours: a before/after under the same load;
- without the model: ``noop_job`` (an empty job through the scheduler's queue and worker
  thread) and ``http_health`` (``GET /health`` in this process).

The calls are interleaved (one of each per round), so a noisy shared CPU slows each alike;
the overhead is the difference of medians (and of p90s) against ``direct``. Every mode
must make the same number of tokens (checked). ``load_average`` is recorded before and after.

    python benchmarks/serve_overhead.py --out benchmarks/results/serve/overhead_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import time

import httpx
import torch

from spanctx import Context, Runtime
from spanctx.presets import load_preset
from spanctx.serve.app import create_app, serving
from spanctx.serve.jobs import Done, Job
from spanctx.serve.local import LocalBackend
from spanctx.serve.protocol import GenRequest


class RawClient:
    """HTTP/1.1 on one keep-alive socket, request in one write: the cheapest client."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self._connect()

    def _connect(self) -> None:
        self.sock = socket.create_connection(self.address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def post(self, path: str, body: bytes) -> bytes:
        try:
            return self._post(path, body)
        except ConnectionError:  # the server closed an idle keep-alive connection: reconnect once
            self._connect()
            return self._post(path, body)

    def _post(self, path: str, body: bytes) -> bytes:
        self.sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
        head = self._until(b"\r\n\r\n")
        if b"chunked" in head.lower():  # SSE: chunks up to the empty one
            out = b""
            while True:
                size = int(self._until(b"\r\n"), 16)
                out += self._exactly(size + 2)[:size]
                if size == 0:
                    return out
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        return self._exactly(length)

    def _until(self, mark: bytes) -> bytes:
        while mark not in self.buf:
            self._read()
        out, _, self.buf = self.buf.partition(mark)
        return out

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._read()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _read(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data


@contextlib.contextmanager
def server_process(port: int, checkout: str = "."):
    """``spanctx serve tiny-llama`` of ``checkout`` in a child process (1 torch thread), until it answers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.abspath(checkout)}
    proc = subprocess.Popen([sys.executable, "-m", "spanctx.cli", "serve", "tiny-llama", "--device", "cpu",
                             "--port", str(port), "--max-batch", "1", "--store-bytes", str(64 << 20)], env=env,
                            cwd=checkout)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server process did not start")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--out", default=None)
    parser.add_argument("--baseline", default=None, help="another spanctx checkout to compare with (base_* modes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    model, tokenizer = load_preset("tiny-llama", device="cpu")
    rt = Runtime(model, tokenizer, store_bytes=64 << 20)
    backend = LocalBackend(rt, max_batch=1)
    prompt = "The manual's first chapter says that the pump " * 4
    ctx = Context().append(prompt)
    n = args.max_tokens
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": n}
    raw, raw_stream = json.dumps(body).encode(), json.dumps({**body, "stream": True}).encode()
    expected = rt.generate(ctx, n).text
    assert len(rt.generate(ctx, n).token_ids) == n, "the prompt must not meet EOS within max_tokens"

    def scheduler():
        events: queue.Queue = queue.Queue()
        backend.scheduler.submit(Job(events.put, request=GenRequest(ctx, n, {}), opts=rt.options(n)))
        while not isinstance(events.get(), Done):
            pass

    def noop_job():
        events: queue.Queue = queue.Queue()
        backend.scheduler.submit(Job(events.put, call=lambda rt: None))
        events.get()

    def text_of(reply: dict) -> str:
        assert reply["usage"]["completion_tokens"] == n
        return reply["choices"][0]["text"]

    def sse_text(data: bytes) -> str:
        chunks = [json.loads(line[6:]) for line in data.decode().split("\n") if line.startswith("data: {")]
        return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])

    def stream(client):
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            for _ in response.iter_lines():
                pass

    def remote_calls(stack: contextlib.ExitStack, prefix: str, checkout: str) -> dict:
        port = free_port()
        client = stack.enter_context(httpx.Client(base_url=stack.enter_context(server_process(port, checkout)),
                                                  timeout=60))
        rawc = RawClient("127.0.0.1", port)
        calls = {f"{prefix}_httpx": lambda: text_of(client.post("/v1/completions", json=body).json()),
                 f"{prefix}_httpx_stream": lambda: stream(client),
                 f"{prefix}_raw": lambda: text_of(json.loads(rawc.post("/v1/completions", raw))),
                 f"{prefix}_raw_stream": lambda: rawc.post("/v1/completions", raw_stream)}
        for name in (f"{prefix}_httpx", f"{prefix}_raw"):  # same weights (seeded preset), same greedy text
            assert calls[name]() == expected, name
        assert sse_text(rawc.post("/v1/completions", raw_stream)) == expected
        return calls

    with contextlib.ExitStack() as stack:
        url = stack.enter_context(serving(create_app(backend, "tiny-llama")))
        local = stack.enter_context(httpx.Client(base_url=url, timeout=60))
        calls = {
            "direct": lambda: rt.generate(ctx, n),
            "scheduler": scheduler,
            "http": lambda: text_of(local.post("/v1/completions", json=body).json()),
            "http_stream": lambda: stream(local),
            **remote_calls(stack, "proc", "."),
            **(remote_calls(stack, "base", args.baseline) if args.baseline else {}),
            "noop_job": noop_job,
            "http_health": lambda: local.get("/health"),
        }
        assert calls["http"]() == expected
        for _ in range(5):  # warm-up: the prompt's spans are stored, connections open
            for call in calls.values():
                call()
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    backend.scheduler.close()

    def p90(t: list[float]) -> float:
        return sorted(t)[int(0.9 * (len(t) - 1))]

    medians = {name: 1000 * statistics.median(t) for name, t in times.items()}
    p90s = {name: 1000 * p90(t) for name, t in times.items()}
    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "fastapi", "uvicorn",
                                                                     "uvloop", "httptools", "httpx")}
    record = {"args": vars(args), "median_ms": medians, "p90_ms": p90s,
              "overhead_ms": {name: medians[name] - medians["direct"] for name in medians if name != "direct"},
              "overhead_p90_ms": {name: p90s[name] - p90s["direct"] for name in p90s if name != "direct"},
              "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores shared (dev box), torch threads 1",
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "versions": versions, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name in medians:  # noqa: PLC0206 - two dicts by name
        print(f"{name:>18}: median {medians[name]:7.2f} ms ({medians[name] - medians['direct']:+6.2f})"
              f"   p90 {p90s[name]:7.2f} ms ({p90s[name] - p90s['direct']:+6.2f})")
    print(f"load average before {load_before}, after {os.getloadavg()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
