"""Deterministic workloads: token-id contexts, documents, questions and requirements.

Everything is token ids drawn from fixed seeds, so lengths are exact whatever the
tokenizer, and every method of a run sees exactly the same prompts. A block is named by
a tag and indices (``source.block(64, "question", 4096, 3)``); the same name and seed
always give the same ids.
"""

from __future__ import annotations

import random

import attrs
import torch
import xxhash

# Random ids are drawn below this id: keeps them in the ordinary range of any vocabulary.
MAX_DRAWN_ID = 32_000


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` that does not change between runs or machines."""
    return xxhash.xxh64(repr(parts).encode()).intdigest() >> 1


@attrs.frozen(eq=False)
class TokenSource:
    """Draws token-id blocks from ``allowed`` (ids that are not special tokens)."""

    allowed: torch.Tensor  # [N] int64
    seed: int

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, seed: int) -> TokenSource:
        """Ids ``< min(vocab_size, MAX_DRAWN_ID)`` that are not the tokenizer's specials."""
        special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        ids = [t for t in range(min(vocab_size, MAX_DRAWN_ID)) if t not in special]
        if len(ids) < 2:
            raise ValueError("the vocabulary has fewer than 2 ordinary token ids")
        return cls(torch.tensor(ids, dtype=torch.long), seed)

    def block(self, num_tokens: int, *name: object) -> tuple[int, ...]:
        """``num_tokens`` ids named by ``name`` (same name and seed, same ids)."""
        if num_tokens <= 0:
            raise ValueError(f"a block has at least one token, got {num_tokens}")
        gen = torch.Generator().manual_seed(stable_seed(self.seed, *name))
        picks = torch.randint(len(self.allowed), (num_tokens,), generator=gen)
        return tuple(self.allowed[picks].tolist())

    def rng(self, *name: object) -> random.Random:
        """A ``random.Random`` named like a block (for orders and draws)."""
        return random.Random(stable_seed(self.seed, "rng", *name))


def draw_documents(source: TokenSource, pool_size: int, k: int, *name: object) -> tuple[int, ...]:
    """Indices of ``k`` distinct documents of a pool of ``pool_size``, in a random order."""
    if not 1 <= k <= pool_size:
        raise ValueError(f"cannot draw {k} documents from a pool of {pool_size}")
    return tuple(source.rng("draw", *name).sample(range(pool_size), k))


REQUIREMENT_TOPICS = ("the date", "a number", "the user's name", "a price", "a city", "a deadline",
                      "an apology", "a greeting", "a list", "a question", "a unit", "a source")


def requirements(count: int) -> tuple[str, ...]:
    """``count`` distinct requirement sentences (plain text, as a user would write them)."""
    return tuple(f"Requirement {i + 1}: the reply mentions {REQUIREMENT_TOPICS[i % len(REQUIREMENT_TOPICS)]}"
                 f" at most {i + 2} times." for i in range(count))
