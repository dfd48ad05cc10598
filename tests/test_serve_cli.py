"""``spanctx serve`` as a user starts it: a subprocess on a free loopback port, stopped at the end."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[1]


def test_spanctx_serve_answers_and_stops():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "spanctx.cli", "serve", "tiny-llama", "--device", "cpu",
                               "--port", str(port), "--store-bytes", str(32 << 20), "--served-model-name", "tiny"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        reply = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                           timeout=60).json()
        tokens, finish = reply["usage"]["completion_tokens"], reply["choices"][0]["finish_reason"]
        # random weights: the preset may end its turn before max_tokens, and then says so
        assert reply["model"] == "tiny" and 1 <= tokens <= 2 and (tokens == 2 or finish == "stop")
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(60) == 0


def test_serve_options():
    from spanctx.serve.launch import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["m", "--adapter", "judge=/tmp/a", "--tier", "redis://127.0.0.1:1/0", "--replicas", "2"])
    assert (args.model, args.adapter, args.tier, args.replicas, args.max_batch, args.join_tokens) == \
        ("m", ["judge=/tmp/a"], ["redis://127.0.0.1:1/0"], 2, None, None)
