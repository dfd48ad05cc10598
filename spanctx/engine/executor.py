"""Executors: the only code that runs the model.

An ``Executor`` runs two kinds of model call over a KV cache (``kv.py``'s layout):

- ``forward``: the tokens ``input_ids`` ``[B, T]`` after the cache, which they extend.
  By default at the positions that follow the cache, attending causally; with
  ``positions`` ``[T]`` and ``allowed`` ``[T, L + T]`` at chosen positions, seeing
  exactly the keys ``allowed`` marks (``masks.py``: parallel members computed after
  their anchor, repair in place). Returns the output (logits of the last
  ``logits_to_keep`` tokens, or the backbone's hidden states with ``hidden``); with
  ``stop_after_layer=c`` only layers ``0..c`` run and nothing is returned.
- ``generate``: HF ``generate`` over the whole prompt after a cache of its head.

``capabilities`` say what an executor can run; the engine sends what one cannot to the
eager executor and the call's stats name the executor that ran it.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import attrs
import torch

from ..cache import kv as kvops
from ..hf import cache_kwargs
from .masks import MASKABLE_ATTENTION, mask_argument

__all__ = ["Capabilities", "EagerExecutor", "Executor"]


@attrs.frozen
class Capabilities:
    """What an executor can run besides plain causal forwards and decoding."""

    custom_masks: bool  # forwards at chosen positions under a visibility mask
    graphs: bool  # replays captured CUDA graphs


class Executor(Protocol):
    name: str
    capabilities: Capabilities

    def forward(self, input_ids: torch.Tensor, cache, *, positions: torch.Tensor | None = None,
                allowed: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor | None = 1,
                hidden: bool = False, stop_after_layer: int | None = None): ...

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, kwargs: dict
                 ) -> torch.Tensor: ...


class EagerExecutor:
    """Hugging Face eager execution: the model's own forward and ``generate``."""

    name = "eager"

    def __init__(self, model) -> None:
        self.model = model
        maskable = model.config._attn_implementation in MASKABLE_ATTENTION
        self.capabilities = Capabilities(custom_masks=maskable, graphs=False)

    def forward(self, input_ids: torch.Tensor, cache, *, positions: torch.Tensor | None = None,
                allowed: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor | None = 1,
                hidden: bool = False, stop_after_layer: int | None = None):
        module = self.model.base_model if hidden else self.model
        kwargs = {} if hidden or logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        if positions is not None:
            kwargs["position_ids"] = positions[None]
        if allowed is not None:
            kwargs["attention_mask"] = self._mask(cache, positions, allowed)
        stop = (contextlib.nullcontext() if stop_after_layer is None
                else kvops.stop_after_layer(cache, stop_after_layer))
        with stop:
            try:
                return module(input_ids=input_ids, use_cache=True, **cache_kwargs(module, cache), **kwargs)
            except kvops.StopForward:
                return None

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, kwargs: dict) -> torch.Tensor:
        if cache is not None:
            kwargs = {**kwargs, **cache_kwargs(self.model, cache)}
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _mask(self, cache, positions: torch.Tensor, allowed: torch.Tensor):
        if not self.capabilities.custom_masks:
            raise NotImplementedError(
                f"parallel spans need custom attention masks, which the {self.model.config._attn_implementation!r} "
                "attention implementation does not take; load the model with attn_implementation='sdpa' or 'eager'")
        cache_len = kvops.cache_length(cache)
        expected = (positions.numel(), cache_len + positions.numel())
        if tuple(allowed.shape) != expected:
            raise ValueError(f"allowed is {tuple(allowed.shape)}, expected {expected}")
        key_positions = torch.cat([torch.arange(cache_len, device=positions.device), positions])
        return mask_argument(self.model.config.get_text_config(), allowed, positions, key_positions,
                             self.model.dtype)
