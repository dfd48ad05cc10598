"""``checks``: N requirement checks on one long context with an aLoRA adapter.

Request ``i`` checks the N requirements against ``context_i`` (a fresh context per
request, already in the base model's cache: the base model just read or wrote it, as
in a generate-then-check loop; that warm-up is untimed for every method). A check
reads P(yes) vs P(no) after ``BOS + context + requirement + invocation``; the
requirement is tokenized on its own (``REQUIREMENT_TEMPLATE``) and the invocation is
the aLoRA's invocation tokens. TTFT is the time to the first verdict, total the time to
all N. The adapters are random (PEFT, rank ``rank``, lora_B non-zero), made in a
temporary folder.

Methods:
- ``full``: what Mellea does today: for each check, PEFT ``generate`` of the FULL ids
  with the aLoRA (the whole context is prefilled again, per check).
- ``spanctx``: ``runtime.check(ctx, requirements, adapter=...)``: the base cache of the
  context is reused; only requirement + invocation run per check.
- ``lora-full``: a standard LoRA of the same rank, full prefill per check (a LoRA
  changes every token's KV, so nothing could be reused).

``verdict_agreement`` of ``spanctx`` is the fraction of its verdicts equal to ``full``'s.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence

import attrs

from ...core.spans import Context
from ...features.checks import DEFAULT_CHECK
from ..harness import Harness
from ..random_adapters import INVOCATION_TEXT, AnswerTokens, check_probability, make_adapter, peft_loaded
from ..records import Row, distinct
from ..timing import Measured, Outcome, now, run_repeats
from ..workloads import requirements

NAME = "checks"
METHODS = ("full", "spanctx", "lora-full")
REQUIREMENT_TEMPLATE = DEFAULT_CHECK.template  # the runtime's wording, so both methods check the same ids
ALORA_NAME = "bench-alora"


class CheckPromptMismatch(RuntimeError):
    """``runtime.check`` built check prompts of another length than the baseline's."""


@attrs.frozen
class Config:
    context_tokens: int = attrs.field(default=4096, metadata={"flag": "--checks-context"})
    checks: int = attrs.field(default=10, metadata={"flag": "--checks"})  # requirements per request
    rank: int = attrs.field(default=32, metadata={"flag": "--adapter-rank"})


def run(h: Harness, config: Config, methods: tuple[str, ...]) -> list[Row]:
    repeats = h.repeats_for(NAME)
    reqs = requirements(config.checks)
    invocation = tuple(h.tokenizer(INVOCATION_TEXT, add_special_tokens=False)["input_ids"])
    req_ids = [tuple(h.tokenizer(REQUIREMENT_TEMPLATE.format(requirement=r), add_special_tokens=False)["input_ids"])
               for r in reqs]
    contexts = [h.source.block(config.context_tokens, "checks-context", i) for i in range(h.warmup + repeats)]
    prompts = [[h.prompt_ids(context, r, invocation) for r in req_ids] for context in contexts]
    answers = AnswerTokens.for_tokenizer(h.tokenizer)

    def warm(i: int) -> None:  # the base model has just read context i (full prefill re-reads it anyway)
        h.runtime.next_token_logits(Context().append(contexts[i]))

    rows, per_method = [], {}
    bar = h.bar(len(methods), NAME)
    with tempfile.TemporaryDirectory(prefix="spanctx-bench-adapters-") as tmp:
        alora = make_adapter(h.model, f"{tmp}/alora", rank=config.rank, invocation_ids=invocation, seed=1)
        lora = make_adapter(h.model, f"{tmp}/lora", rank=config.rank, invocation_ids=None, seed=2)
        # the PEFT baselines first: they inject and remove their adapter themselves, before
        # the runtime loads its own
        for method in sorted(methods, key=lambda m: m == "spanctx"):
            bar.set_postfix_str(method)
            if method in ("full", "lora-full"):
                with peft_loaded(h.model, alora if method == "full" else lora) as peft_model:
                    measured = run_repeats(lambda i: _full_checks(h, peft_model, prompts[i], answers),
                                           warmup=h.warmup, repeats=repeats, device=h.device)
            elif method == "spanctx":
                with _runtime_adapter(h, alora):
                    measured = run_repeats(lambda i: _spanctx_checks(h, contexts[i], reqs, prompts[i]),
                                           warmup=h.warmup, repeats=repeats, device=h.device, prepare=warm)
            else:
                raise ValueError(f"unknown {NAME} method {method!r}")
            per_method[method] = measured
            bar.update()
    bar.close()
    h.runtime.store.clear()

    for method in methods:
        agreement = (verdict_agreement(per_method["full"], per_method[method])
                     if method == "spanctx" and "full" in per_method else None)
        rows.append(Row.measured(NAME, method, config.context_tokens, 1, per_method[method], checks=config.checks,
                                 verdict_agreement=agreement))
    return rows


def _full_checks(h: Harness, peft_model, prompts: Sequence[tuple[int, ...]], answers: AnswerTokens) -> Outcome:
    """Every check by full PEFT prefill of its ids, one after the other."""
    start = now(h.device)
    results = [check_probability(peft_model, h.tokenizer, ids, answers, h.device) for ids in prompts]
    probabilities = tuple(r.probability for r in results)
    total = sum(len(ids) for ids in prompts)
    return Outcome(results[0].done_at - start, (), total, 0, tuple(p > 0.5 for p in probabilities), probabilities)


def _spanctx_checks(h: Harness, context: tuple[int, ...], reqs: Sequence[str],
                    prompts: Sequence[tuple[int, ...]]) -> Outcome:
    verdicts = h.runtime.check(Context().append(context), list(reqs), adapter=ALORA_NAME)
    for verdict, ids in zip(verdicts, prompts):
        prompt_tokens = getattr(verdict.stats, "prompt_tokens", None)
        if prompt_tokens is not None and prompt_tokens != len(ids):
            raise CheckPromptMismatch(
                f"runtime.check built a {prompt_tokens}-token check prompt where the baseline builds {len(ids)} "
                f"(BOS + context + REQUIREMENT_TEMPLATE + {INVOCATION_TEXT!r}): align "
                "spanctx/bench/scenarios/checks.py with the runtime's check template")
    return Outcome(verdicts[0].stats.total_s, (), sum(v.stats.computed_tokens for v in verdicts),
                   sum(v.stats.cached_tokens for v in verdicts), tuple(bool(v.passed) for v in verdicts),
                   tuple(float(v.probability) for v in verdicts),
                   executor=distinct(v.stats.executor for v in verdicts),
                   executor_fallback=distinct(v.stats.executor_fallback for v in verdicts))


@contextlib.contextmanager
def _runtime_adapter(h: Harness, path):
    h.runtime.add_adapter(ALORA_NAME, str(path))
    try:
        yield
    finally:
        h.runtime.unload_adapter(ALORA_NAME)


def verdict_agreement(reference: Measured, measured: Measured) -> float:
    """Fraction of verdicts equal to the reference's, over all timed requests."""
    pairs = [(a, b) for r, m in zip(reference.samples, measured.samples)
             for a, b in zip(r.outcome.verdicts, m.outcome.verdicts)]
    return sum(a == b for a, b in pairs) / len(pairs)
