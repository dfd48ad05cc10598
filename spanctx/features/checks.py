"""Constraint checking: does a context meet a requirement? One verdict per requirement.

A check is the prompt ``ctx + requirement span + the adapter's invocation`` (an aLoRA's
invocation is appended by the adapter; a plain LoRA or the base model reads the
requirement span as is). Its verdict comes from the next-token logits, as in Mellea's
requirement check: ``probability = P(yes) / (P(yes) + P(no))`` over the two answer
tokens, and the requirement passes when it exceeds ``threshold``.

Batched execution. All checks of one call share the spans before their requirement
(the context). That shared part is assembled once: read from the store, and what is
missing computed (one batch-of-one forward per run of missing spans) and stored. Then
the checks run ``batch_size`` at a time as the rows of ONE forward each: row ``i`` is
check ``i``'s own tokens (requirement span + invocation), right-padded to the longest
row, after the shared KV expanded over the batch (``kv.repeat_batch``; a row holds a
copy of the context's KV once the model appends to it). No attention mask is needed:
attention is causal and every row's tokens sit in the same slots (after the shared
part), so a row's real tokens never see the padding after them, and the default
positions (the cache slots) are each row's own. Each row's logits are read at its own
last token. For an aLoRA every row has its own invocation start, and the adapter's
hooks give PEFT per-row ``alora_offsets`` (see ``adapters.py``).

Cost with reuse (aLoRA): the context runs on base weights and is stored under base keys,
so it is computed once and shared by every check (and by base calls). A check's own
spans are stored too (the requirement span under base keys, the invocation under the
adapter's), but a batched check always recomputes them: rows that reused them would
start at other cache lengths and need a padded cache with an attention mask and
explicit positions. The price is a row's requirement + invocation tokens (tens) instead
of one token when a requirement is checked again, inside a forward that runs anyway;
the model calls, which dominate on a GPU (~45 ms each for an 8B model in eager HF), do
not grow. With the context stored, N checks are ``ceil(N / batch_size)`` model calls.

``check_loop`` generates an answer, checks it, and regenerates after the answer and a
feedback span naming the failed requirements, up to ``max_rounds``. Each round's prompt
extends the previous one, so it reuses the KV that earlier generations and checks stored.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import torch

from ..core.prompt import ResolvedPrompt
from ..core.spans import Context, as_context
from ..session.adapters import batch_activation
from ..session.api import FinalCall
from ..session.results import GenerationStats, Result

if TYPE_CHECKING:
    from ..session.api import SessionAPI

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
    """One requirement's verdict.

    ``stats`` count the check's own prompt as if the checks of its call ran in order:
    ``computed_tokens`` are the tokens its row ran plus, for the first check of the call,
    the shared context's tokens that had to be computed; ``cached_tokens`` the rest (so
    the computed tokens of a call's verdicts add up to what the call ran, padding left
    out). ``new_tokens`` is 0; ``ttft_s`` and ``total_s`` are both the time from the
    call's start to the logits of the check's batch (all checks of a batch share it).
    """

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


def check(rt: SessionAPI, ctx: Context | str, requirements: Sequence[str], *, adapter: str | None = None,
          config: CheckConfig = DEFAULT_CHECK, reuse: bool = True, batch_size: int = 16,
          salt: str | None = None) -> list[Verdict]:
    """Check each requirement on ``ctx`` with ``adapter`` (an aLoRA, a LoRA, or None for
    the base model); verdicts in input order.

    The context is assembled once for all checks, which then run ``batch_size`` rows per
    forward (see the module doc); a row holds a copy of the context's KV, so long
    contexts want smaller batches. ``reuse=False`` neither reads nor writes the store and
    every row is its whole check prompt, prefilled in full (the no-reuse baseline).
    Contexts with parallel groups are checked one requirement per call (base model only).
    ``salt``: the call's tenant salt (None: the runtime's).
    """
    ctx = as_context(ctx, "check")
    requirements = _requirements(requirements)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    yes, no = answer_token(rt.tokenizer, config.yes), answer_token(rt.tokenizer, config.no)
    if not requirements:
        return []
    if ctx.has_parallel:  # parallel layouts have their own planner: one call per check
        return [_checked_alone(rt, requirement_context(ctx, r, config), r, config, adapter, reuse, yes, no, salt)
                for r in requirements]
    with rt.holding():
        started = time.perf_counter()
        resolved = [rt.resolve(requirement_context(ctx, r, config), adapter=adapter, salt=salt) for r in requirements]
        prompts = [prompt for prompt, _ in resolved]
        activations = [activation for _, activation in resolved]
        for prompt in prompts:
            rt.check_length(prompt.num_tokens)
        shared = shared_spans(prompts) if reuse else 0
        with rt.activated(activations[0].before_invocation if activations[0] is not None else None):
            context = rt.engine.assemble_shared(prompts[0], shared, reuse=reuse)  # KV of tokens [0, tail_start)
        verdicts = []
        for start in range(0, len(prompts), batch_size):
            rows = range(start, min(start + batch_size, len(prompts)))
            activation = batch_activation([activations[i] for i in rows])
            with rt.activated(activation):
                out = rt.engine.run(FinalCall.after(
                    context.pieces or [], [prompts[i] for i in rows], context.tail_start, rt.device,
                    store_from=shared if reuse else None, alora_starts=activation and activation.alora_starts))
            logits = out.logits[:, -1].float()  # [b, V]
            probabilities = torch.sigmoid(logits[:, yes] - logits[:, no]).tolist()
            end = time.perf_counter()
            for i, probability in zip(rows, probabilities):
                # the first check computed the shared context; the others got it from it
                cached = context.cached_tokens if i == 0 else context.tail_start
                stats = rt.stats(prompts[i], 0, None, cached_tokens=cached, started=started, end=end, generated=out)
                verdicts.append(Verdict(requirements[i], probability > config.threshold, probability, stats))
        return verdicts


def shared_spans(prompts: Sequence[ResolvedPrompt]) -> int:
    """How many leading spans all ``prompts`` have (same keys), at most all but the last
    of each: every row keeps at least its last span to run. Pure."""
    limit = min(len(p.segments) for p in prompts) - 1
    return next((j for j in range(limit) if len({p.segments[j].key for p in prompts}) > 1), limit)


def _checked_alone(rt: SessionAPI, ctx: Context, requirement: str, config: CheckConfig, adapter: str | None,
                   reuse: bool, yes: int, no: int, salt: str | None) -> Verdict:
    with rt.prepared(ctx, reuse=reuse, adapter=adapter, salt=salt) as call:
        logits = rt.engine.run(FinalCall.tails([call.assembly], alora_starts=[call.alora_start])).logits[0, -1].float()
        probability = torch.sigmoid(logits[yes] - logits[no]).item()
        return Verdict(requirement, probability > config.threshold, probability, rt.stats(call, 0, None))


def check_loop(rt: SessionAPI, ctx: Context | str, requirements: Sequence[str], *, adapter: str | None = None,
               max_rounds: int = 3, max_new_tokens: int = 64, generator: str | None = None,
               config: CheckConfig = DEFAULT_CHECK, feedback: str = DEFAULT_FEEDBACK, salt: str | None = None,
               **generate_kwargs) -> CheckLoopResult:
    """Generate after ``ctx`` (with adapter ``generator``, None: base), check the answer
    with ``adapter``; while a requirement fails and rounds remain, generate again after
    the answer and ``feedback`` (its ``{failed}`` slot lists the failed requirements).

    Returns every attempt with its verdicts; it stops at the first attempt that passes.
    ``salt``: the tenant salt of every generation and check (None: the runtime's).
    """
    ctx = as_context(ctx, "check_loop")
    if not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds must be an int >= 1, got {max_rounds!r}")
    _require_slot("feedback", feedback, "failed")
    requirements = _requirements(requirements)
    attempts: list[Attempt] = []
    prompt = ctx
    for _ in range(max_rounds):
        answer = rt.generate(prompt, max_new_tokens, adapter=generator, salt=salt, **generate_kwargs)
        answered = _answered(rt, prompt, answer, generator)
        verdicts = tuple(check(rt, answered, requirements, adapter=adapter, config=config, salt=salt))
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


def _answered(rt: SessionAPI, prompt: Context, answer: Result, generator: str | None) -> Context:
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
