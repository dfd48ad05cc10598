"""Constraint checking: does a context meet a requirement? One verdict per requirement.

A check is the prompt ``ctx + requirement span + the adapter's invocation`` (an aLoRA's
invocation is appended by the adapter; a plain LoRA or the base model reads the
requirement span as is). Its verdict comes from the next-token logits, as in Mellea's
requirement check: ``probability = P(yes) / (P(yes) + P(no))`` over the two answer
tokens, and the requirement passes when it exceeds ``threshold``.

Cost with reuse (aLoRA): the context runs on base weights and is stored under base keys,
so it is computed once and shared by every check (and by base calls); each requirement
span is stored under base keys too, and the invocation under the adapter's. The first
check on a context computes all of it; a new requirement computes its span and the
invocation; re-checking a requirement computes one token (the invocation's last, whose
logits give the answer).

``check_loop`` generates an answer, checks it, and regenerates after the answer and a
feedback span naming the failed requirements, up to ``max_rounds``. Each round's prompt
extends the previous one, so it reuses the KV that earlier generations and checks stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import torch

from .spans import Context

if TYPE_CHECKING:
    from .runtime import GenerationStats, Result, Runtime

DEFAULT_TEMPLATE = "\nRequirement: {requirement}\n"
DEFAULT_FEEDBACK = "\nThe answer above does not meet these requirements:\n{failed}\nWrite a better answer.\n"


def _require_slot(name: str, value: str, slot: str) -> None:
    if not isinstance(value, str) or "{" + slot + "}" not in value:
        raise ValueError(f"{name} must be a str with a {{{slot}}} slot, got {value!r}")


def _template(instance, attribute, value: str) -> None:
    _require_slot(attribute.name, value, "requirement")


def _probability(instance, attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1], got {value}")


@attrs.frozen
class CheckConfig:
    """How a requirement is worded and answered.

    ``template`` formats the requirement span; ``yes`` / ``no`` are the answer texts,
    each one token of the model's tokenizer; a requirement passes when
    ``P(yes) / (P(yes) + P(no)) > threshold``.
    """

    template: str = attrs.field(default=DEFAULT_TEMPLATE, validator=_template)
    yes: str = "Y"
    no: str = "N"
    threshold: float = attrs.field(default=0.5, validator=_probability)

    def __attrs_post_init__(self) -> None:
        if self.yes == self.no:
            raise ValueError(f"the yes and no answers must differ, both are {self.yes!r}")


DEFAULT_CHECK = CheckConfig()


@attrs.frozen
class Verdict:
    """One requirement's verdict. ``stats`` are those of its logits call (prompt, cached
    and computed tokens; ``new_tokens`` is 0 and ``ttft_s`` is the time to the logits)."""

    requirement: str
    passed: bool
    probability: float  # P(yes) / (P(yes) + P(no))
    stats: GenerationStats


@attrs.frozen
class Attempt:
    """One round of ``check_loop``: the answer generated after ``context``, checked."""

    context: Context
    answer: Result
    verdicts: tuple[Verdict, ...]

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(v.requirement for v in self.verdicts if not v.passed)


@attrs.frozen
class CheckLoopResult:
    """Every round of ``check_loop`` in order; the last one passed, or rounds ran out."""

    attempts: tuple[Attempt, ...]

    @property
    def final(self) -> Attempt:
        return self.attempts[-1]

    @property
    def passed(self) -> bool:
        return self.final.passed


def requirement_context(ctx: Context, requirement: str, config: CheckConfig = DEFAULT_CHECK) -> Context:
    """``ctx`` followed by the span that states ``requirement``."""
    return ctx.append(config.template.format(requirement=requirement))


def check(rt: Runtime, ctx: Context, requirements: Sequence[str], *, adapter: str | None = None,
          config: CheckConfig = DEFAULT_CHECK, reuse: bool = True) -> list[Verdict]:
    """Check each requirement on ``ctx`` with ``adapter`` (an aLoRA, a LoRA, or None for
    the base model), in order. ``reuse=False`` prefills every check in full and neither
    reads nor writes the store (the no-reuse baseline)."""
    requirements = _requirements(requirements)
    yes, no = answer_token(rt.tokenizer, config.yes), answer_token(rt.tokenizer, config.no)
    verdicts = []
    for requirement in requirements:
        logits, stats = rt._next_token_logits(requirement_context(ctx, requirement, config), reuse, adapter)
        probability = torch.sigmoid(logits[yes] - logits[no]).item()
        verdicts.append(Verdict(requirement, probability > config.threshold, probability, stats))
    return verdicts


def check_loop(rt: Runtime, ctx: Context, requirements: Sequence[str], *, adapter: str | None = None,
               max_rounds: int = 3, max_new_tokens: int = 64, generator: str | None = None,
               config: CheckConfig = DEFAULT_CHECK, feedback: str = DEFAULT_FEEDBACK,
               **generate_kwargs) -> CheckLoopResult:
    """Generate after ``ctx`` (with adapter ``generator``, None: base), check the answer
    with ``adapter``; while a requirement fails and rounds remain, generate again after
    the answer and ``feedback`` (its ``{failed}`` slot lists the failed requirements).

    Returns every attempt with its verdicts; it stops at the first attempt that passes.
    """
    if not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds must be an int >= 1, got {max_rounds!r}")
    _require_slot("feedback", feedback, "failed")
    requirements = _requirements(requirements)
    attempts: list[Attempt] = []
    prompt = ctx
    for _ in range(max_rounds):
        answer = rt.generate(prompt, max_new_tokens, adapter=generator, **generate_kwargs)
        answered = _answered(rt, prompt, answer, generator)
        verdicts = tuple(check(rt, answered, requirements, adapter=adapter, config=config))
        attempts.append(Attempt(prompt, answer, verdicts))
        if attempts[-1].passed:
            break
        failed = "\n".join(f"- {r}" for r in attempts[-1].failed)
        prompt = answered.append(feedback.format(failed=failed))
    return CheckLoopResult(tuple(attempts))


def answer_token(tokenizer, text: str) -> int:
    """The one token id of answer ``text``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"an answer must be one token; {text!r} tokenizes to {ids}")
    return ids[0]


def _answered(rt: Runtime, prompt: Context, answer: Result, generator: str | None) -> Context:
    """``prompt`` followed by what the generator saw after it (an aLoRA's invocation)
    and the answer's tokens, as one span of ids."""
    seen = rt.token_ids(prompt, adapter=generator)
    ids = tuple(seen[len(rt.token_ids(prompt)):]) + answer.token_ids
    return prompt.append(ids) if ids else prompt


def _requirements(requirements: Sequence[str]) -> tuple[str, ...]:
    if isinstance(requirements, str):
        raise TypeError("requirements is a list of str; wrap a single requirement in a list")
    out = tuple(requirements)
    for r in out:
        if not isinstance(r, str) or not r.strip():
            raise ValueError(f"a requirement is a non-empty str, got {r!r}")
    return out
