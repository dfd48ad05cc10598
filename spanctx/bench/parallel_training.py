"""Training rows in which documents are parallel spans, exactly as spanctx places them
(Block-Attention-style training; ``benchmarks/train_tiny.py`` uses it for the
``tiny-trained`` preset, docs/fidelity.md shows the recipe for a LoRA on your model).

spanctx computes a parallel member right after its anchor (positions ``A..``) and
rotates its keys to the member's place ``s`` (``spanctx/core/placement.py``). RoPE sees
only distances, so one ordinary forward gives the same KV when member ``m`` follows its
own copy of the anchor placed at ``s - A .. s - 1``: it sees the anchor at the distances
it had when stored, and its keys land at ``s``. A ``Layout`` holds such rows (several
episodes packed, each from position 0); ``block_mask`` (flex attention, GPU) or
``dense_mask`` (sdpa, any device) turn it into the attention mask; ``use_span_attention``
makes a transformers model take it as ``span_mask=`` on every forward.
"""

from __future__ import annotations

import torch

__all__ = ["ATTENTION", "Layout", "allowed", "block_mask", "dense_mask", "span_attention", "use_span_attention"]

ATTENTION = "spanctx_parallel_training"  # the attention implementation ``use_span_attention`` registers


class Layout:
    """Per-token columns of a packed row: ``pos`` (RoPE position; every episode starts at
    0), ``ep`` (episode index in the row), ``blk`` (0: an ordinary token; ``m >= 1``: the
    ``m``-th parallel member of its episode, or the copy of the anchor it attends to) and
    ``copy`` (1 for those anchor copies: attended to by their member only, never scored).
    The attention rule (``allowed``): a token sees earlier tokens of its episode; an
    ordinary token sees every one but the copies, a member token only its own block."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.pos: list[int] = []
        self.ep: list[int] = []
        self.blk: list[int] = []
        self.copy: list[int] = []
        self.episode = -1
        self.next_pos = 0

    def __len__(self) -> int:
        return len(self.ids)

    def start_episode(self) -> None:
        self.episode += 1
        self.next_pos = 0

    def add(self, part: list[int], weight: float = 1.0, blk: int = 0, copy: int = 0, at: int | None = None) -> None:
        """Append ``part``; positions continue the episode's unless ``at`` is given (then
        the episode's next position is left as it was)."""
        start = self.next_pos if at is None else at
        self.ids += part
        self.weights += [weight] * len(part)
        self.pos += range(start, start + len(part))
        self.ep += [self.episode] * len(part)
        self.blk += [blk] * len(part)
        self.copy += [copy] * len(part)
        if at is None:
            self.next_pos += len(part)

    def add_parallel(self, anchor: list[int], members: list[list[int]]) -> None:
        """The ``members`` as one parallel group after ``anchor`` (which ends the tokens
        added so far): member ``m`` after its own copy of ``anchor``, both in block ``m``."""
        start = self.next_pos
        for m, member in enumerate(members, 1):
            self.add(anchor, 0.0, blk=m, copy=1, at=start - len(anchor))
            self.add(member, blk=m, at=start)
            start += len(member)
        self.next_pos = start

    def tensors(self, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``ids [total]``, ``weights [total]`` and ``layout [4, total]`` (pos, ep, blk, copy)."""
        cols = [self.pos, self.ep, self.blk, self.copy]
        return (torch.tensor(self.ids[:total]), torch.tensor(self.weights[:total], dtype=torch.float32),
                torch.tensor([c[:total] for c in cols], dtype=torch.int32))


def allowed(ep_q, blk_q, ep_k, blk_k, copy_k, q, k):
    """The attention rule of ``Layout`` on broadcastable index tensors (True: ``q`` sees ``k``)."""
    ordinary = (blk_q == 0) & (copy_k == 0)
    return (ep_q == ep_k) & (k <= q) & (ordinary | ((blk_q > 0) & (blk_k == blk_q)))


def dense_mask(layout: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` bool mask of ``allowed`` for ``layout [B, 4, T]`` (sdpa's path)."""
    _, ep, blk, copy = layout.unbind(1)
    t = torch.arange(layout.shape[-1], device=layout.device)
    m = allowed(ep[:, :, None], blk[:, :, None], ep[:, None, :], blk[:, None, :], copy[:, None, :],
                t[None, :, None], t[None, None, :])
    return m[:, None]


def block_mask(layout: torch.Tensor):
    """flex attention's ``BlockMask`` of ``allowed`` for ``layout [B, 4, T]``: blocks of other
    episodes are skipped, so the cost per token follows its episode's length, not the row's."""
    from torch.nn.attention.flex_attention import create_block_mask

    _, ep, blk, copy = layout.unbind(1)

    def mask_mod(b, h, q, k):
        return allowed(ep[b, q], blk[b, q], ep[b, k], blk[b, k], copy[b, k], q, k)

    return create_block_mask(mask_mod, layout.shape[0], None, layout.shape[-1], layout.shape[-1],
                             device=layout.device)


def span_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, span_mask=None, **kwargs):
    """The attention of training: ``span_mask`` (a ``BlockMask`` or a dense bool mask of
    ``allowed``), or plain causal attention without one. Query ``[B, H, T, D]``, key and
    value ``[B, H_kv, T, D]``; returns ``[B, T, H, D]``."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if isinstance(span_mask, BlockMask):
        out = flex_attention(query, key, value, block_mask=span_mask, scale=scaling, enable_gqa=True)
    else:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=span_mask, scale=scaling,
                                                               is_causal=span_mask is None)
    return out.transpose(1, 2).contiguous(), None


def use_span_attention(model) -> None:
    """Switch ``model`` to ``span_attention`` (through its config object: give it a config of
    its own if another model shares it); transformers builds no mask for it (the
    registered mask function returns None), so positions that restart per episode are
    not mistaken for packed sequences."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, span_attention)
    AttentionMaskInterface.register(ATTENTION, lambda *args, **kwargs: None)
    model.set_attn_implementation(ATTENTION)
