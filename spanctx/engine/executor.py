"""Executors: the only code that runs the model.

Two executors share the engine's final calls (``engine.py``): the static one
(``static.py``: fixed KV buffers, rows packed into them, CUDA graphs) takes a final call
of ``Row``s whole, forward or decode, and says in ``refuses`` when it cannot; the eager
one below runs everything else, and every plan step, with transformers' own caches.

``EagerExecutor`` (the ``Executor`` protocol) runs over a KV cache (``kv.py``'s layout):

- ``forward``: the tokens ``input_ids`` ``[B, T]`` after the cache, which they extend.
  By default at the positions that follow the cache, attending causally; with
  ``positions`` ``[T]`` and ``allowed`` ``[T, L + T]`` at chosen positions, seeing
  exactly the keys ``allowed`` marks (``masks.py``: parallel members computed after
  their anchor, repair in place). Returns the output (logits of the last
  ``logits_to_keep`` tokens, or the backbone's hidden states with ``hidden``); with
  ``stop_after_layer=c`` only layers ``0..c`` run and nothing is returned.
- ``generate``: HF ``generate`` over the whole prompt after a cache of its head;
  ``generate_left_padded`` over rows of several lengths.
- ``forward_rows``: rows of tokens after one shared context, as one right-padded batch.

``capabilities`` say what it can run (custom masks need an SDPA or eager attention).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Protocol

import attrs
import torch

from ..cache import kv as kvops
from ..hf import cache_kwargs
from .masks import MASKABLE_ATTENTION, mask_argument

__all__ = ["Capabilities", "EagerExecutor", "Executor", "marginal_prefill_cost"]


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

    def generate_left_padded(self, prompts: Sequence[torch.Tensor], cache, kwargs: dict) -> torch.Tensor:
        """HF ``generate`` over ``prompts`` (``[S_i]`` each) left-padded with
        ``kwargs["pad_token_id"]`` after ``cache`` (a left-padded batch cache, or None).
        Returns the sequences ``[B, W + N]``."""
        width = max(p.shape[0] for p in prompts)
        pad_id = kwargs["pad_token_id"]
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token: pass pad_token_id=...")
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=self.model.device)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, width - ids.shape[0]:] = ids
            attention_mask[row, width - ids.shape[0]:] = 1
        return self.generate(input_ids, attention_mask, cache, kwargs)

    def forward_rows(self, context: Sequence[kvops.KVSlice], tails: Sequence[Sequence[int]], start: int, *,
                     every_position: bool):
        """Rows of tokens ``tails`` after ``context`` (the KV of their common first
        ``start`` tokens, repeated per row) as one right-padded batch. No mask is needed:
        attention is causal and every row's tokens sit in the same slots, so a row's tokens
        never see the padding after them. Returns float32 logits (``[B, V]`` at each row's
        last token, or ``[B, W, V]`` at every position) and the batch cache."""
        width = max(len(tail) for tail in tails)
        device = self.model.device
        # padding: id 0, after a row's last token, so none of the row's tokens attends to it
        ids = torch.tensor([list(tail) + [0] * (width - len(tail)) for tail in tails], device=device)
        cache = kvops.repeat_batch(kvops.assemble(context), len(tails), start)
        if every_position:
            return self.forward(ids, cache, logits_to_keep=0).logits.float(), cache  # [B, W, V]
        last = torch.tensor([len(tail) - 1 for tail in tails], device=device)  # [B]
        keep = torch.unique(last)  # [K] sorted columns whose logits are read
        out = self.forward(ids, cache, logits_to_keep=keep)  # logits: [B, K, V]
        return out.logits[torch.arange(len(tails), device=device), torch.searchsorted(keep, last)].float(), cache

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


def marginal_prefill_cost(executor: Executor, device: torch.device, max_tokens: int = 4096) -> float:
    """Seconds per prompt token at the margin: the extra time of a forward from position
    0 over ``n`` tokens against one over 16, ``n`` doubling from 32 until that forward
    takes twice as long and at least 50 ms (or reaches ``max_tokens``). The fixed cost of
    a forward (launches: ~45 ms for an 8B model run eagerly) is paid by a call whatever it
    computes, so it is left out. Long spans cost more per token than this (attention
    grows with length): the estimate errs towards computing them."""

    def seconds(n: int) -> float:
        ids = torch.zeros((1, n), dtype=torch.long, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        executor.forward(ids, kvops.empty_cache())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    base = min(seconds(16), seconds(16))
    n = 32
    while True:
        took = seconds(n)
        if took >= max(2 * base, 0.05) or 2 * n > max_tokens:
            return max(took - base, 1e-9) / (n - 16)
        n *= 2
