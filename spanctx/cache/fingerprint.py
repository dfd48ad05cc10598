"""The weight fingerprint: a model's namespace for span keys, read from its weights.

Split from ``spanctx.core.keys`` (which hashes bytes and never sees a tensor): this is
the one place that reads a model to name its KV.
"""

from __future__ import annotations

import json

import attrs
import torch

from ..core.keys import digest

__all__ = ["FINGERPRINT_BLOCK", "model_namespace", "weights_fingerprint"]

FINGERPRINT_BLOCK = 1 << 16  # elements per weighted sum of weights_fingerprint


def model_namespace(model: torch.nn.Module, identity: str | None = None, *, adapter: str | None = None) -> bytes:
    """Fingerprint of everything that changes a span's KV besides its tokens and past.

    It covers the model's class, config and dtype, the ``adapter`` id, and either:

    - without ``identity``: every parameter and buffer, read where it lives
      (``weights_fingerprint``): models that differ in one element of one weight always
      get different namespaces, models that differ more all but always. Each weight is
      read once: about 1.1 ns per element on a 2-core CPU (some 9 s for an 8B model);
      a GPU's cost is measured by benchmarks/fingerprint_cost.py;
    - with ``identity``: that string, and no weight is read. The caller promises that
      models with different weights never get the same identity (e.g. a hub id and
      revision, plus the hashes of any adapters merged into it). Two models with one
      identity, one config and one dtype share stored KV: a broken promise gives wrong
      answers, silently.
    """
    if identity is not None and not identity:
        raise ValueError("identity must be a non-empty string (or None to read the weights)")
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    config.pop("transformers_version", None)
    parts = [
        type(model).__name__.encode(),
        json.dumps(config, sort_keys=True, default=str).encode(),
        str(model.dtype).encode(),
        (adapter or "").encode(),
    ]
    if identity is not None:
        return digest(b"namespace", *parts, b"identity", identity.encode())
    return digest(b"namespace", *parts, b"weights", weights_fingerprint(model))


# -- weights ---------------------------------------------------------------------------

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# splitmix64 constants, as the signed int64 values of their bits
_SPLITMIX = tuple(c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def weights_fingerprint(model: torch.nn.Module, chunk_elements: int | None = None) -> bytes:
    """A digest of every parameter and buffer of ``model``: names, dtypes, shapes, bits.

    Each tensor is read where it lives, as integers (its bits: bf16 as int16, fp32 as
    int32, ...), in blocks of ``FINGERPRINT_BLOCK`` elements. A block of elements ``x_i``
    gives ``sum_i c_i * x_i`` in int64, wrapping around, where the ``c_i`` are fixed
    pseudo-random odd integers (splitmix64 of ``i``). An odd ``c`` is invertible modulo
    2**64, so changing any single element always changes its block's sum; changing
    several leaves it equal with odds near 2**-64 (not against someone who picks the
    weights to collide). Every block's sum enters the digest on its own, after its
    tensor's name, dtype and shape, so sums of different blocks never mix.

    ``chunk_elements`` (a multiple of ``FINGERPRINT_BLOCK``) is how many elements are
    weighted per step: it bounds the extra memory (one int64 buffer of that length per
    device) and does not change the result, which is the same on every device. Default:
    ``2**18`` on CPU (the buffer stays in cache), ``2**24`` elsewhere (128 MiB; few
    kernel launches). The sums reach the host in one transfer per device. Raises
    ValueError for weights on the meta device.
    """
    if chunk_elements is not None and (chunk_elements < 1 or chunk_elements % FINGERPRINT_BLOCK):
        raise ValueError(f"chunk_elements must be a positive multiple of {FINGERPRINT_BLOCK}, got {chunk_elements}")
    tensors = [(name, t.detach()) for name, t in (*model.named_parameters(), *model.named_buffers())]
    if meta := [name for name, t in tensors if t.is_meta]:
        raise ValueError(f"{meta[0]} is on the meta device: its values cannot be read; "
                         "pass an explicit identity to model_namespace instead")
    header, sums = [], []
    weighers: dict[torch.device, _BlockWeigher] = {}
    for name, tensor in tensors:
        header.append(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}")
        if tensor.device not in weighers:
            longest = max(t.nbytes // _int_dtype(t).itemsize for _, t in tensors if t.device == tensor.device)
            weighers[tensor.device] = _BlockWeigher.make(tensor.device, longest, chunk_elements)
        sums += weighers[tensor.device].block_sums(_int_view(tensor))
    return digest(b"weights", "\n".join(header).encode(), _to_host(sums))


def _int_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The integer type as wide as ``tensor``'s elements (bytes for sizes without one)."""
    return _INT_OF_SIZE.get(tensor.element_size(), torch.uint8)


def _int_view(tensor: torch.Tensor) -> torch.Tensor:
    """``[n]``: the bits of ``tensor``'s elements as integers. Copies a non-contiguous tensor."""
    return tensor.reshape(-1).view(_int_dtype(tensor))


@attrs.frozen
class _BlockWeigher:
    """Per device: the block's odd weights and an int64 buffer for one chunk's products."""

    coefficients: torch.Tensor  # [FINGERPRINT_BLOCK] int64, odd
    work: torch.Tensor  # [min(chunk, longest tensor)] int64
    chunk: int

    @classmethod
    def make(cls, device: torch.device, longest: int, chunk_elements: int | None) -> _BlockWeigher:
        chunk = chunk_elements or (1 << 18 if device.type == "cpu" else 1 << 24)
        work = torch.empty(min(chunk, longest), dtype=torch.int64, device=device)
        return cls(_odd_coefficients(device), work, chunk)

    def block_sums(self, bits: torch.Tensor) -> list[torch.Tensor]:
        """1-D int64 tensors: the weighted sum of each block of ``bits`` ``[n]``, in order."""
        sums = []
        for start in range(0, bits.numel(), self.chunk):
            part = bits[start:start + self.chunk]
            products = self.work[:part.numel()].copy_(part)  # [m] int64
            whole = part.numel() // FINGERPRINT_BLOCK * FINGERPRINT_BLOCK
            if whole:
                sums.append(products[:whole].view(-1, FINGERPRINT_BLOCK).mul_(self.coefficients).sum(dim=1))
            if whole < part.numel():  # the tensor's last, partial block
                tail = products[whole:]
                sums.append(tail.mul_(self.coefficients[:tail.numel()]).sum(dim=0, keepdim=True))
        return sums


def _odd_coefficients(device: torch.device) -> torch.Tensor:
    """``[FINGERPRINT_BLOCK]`` int64: the splitmix64 sequence (seed 0), low bit set."""
    golden, mix1, mix2 = _SPLITMIX
    z = (torch.arange(FINGERPRINT_BLOCK, dtype=torch.int64, device=device) + 1) * golden
    z = (z ^ _shift_right(z, 30)) * mix1
    z = (z ^ _shift_right(z, 27)) * mix2
    return (z ^ _shift_right(z, 31)) | 1


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` copies the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _to_host(sums: list[torch.Tensor]) -> bytes:
    """The 1-D int64 tensors ``sums`` (on any devices), in order, as host bytes, with one
    transfer per device."""
    host: list[torch.Tensor | None] = [None] * len(sums)
    for device in {s.device for s in sums}:
        positions = [i for i, s in enumerate(sums) if s.device == device]
        joined = torch.cat([sums[i] for i in positions]).cpu()
        for i, part in zip(positions, joined.split([sums[i].numel() for i in positions])):
            host[i] = part
    return b"".join(part.numpy().tobytes() for part in host)
