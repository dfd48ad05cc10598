"""Prompt embeddings from the model's last hidden layer.

The embedding is the backbone's final hidden state (after its final norm: what the LM
head reads), float32, shape ``[hidden]``.

What reuse can give, per reduction:
- ``"last"``: the last prompt token's state. The store's KV is all the tail needs, so
  this reuses every stored span and computes only the uncached tail, like ``generate``;
  the tail's spans are stored. Exact: equal to a full forward (tests check it).
- ``"mean"``: the mean over ALL prompt tokens' states. The store keeps keys and values,
  not hidden states, so a reused span's states do not exist anywhere: the mean needs a
  forward of the whole prompt, and this function runs one (no reuse of the store). It
  stores the spans it computed that were missing, so later calls on this prompt (e.g.
  ``generate``) reuse them. A mean over only the computed tail would be a different,
  prefix-dependent quantity; spanctx does not offer it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from . import kv as kvops
from .plan import Compute
from .spans import Context

if TYPE_CHECKING:
    from .runtime import Runtime

Reduction = Literal["last", "mean"]


def hidden_states(rt: Runtime, ctx: Context, reduction: Reduction = "last", *, reuse: bool = True) -> torch.Tensor:
    """The embedding ``[hidden]`` of ``ctx``'s prompt (see the module doc for the cost of
    each reduction). ``reuse=False`` neither reads nor writes the store."""
    if reduction not in ("last", "mean"):
        raise ValueError(f"reduction must be 'last' or 'mean', got {reduction!r}")
    backbone = rt.model.base_model
    with rt._lock, torch.inference_mode():
        if reduction == "last":
            call = rt._prepare(ctx, reuse, 0)
            tail = call.input_ids[:, call.tail_start:]
            cache = call.cache if reuse else kvops.empty_cache()
            states = backbone(input_ids=tail, past_key_values=cache, use_cache=reuse).last_hidden_state
            if reuse:
                rt._store_tail(call, cache)
            return states[0, -1].float()
        call = rt._prepare(ctx, False, 0)
        cache = kvops.empty_cache()
        states = backbone(input_ids=call.input_ids, past_key_values=cache, use_cache=reuse).last_hidden_state
        if reuse:
            segments = call.prompt.segments
            missing = tuple(i for i, seg in enumerate(segments) if seg.key not in rt.store)
            rt._store_segments(Compute(missing, 0, call.prompt.num_tokens), call.prompt, cache)
        return states[0].float().mean(dim=0)
