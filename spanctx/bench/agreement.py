"""How close an approximate method's outputs are to full prefill of the same ids."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch


@attrs.frozen
class Fidelity:
    """Agreement of next-token distributions over a set of prompts (means over prompts)."""

    top1_agreement: float  # fraction of prompts whose most likely next token is the same
    kl: float  # KL(reference || method) of the next-token distributions, nats


def match_fraction(reference: Sequence[int], other: Sequence[int]) -> float:
    """Fraction of positions of ``reference`` where ``other`` has the same token."""
    if not reference:
        raise ValueError("the reference has no tokens")
    return sum(a == b for a, b in zip(reference, other)) / len(reference)


def compare_logits(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> Fidelity:
    """Fidelity of ``other`` to ``reference``: lists of next-token logits ``[vocab]``, one per prompt."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"need equally many logits, at least one: got {len(reference)} and {len(other)}")
    ref = torch.stack([t.float().cpu() for t in reference]).log_softmax(-1)  # [N, V]
    oth = torch.stack([t.float().cpu() for t in other]).log_softmax(-1)  # [N, V]
    kl = (ref.exp() * (ref - oth)).sum(-1)  # [N]
    top1 = (ref.argmax(-1) == oth.argmax(-1)).float()  # [N]
    return Fidelity(top1_agreement=top1.mean().item(), kl=kl.clamp_min(0).mean().item())
