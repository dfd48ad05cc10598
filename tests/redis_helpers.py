"""A real redis-server for tests: started on a free loopback port, bounded in time,
always stopped. Tests that need it skip, saying why, when the binary is absent."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import attrs
import pytest

START_TIMEOUT_S = 10.0


@attrs.define
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen

    def stop(self) -> None:
        """Stop the server now (idempotent): what a crash of the server looks like to clients."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(maxmemory: int | None = None) -> Iterator[RedisServer]:
    """A fresh, empty server (no persistence); ``maxmemory``: bytes, evicting allkeys-lru."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server; CI installs it)")
    redis = pytest.importorskip("redis")
    port = _free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if maxmemory is not None:
        args += ["--maxmemory", str(maxmemory), "--maxmemory-policy", "allkeys-lru"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(f"redis://127.0.0.1:{port}/0", port, process)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.05)
        client.close()
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
