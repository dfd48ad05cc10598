"""Executors: the only code that runs the model.

Every final call (``calls.FinalCall``: rows over stored prefixes, a forward or a decode)
goes through one protocol, ``Executor``: ``refuses(call)`` says why an executor cannot
run it (None: it can), ``run(call)`` runs it. The engine (``engine.run``) offers a call to
the static executor (``static.py``: fixed KV buffers, rows packed into them, CUDA graphs)
first and runs it here when that one refuses, recording why.

``EagerExecutor`` refuses nothing. Its ``run`` lays each row's stored prefix into a
transformers ``DynamicCache`` and runs: one row's tail (``forward``) or decode (HF
``generate``); rows that share one prefix as a right-padded batch (``forward_rows``:
checks, scores); rows with prefixes of their own as a left-padded HF batch, laid out by
``batch.plan_batch`` (``generate_left_padded``). The interpreter's plan steps call
``forward`` directly: the tokens ``input_ids`` ``[B, T]`` after a cache, which they
extend, by default at the positions that follow it, causally; with ``positions`` ``[T]``
and ``allowed`` ``[T, L + T]`` at chosen positions, seeing exactly the keys ``allowed``
marks (``masks.py``: parallel members computed after their anchor, repair in place;
SDPA or eager attention only). Returns the output (logits of the last
``logits_to_keep`` tokens, or the backbone's hidden states with ``hidden``); with
``stop_after_layer=c`` only layers ``0..c`` run and nothing is returned.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Protocol

import torch

from ..cache import kv as kvops
from ..core.batch_layout import plan_batch
from ..hf import cache_kwargs
from .calls import FinalCall, FinalOutput
from .masks import MASKABLE_ATTENTION, mask_argument

__all__ = ["EagerExecutor", "Executor", "marginal_prefill_cost"]


class Executor(Protocol):
    """Runs final calls: the engine takes the first executor that does not refuse one."""

    name: str

    def refuses(self, call: FinalCall) -> str | None: ...

    def run(self, call: FinalCall) -> FinalOutput: ...


class EagerExecutor:
    """Hugging Face eager execution: the model's own forward and ``generate``."""

    name = "eager"

    def __init__(self, model) -> None:
        self.model = model
        self.custom_masks = model.config._attn_implementation in MASKABLE_ATTENTION  # forwards with ``allowed``

    def refuses(self, call: FinalCall) -> str | None:
        return None

    def run(self, call: FinalCall) -> FinalOutput:
        """Run ``call`` (see the module docstring); the output's cache is what the rows'
        prompts computed, for the engine to store from."""
        rows = call.rows
        if call.decode is None and len(rows) > 1:
            first = rows[0]
            if any(r.start != first.start or tuple(r.prefix) != tuple(first.prefix) for r in rows):
                raise ValueError("an eager forward of several rows needs one shared prefix (checks, scores)")
            if call.logits_to_keep not in (0, 1) or call.hidden or call.kv:
                raise ValueError("an eager forward of several rows keeps each row's last logits or all of them")
            logits, cache = self.forward_rows(first.prefix, [p.token_ids[first.start:] for p in call.prompts],
                                              first.start, every_position=call.logits_to_keep == 0)
            return FinalOutput(self.name, logits=logits if call.logits_to_keep == 0 else logits[:, None],
                               cache=cache, batch=True)
        if call.decode is not None and len(rows) > 1:
            return self._decode_rows(call)
        row = rows[0]
        cache = kvops.assemble(row.prefix) if call.reuse else kvops.empty_cache()
        if call.decode is not None:
            ids = row.input_ids[None]
            out = self.generate(ids, torch.ones_like(ids), cache if call.reuse else None,
                                {**call.kwargs, "return_dict_in_generate": True})
            return FinalOutput(self.name, sequences=out.sequences, scores=out.scores, step_logits=out.logits,
                               cache=cache)
        out = self.forward(row.input_ids[None, row.start:], cache, logits_to_keep=call.logits_to_keep,
                           hidden=call.hidden)
        kv = [kvops.KVSlice.whole(kvops.as_slices(cache))] if call.kv else None
        if call.hidden:
            return FinalOutput(self.name, hidden=out.last_hidden_state, kv=kv, cache=cache)
        return FinalOutput(self.name, logits=out.logits, kv=kv, cache=cache)

    def _decode_rows(self, call: FinalCall) -> FinalOutput:
        """A left-padded HF batch. Row ``i`` keeps the first ``kept[i]`` tokens of its cache
        (``plan_batch``: at least its floor, else the batch would recompute a parallel
        group causally); where that exceeds its cache, the missing tokens (its tail's first
        ones) run first, causally, as the final call would run them."""
        rows, width = call.rows, max(r.num_tokens for r in call.rows)
        if not call.reuse:
            return FinalOutput(self.name, sequences=self.generate_left_padded([r.input_ids for r in rows], None,
                                                                              dict(call.kwargs)))
        layout = plan_batch([r.num_tokens for r in rows], [r.start for r in rows], call.floors)
        caches = []
        for row, keep in zip(rows, layout.kept):
            cache = kvops.assemble(row.prefix)
            if keep > row.start:
                self.forward(row.input_ids[None, row.start:keep], cache)
            caches.append(cache)
        cache = kvops.stack_left_padded(caches, layout.kept, layout.cached_width)
        sequences = self.generate_left_padded([r.input_ids for r in rows], cache, dict(call.kwargs))
        return FinalOutput(self.name, sequences=sequences, cache=cache, kept=layout.kept,
                           offsets=tuple(width - r.num_tokens for r in rows), batch=True)

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
        if not self.custom_masks:
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


def marginal_prefill_cost(executor: EagerExecutor, device: torch.device, max_tokens: int = 4096) -> float:
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
