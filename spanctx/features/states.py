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
  prefix-dependent quantity; spanctx does not offer it. A context with parallel groups
  gets the mean of the sequential prefill of its ids, and nothing is stored: a causal
  forward is not what a group's KV (or what follows it) is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from ..core.spans import Context, as_context
from ..session.api import FinalCall

if TYPE_CHECKING:
    from ..session.api import SessionAPI

Reduction = Literal["last", "mean"]


def hidden_states(rt: SessionAPI, ctx: Context | str, reduction: Reduction = "last", *, reuse: bool = True,
                  salt: str | None = None) -> torch.Tensor:
    """The embedding ``[hidden]`` of ``ctx``'s prompt (see the module doc for the cost of
    each reduction). ``reuse=False`` neither reads nor writes the store; ``salt``: the
    call's tenant salt (None: the runtime's)."""
    ctx = as_context(ctx, "hidden_states")
    if reduction not in ("last", "mean"):
        raise ValueError(f"reduction must be 'last' or 'mean', got {reduction!r}")
    if reduction == "last":
        with rt.prepared(ctx, reuse=reuse, salt=salt) as call:
            return rt.engine.run(FinalCall.tails([call.assembly], hidden=True)).hidden[0, -1].float()
    # the store keeps keys and values, not hidden states: the mean needs a full forward
    with rt.holding():
        prompt, _ = rt.resolve(ctx, salt=salt)
        out = rt.engine.run(FinalCall.whole(prompt, rt.device, store=reuse, hidden=True))
        return out.hidden[0].float().mean(dim=0)
