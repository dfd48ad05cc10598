"""Random LoRA / aLoRA adapters made with PEFT, and full-prefill checks through PEFT.

The benchmark has no trained adapters: it builds adapters of a given rank with random,
non-zero weights (timing does not depend on their values), saves them in PEFT format,
and removes them from the model again. ``check_probability`` is the baseline check:
PEFT ``generate`` of the FULL ids for one new token, as Mellea's requirement check
does today, read as P(yes) / (P(yes) + P(no)).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ..features.checks import DEFAULT_CHECK
from ..hf import peft_wrapping
from .baselines import GREEDY, pad_token_id
from .timing import now

TARGET_MODULES = ("q_proj", "k_proj", "v_proj")
INVOCATION_TEXT = "<|check|>"
ANSWER_TEXTS = (DEFAULT_CHECK.yes, DEFAULT_CHECK.no)  # the first token of each is the answer read by a check


def make_adapter(model, directory: str | Path, *, rank: int, invocation_ids: Sequence[int] | None,
                 seed: int, target_modules: Sequence[str] = TARGET_MODULES) -> Path:
    """Save a random adapter for ``model`` under ``directory``; ``model`` is left unchanged.

    ``invocation_ids`` makes it an aLoRA (activated from the last occurrence of those
    ids on); ``None`` makes a standard LoRA. lora_B is random, so the adapter changes
    the model's outputs.
    """
    extra = {} if invocation_ids is None else {"alora_invocation_tokens": list(invocation_ids)}
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules),
                        task_type="CAUSAL_LM", **extra)
    torch.manual_seed(seed)
    with peft_wrapping():
        peft_model = get_peft_model(model, config)
    try:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.02)
        peft_model.save_pretrained(str(directory))
    finally:
        peft_model.unload()
    return Path(directory)


@contextlib.contextmanager
def peft_loaded(model, path: str | Path) -> Iterator[PeftModel]:
    """``model`` with the adapter at ``path`` injected; removed again on exit."""
    with peft_wrapping():
        peft_model = PeftModel.from_pretrained(model, str(path))
    peft_model.eval()
    try:
        yield peft_model
    finally:
        peft_model.unload()


@attrs.frozen
class AnswerTokens:
    """The token ids whose probabilities decide a check."""

    yes: int
    no: int

    @classmethod
    def for_tokenizer(cls, tokenizer) -> AnswerTokens:
        yes, no = (tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in ANSWER_TEXTS)
        if yes == no:
            raise ValueError(f"answers {ANSWER_TEXTS} start with the same token {yes}")
        return cls(yes, no)


@attrs.frozen
class CheckResult:
    probability: float  # P(yes) / (P(yes) + P(no))
    done_at: float  # clock when the verdict was on the host


def check_probability(peft_model, tokenizer, ids: Sequence[int], answers: AnswerTokens,
                      device: torch.device) -> CheckResult:
    """One check by full prefill: PEFT generate of ALL of ``ids`` for one token."""
    with torch.inference_mode():
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)  # [1, S]
        out = peft_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                  max_new_tokens=1, min_new_tokens=1, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=pad_token_id(peft_model, tokenizer),
                                  **GREEDY)
        pair = out.logits[0][0, [answers.yes, answers.no]].float()  # [2]
        probability = pair.softmax(-1)[0].item()
    return CheckResult(probability, now(device))
