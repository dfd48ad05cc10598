"""One captured CUDA graph per bucket: built on the first call of the bucket, replayed after.

A step is a function of a bucket key that reads only fixed-address device tensors and
returns a tensor (the logits). ``StepGraphs.run(key)`` captures ``step(key)`` into a
``torch.cuda.CUDAGraph`` the first time it sees ``key`` (after warm-up runs on the
capture's own stream, which also trigger ``torch.compile`` when the step calls a
compiled model) and
replays it afterwards; the returned tensor is the graph's own output buffer, valid
until the next run of the same bucket. With graphs off, ``run`` calls the step.

All graphs share one memory pool: they never run concurrently (one stream, one call at
a time) and each keeps its output alive, so one bucket's intermediates may reuse
another's memory. Capture and compile time is paid once per key and counted in
``BuildStats``.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import time
import weakref
from collections.abc import Callable, Hashable, Iterator

import attrs
import torch

__all__ = ["BuildStats", "StepGraphs", "collector_paused"]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Collect garbage now, then keep Python's collector off for the block.

    Around a capture: a collection inside it that frees another graph or its memory pool
    (an executor dropped earlier) would free device memory during a global-mode capture,
    which invalidates the capture.
    """
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@attrs.frozen
class BuildStats:
    """Buckets built (captured, or prepared without graphs) and the seconds they took."""

    builds: int = 0
    seconds: float = 0.0

    def plus(self, seconds: float) -> BuildStats:
        return BuildStats(self.builds + 1, self.seconds + seconds)

    def since(self, earlier: BuildStats) -> BuildStats:
        return BuildStats(self.builds - earlier.builds, self.seconds - earlier.seconds)


@attrs.frozen(eq=False)
class _Captured:
    graph: torch.cuda.CUDAGraph
    output: torch.Tensor


class StepGraphs:
    """Runs ``step(key)`` through one CUDA graph per key (``graphs=True``) or directly.

    ``warmup``: eager runs before a capture (compiled steps need two: compile, then a
    run of the compiled code, so that nothing is compiled or autotuned while capturing).
    """

    def __init__(self, step: Callable[[Hashable], torch.Tensor], *, graphs: bool, warmup: int = 1) -> None:
        # a bound method is held weakly: its owner owns this object, and a cycle would
        # leave dropped owners (and their graphs) to the collector
        self._step = weakref.WeakMethod(step) if inspect.ismethod(step) else (lambda: step)
        self.graphs = graphs
        self.warmup = warmup
        self.stats = BuildStats()
        self._built: dict[Hashable, _Captured | None] = {}
        self._pool = torch.cuda.graph_pool_handle() if graphs else None
        # warm-ups and captures share one stream: libraries that set up per-stream state on
        # first use (cuBLAS's workspace) do it in a warm-up, never inside a capture
        self._stream = torch.cuda.Stream() if graphs else None

    def step(self, key: Hashable) -> torch.Tensor:
        return self._step()(key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._built

    def run(self, key: Hashable) -> torch.Tensor:
        """The step's output for ``key``; the first run of a key builds it."""
        if key not in self._built:
            started = time.perf_counter()
            captured = self._capture(key) if self.graphs else None
            self._built[key] = captured
            if self.graphs:
                torch.cuda.synchronize()
            self.stats = self.stats.plus(time.perf_counter() - started)
        captured = self._built[key]
        if captured is None:
            return self.step(key)
        captured.graph.replay()
        return captured.output

    def drop(self, stale: Callable[[Hashable], bool]) -> None:
        """Forget the steps of every key ``stale`` holds true for (their graphs, and the
        memory they hold in the pool, go with them)."""
        self._built = {key: built for key, built in self._built.items() if not stale(key)}

    def _capture(self, key: Hashable) -> _Captured:
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for _ in range(self.warmup):
                self.step(key)
        torch.cuda.current_stream().wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        with collector_paused(), torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            output = self.step(key)
        return _Captured(graph, output)
