"""The floor of a decode-like step: the time to read every weight once.

A short forward must stream all parameters from memory at least once, so
``parameter bytes / memory bandwidth`` bounds its latency from below. The bandwidth is
measured here, as a device-to-device copy (each copied byte is read once and written
once, so the copy moves ``2 * nbytes``).
"""

from __future__ import annotations

import attrs
import torch

from .timing import now


@attrs.frozen
class Floor:
    """Weights' bytes, the measured copy bandwidth, and the time to read the weights once."""

    weight_bytes: int
    bandwidth_gbps: float  # GB/s (1e9 bytes), read + write
    floor_ms: float


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes per second moved by ``dst.copy_(src)`` on ``device`` (best of ``repeats``)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first-touch pages, kernel load
    best = float("inf")
    for _ in range(repeats):
        start = now(device)
        dst.copy_(src)
        best = min(best, now(device) - start)
    return 2 * nbytes / best


def measure_floor(model: torch.nn.Module, device: torch.device) -> Floor:
    """Read-the-weights-once time of ``model`` on ``device`` (1 GiB probe on GPU, 128 MiB on CPU)."""
    probe = (1 << 30) if device.type == "cuda" else (128 << 20)
    bandwidth = copy_bandwidth(device, probe)
    nbytes = weight_bytes(model)
    return Floor(nbytes, bandwidth / 1e9, nbytes / bandwidth * 1e3)
