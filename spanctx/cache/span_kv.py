"""``SpanKV``: the tensors of one span's KV cache, the value type of the cache layer."""

from __future__ import annotations

import attrs
import torch

__all__ = ["SpanKV"]


@attrs.frozen(eq=False)
class SpanKV:
    """The KV cache of one span: per layer, keys and values ``[1, H_kv, S, D]``.

    ``stacked_keys`` (optional): ``[L, 1, H_kv, S, D]`` whose ``[i]`` is ``keys[i]``, the
    same memory, when every layer has one shape: a rotation reads all layers at once.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    stacked_keys: torch.Tensor | None = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if len(self.keys) != len(self.values) or not self.keys:
            raise ValueError("a SpanKV needs one (keys, values) pair per layer")
        lengths = {t.shape[-2] for t in (*self.keys, *self.values)}
        if len(lengths) != 1:
            raise ValueError(f"all layers of a SpanKV must cover the same tokens, got {lengths}")

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
