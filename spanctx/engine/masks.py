"""Visibility masks of forwards of chosen tokens, at chosen positions (custom 4D masks).

The masks behind parallel spans: computing a span after its anchor only (not its
siblings) and recomputing selected tokens in place (repair). The forward itself is the
executor's (``engine.executor``); this module only builds what it is given.

Contract: in the cache passed in, slot ``j`` holds the token at position ``j`` (spanctx
lays prompts out contiguously). The ``Q`` query tokens run at ``positions`` (explicit
``position_ids``: RoPE follows them) and see exactly the keys that ``allowed`` marks:
``allowed[q, j]`` for the ``L`` cache slots then the ``Q`` queries themselves, further
restricted on sliding-window layers to keys less than the window behind by position.
Their KV is appended to the cache (slots ``L .. L+Q-1``); the caller moves it where it
belongs (``kv.move_tail_into``).

Custom masks need the ``eager`` or ``sdpa`` attention implementation.
"""

from __future__ import annotations

import torch

__all__ = ["MASKABLE_ATTENTION", "in_place_allowed", "isolated_allowed", "mask_argument"]

MASKABLE_ATTENTION = ("eager", "sdpa")


def isolated_allowed(anchor_len: int, member_of: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Visibility of spans computed after an anchor that fills the cache: each query sees
    the whole anchor and, causally by position, the queries of its own span only.

    member_of, positions: ``[Q]``. Returns ``[Q, anchor_len + Q]`` bool.
    """
    q = member_of.numel()
    anchor = torch.ones(q, anchor_len, dtype=torch.bool, device=positions.device)
    own = (member_of[:, None] == member_of[None, :]) & (positions[None, :] <= positions[:, None])
    return torch.cat([anchor, own], dim=1)


def in_place_allowed(cache_len: int, slots: torch.Tensor) -> torch.Tensor:
    """Visibility of tokens recomputed in place: the query for slot ``p`` sees the cache
    slots before ``p`` that are not being recomputed, and the recomputed queries at or
    before ``p`` (their new KV). That is what a sequential prefill sees, with the stale
    KV of the other slots standing in for theirs.

    slots: ``[Q]`` sorted slot indices, all ``< cache_len``. Returns ``[Q, cache_len + Q]``.
    """
    kept = torch.ones(cache_len, dtype=torch.bool, device=slots.device)
    kept[slots] = False
    before = torch.arange(cache_len, device=slots.device)[None, :] < slots[:, None]  # [Q, L]
    own = slots[None, :] <= slots[:, None]  # [Q, Q]
    return torch.cat([before & kept[None, :], own], dim=1)


def mask_argument(text_config, allowed: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """The ``attention_mask`` to pass: one additive 4D mask, or one per layer type."""
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)

    def additive(visible: torch.Tensor) -> torch.Tensor:  # [1, 1, Q, K]
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        return mask.masked_fill(~visible, torch.finfo(dtype).min)[None, None]

    def sliding(visible: torch.Tensor) -> torch.Tensor:
        return visible & (q_pos[:, None] - k_pos[None, :] < window)

    if layer_types is None:  # Llama, GPT-2; Mistral and Phi3 slide every layer when a window is set
        return additive(sliding(allowed) if window else allowed)
    kinds = set(layer_types)
    unknown = kinds - {"full_attention", "sliding_attention"}
    if unknown:
        raise NotImplementedError(f"layer types {sorted(unknown)} are not supported by parallel spans")
    if kinds == {"full_attention"}:
        return additive(allowed)
    return {"full_attention": additive(allowed), "sliding_attention": additive(sliding(allowed))}
