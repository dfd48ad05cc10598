"""Mellea's model options as one spanctx ``generate`` call, and its result as HF's output.

Mellea merges a call's ``model_options`` over the backend's (``_simplify_and_merge``) and
maps its sentinels to Hugging Face ``generate`` names (``_make_backend_specific_and_remove``:
``MAX_NEW_TOKENS`` -> ``max_new_tokens``, ``STOP_SEQUENCES`` -> ``stop_strings``,
``do_sample=True`` when a seed or a non-zero temperature is given). ``GenerateRequest``
takes that result and keeps Mellea's defaults where spanctx's differ:

- length: with neither ``MAX_NEW_TOKENS`` nor ``max_length``, Hugging Face ``generate``
  uses the model's ``generation_config`` (``max_new_tokens``, else ``max_length`` counted
  with the prompt, else 20 new tokens, within the model's positions); spanctx's own
  default (32) never applies;
- ``SEED``: the call samples from a freshly seeded RNG (spanctx's ``seed=``), the same
  draws as Mellea's global ``set_seed`` but without touching the global RNG;
- ``LOGITS`` / ``RAW_LOGITS``: the call keeps each new token's processed scores / raw
  logits (``output_scores`` / ``output_logits``).
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import torch
from mellea.backends import ModelOption
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ...core.options import RESERVED_KWARGS
from ...session.results import Result

__all__ = ["GenerateRequest", "default_max_new_tokens", "hf_output"]

HF_DEFAULT_NEW_TOKENS = 20  # transformers' GenerationConfig().max_length, counted after the prompt
# generate kwargs that spanctx decides for every call, or that a batch of one cannot honour
_SET_BY_SPANCTX = frozenset(RESERVED_KWARGS | {"return_dict_in_generate", "output_scores", "output_logits",
                                               "num_return_sequences"})


def default_max_new_tokens(generation_config, prompt_tokens: int, max_positions: int | None) -> int:
    """How many tokens Hugging Face ``generate`` makes when the call sets no length."""
    if getattr(generation_config, "max_new_tokens", None) is not None:
        return generation_config.max_new_tokens
    if getattr(generation_config, "max_length", None) is not None:
        return max(1, generation_config.max_length - prompt_tokens)
    room = HF_DEFAULT_NEW_TOKENS if max_positions is None else max_positions - prompt_tokens
    return max(1, min(HF_DEFAULT_NEW_TOKENS, room))


@attrs.frozen
class GenerateRequest:
    """One call's generate arguments, in spanctx's terms."""

    kwargs: Mapping[str, object]  # passed on to ``Runtime.generate``
    max_new_tokens: int | None = None
    max_length: int | None = None  # counted with the prompt, as in Hugging Face
    output_scores: bool = False
    output_logits: bool = False

    @classmethod
    def of(cls, hf_kwargs: Mapping[str, object], model_options: Mapping[str, object] | None = None,
           tokenizer=None) -> GenerateRequest:
        """From Hugging Face generate kwargs (Mellea's mapped options, or what Mellea's
        intrinsic code passes to ``model.generate``) and Mellea's own options."""
        options = model_options or {}
        kwargs = dict(hf_kwargs)
        returns = kwargs.pop("num_return_sequences", 1)
        if returns not in (None, 1):
            raise NotImplementedError(f"num_return_sequences={returns}: spanctx's Mellea backend makes one sequence")
        output_scores = bool(kwargs.pop("output_scores", False) or options.get(ModelOption.LOGITS))
        output_logits = bool(kwargs.pop("output_logits", False) or options.get(ModelOption.RAW_LOGITS))
        max_new_tokens = kwargs.pop("max_new_tokens", None)
        max_length = kwargs.pop("max_length", None)
        kwargs = {k: v for k, v in kwargs.items() if k not in _SET_BY_SPANCTX}
        seed = options.get(ModelOption.SEED)
        if seed is not None:
            kwargs["seed"] = seed
        if "stop_strings" in kwargs and tokenizer is not None:
            kwargs.setdefault("tokenizer", tokenizer)  # generate decodes stop strings with it
        return cls(kwargs, max_new_tokens, max_length, output_scores, output_logits)

    def new_tokens(self, prompt_tokens: int, generation_config, max_positions: int | None) -> int:
        """The call's ``max_new_tokens`` for a prompt of ``prompt_tokens``."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return max(1, self.max_length - prompt_tokens)
        return default_max_new_tokens(generation_config, prompt_tokens, max_positions)


def hf_output(prompt_ids, result: Result, device: torch.device) -> GenerateDecoderOnlyOutput:
    """``result`` as ``model.generate(..., return_dict_in_generate=True)`` returns it:
    ``sequences`` ``[1, S + N]`` (prompt and new tokens), ``scores`` / ``logits`` as
    ``N`` tensors ``[1, V]`` when the call kept them."""
    sequences = torch.tensor([list(prompt_ids) + list(result.token_ids)], dtype=torch.long, device=device)
    return GenerateDecoderOnlyOutput(
        sequences=sequences,
        scores=None if result.scores is None else tuple(s[None] for s in result.scores),
        logits=None if result.logits is None else tuple(s[None] for s in result.logits),
    )
