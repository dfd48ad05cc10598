"""One captured CUDA graph per bucket: built on the first call of the bucket, replayed after.

A step is a function of a bucket key that reads only fixed-address device tensors and
returns a tensor (the logits). ``StepGraphs.run(key)`` captures ``step(key)`` into a
``torch.cuda.CUDAGraph`` the first time it sees ``key`` (after warm-up runs on a side
stream, which also trigger ``torch.compile`` when the step calls a compiled model) and
replays it afterwards; the returned tensor is the graph's own output buffer, valid
until the next run of the same bucket. With graphs off, ``run`` calls the step.

All graphs share one memory pool: they never run concurrently (one stream, one call at
a time) and each keeps its output alive, so one bucket's intermediates may reuse
another's memory. Capture and compile time is paid once per key and counted in
``BuildStats``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

import attrs
import torch

__all__ = ["BuildStats", "StepGraphs"]


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
        self.step = step
        self.graphs = graphs
        self.warmup = warmup
        self.stats = BuildStats()
        self._built: dict[Hashable, _Captured | None] = {}
        self._pool = torch.cuda.graph_pool_handle() if graphs else None

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

    def _capture(self, key: Hashable) -> _Captured:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step(key)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.step(key)
        return _Captured(graph, output)
