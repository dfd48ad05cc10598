"""Rewards from a sequence-classification model (LLaMA-Factory's ``get_scores``).

A ``RewardModel`` wraps an ``AutoModelForSequenceClassification`` with one label (a
scalar reward head, e.g. ``LlamaForSequenceClassification(num_labels=1)``). The reward
of a prompt is the head's output at the prompt's last token.

Reuse: the reward model has its OWN span store namespace (its fingerprint: class, config,
weights). Spans are reused between reward calls, so N responses to one conversation
cost the conversation once plus each response. The reward model never reuses a causal
LM's KV, even one of the same architecture: its backbone weights are another model's
(a reward model is trained apart), and the namespaces differ. One ``KVStore`` can be
shared with a ``Runtime`` (``store=``): entries never mix.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers.models.auto.modeling_auto import (
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from .cache.store import KVStore
from .core.spans import Context
from .engine.calls import FinalCall
from .session.session import Session


class RewardModel:
    """Scalar rewards of span contexts, with span reuse (see the module doc)."""

    def __init__(self, model, tokenizer, store_bytes: int | None = None, *, store: KVStore | None = None) -> None:
        num_labels = getattr(model.config, "num_labels", None)
        if num_labels != 1 or type(model).__name__ not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
            raise TypeError("a RewardModel needs a ...ForSequenceClassification model with num_labels=1, "
                            f"got {type(model).__name__} with num_labels={num_labels}")
        # the session plans and assembles the cache; the classification model runs it
        self.session = Session(model, tokenizer, store_bytes, store=store)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, store_bytes: int | None = None, **load_kwargs) -> RewardModel:
        """A reward model from a folder, a hub id, or a preset name (random weights,
        ``num_labels=1``); ``load_kwargs`` are ``spanctx.loading.load_model``'s options."""
        from transformers import AutoModelForSequenceClassification

        from .loading import load_model
        from .presets import PRESETS

        if name_or_path in PRESETS:
            load_kwargs.setdefault("num_labels", 1)
        model, tokenizer = load_model(name_or_path, model_class=AutoModelForSequenceClassification, **load_kwargs)
        return cls(model, tokenizer, store_bytes)

    @property
    def store(self) -> KVStore:
        return self.session.store

    def reward(self, ctx: Context, *, reuse: bool = True) -> float:
        """The reward of ``ctx``'s prompt. ``reuse=False``: a full forward, store untouched."""
        session = self.session
        with session.prepared(ctx, reuse=reuse) as call:
            if call.prompt.token_ids[-1] == session.model.config.pad_token_id:
                # the head pools the last NON-pad token: a trailing pad would move it
                raise ValueError("the prompt ends with the pad token; the reward head reads the last non-pad token")
            # one row, no padding: the head pools the tail's last token, the prompt's last
            out = session.engine.run(FinalCall.tails([call.assembly], logits_to_keep=None))  # logits: [1, 1]
            return out.logits[0, 0].float().item()

    def rewards(self, contexts: Sequence[Context], *, reuse: bool = True) -> list[float]:
        """``reward`` of each context, in order (one at a time: each reuses the spans the
        earlier ones stored)."""
        return [self.reward(ctx, reuse=reuse) for ctx in contexts]
