"""``rag``: a system prompt, K documents drawn from a pool in a random order, a question.

Request ``i`` of case K is ``BOS + system + doc_a + doc_b + ... + question_i`` with K
distinct pool documents in a random order (the same draw for every method). The pool's
documents have been seen before (each method's caches are warmed untimed), but not in
this order, so exact prefix reuse finds little beyond the system prompt.

Methods:
- ``full``: HF ``generate`` of the whole prompt from scratch (the fidelity reference).
- ``spanctx-exact``: the runtime with dependent spans: reuses the longest stored prefix.
- ``spanctx-parallel:<repair>``: the documents as parallel spans after the system
  prompt (``ctx.parallel(*docs)``), their stored KV re-positioned, with repair
  ``none``, ``head:16`` or ``blend:0.15``.
- ``naive-concat``: what Mellea ships: each document prefilled alone from position 0,
  the caches concatenated along time with no re-positioning, the question after them.

Fidelity (top-1 agreement and KL of the next-token distribution against full prefill
of the same ids) is measured on separate prompts with fresh questions, untimed; greedy
agreement comes from the timed generations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import attrs
import torch

from ...core.spans import Context
from .. import baselines
from ..agreement import compare_logits
from ..harness import Harness
from ..records import Row
from ..timing import Measured, run_repeats
from ..workloads import draw_documents
from .common import greedy_match, spanctx_generate

NAME = "rag"
REPAIRS = ("none", "head:16", "blend:0.15")
METHODS = ("full", "spanctx-exact", *(f"spanctx-parallel:{r}" for r in REPAIRS), "naive-concat")


@attrs.frozen
class Config:
    docs: tuple[int, ...] = (4, 8, 16)
    doc_tokens: int = 512
    pool: int = 32
    system_tokens: int = 128
    question_tokens: int = 64
    new_tokens: int = 32
    fidelity_prompts: int = 8


@attrs.frozen(eq=False)
class Workload:
    system: tuple[int, ...]
    pool: tuple[tuple[int, ...], ...]

    def docs(self, order: Sequence[int]) -> list[tuple[int, ...]]:
        return [self.pool[j] for j in order]

    def ids(self, h: Harness, prompt: Prompt) -> tuple[int, ...]:
        """The prompt's ids, as full prefill sees them."""
        return h.prompt_ids(self.system, *self.docs(prompt.order), prompt.question)


@attrs.frozen(eq=False)
class Prompt:
    """One request: which documents in which order, and the question."""

    order: tuple[int, ...]
    question: tuple[int, ...]


def prompts(h: Harness, config: Config, k: int, count: int, tag: str) -> list[Prompt]:
    """``count`` requests of K=``k`` documents; ``tag`` separates timed and fidelity prompts."""
    return [Prompt(draw_documents(h.source, config.pool, k, NAME, tag, k, i),
                   h.source.block(config.question_tokens, "rag-question", tag, k, i)) for i in range(count)]


def run(h: Harness, config: Config, methods: tuple[str, ...]) -> list[Row]:
    repeats = h.repeats_for(NAME)
    work = Workload(h.source.block(config.system_tokens, "rag-system"),
                    tuple(h.source.block(config.doc_tokens, "rag-doc", j) for j in range(config.pool)))
    rows: list[Row] = []
    bar = h.bar(len(config.docs) * len(methods), NAME)
    for k in config.docs:
        timed_prompts = prompts(h, config, k, h.warmup + repeats, "timed")
        probe_prompts = prompts(h, config, k, config.fidelity_prompts, "fidelity")
        full_ids = [work.ids(h, p) for p in timed_prompts]
        reference_logits = [baselines.next_token_logits(h.model, work.ids(h, p), h.device) for p in probe_prompts]
        reference: Measured | None = None
        for method in methods:
            bar.set_postfix_str(f"K={k}, {method}")
            request, logits = _method(h, config, work, method)
            measured = run_repeats(functools.partial(_indexed, request, timed_prompts, full_ids), warmup=h.warmup,
                                   repeats=repeats, device=h.device)
            fidelity = {}
            if method == "full":
                reference = measured
            else:
                f = compare_logits(reference_logits, [logits(p) for p in probe_prompts])
                fidelity = {"top1_agreement": f.top1_agreement, "kl": f.kl}
            context_tokens = config.system_tokens + k * config.doc_tokens
            rows.append(Row.measured(NAME, method, context_tokens, config.new_tokens, measured, docs=k,
                                     greedy_match=greedy_match(reference, measured), **fidelity))
            bar.update()
        h.runtime.store.clear()
    bar.close()
    return rows


Request = Callable[[Prompt, tuple[int, ...]], object]
Logits = Callable[[Prompt], torch.Tensor]


def _indexed(request: Request, prompts: Sequence[Prompt], ids: Sequence[tuple[int, ...]], i: int):
    return request(prompts[i], ids[i])


def _method(h: Harness, config: Config, work: Workload, method: str) -> tuple[Request, Logits | None]:
    """``method``'s per-request call and its next-token-logits probe (setup done here)."""
    n = config.new_tokens
    if method == "full":
        return (lambda p, ids: baselines.generate(h.model, h.tokenizer, ids, n, h.device)), None
    anchor = Context().append(work.system)
    if method == "spanctx-exact":
        def exact(docs, question) -> Context:
            return anchor.extend(docs).append(question)
        _warm(h, config, work, lambda docs, question: h.runtime.next_token_logits(exact(docs, question)))
        return (lambda p, ids: spanctx_generate(h.runtime, exact(work.docs(p.order), p.question), n),
                lambda p: h.runtime.next_token_logits(exact(work.docs(p.order), p.question)))
    if method.startswith("spanctx-parallel:"):
        repair = method.removeprefix("spanctx-parallel:")

        def parallel(docs, question) -> Context:
            return anchor.parallel(*docs).append(question)
        _warm(h, config, work, lambda docs, question: h.runtime.next_token_logits(parallel(docs, question),
                                                                                  repair=repair))
        return (lambda p, ids: spanctx_generate(h.runtime, parallel(work.docs(p.order), p.question), n,
                                                repair=repair),
                lambda p: h.runtime.next_token_logits(parallel(work.docs(p.order), p.question), repair=repair))
    if method == "naive-concat":
        # Mellea's cache: one block per text, each prefilled alone from position 0
        system_kv = baselines.prefill_alone(h.model, h.prompt_ids(work.system), h.device)
        doc_kv = [baselines.prefill_alone(h.model, doc, h.device) for doc in work.pool]

        def blocks(p: Prompt):
            return [system_kv, *(doc_kv[j] for j in p.order)]

        def concat(p: Prompt, ids):
            return baselines.generate(h.model, h.tokenizer, ids, n, h.device,
                                      make_cache=lambda: baselines.concatenate(blocks(p)),
                                      cached_tokens=len(ids) - len(p.question))

        def concat_logits(p: Prompt) -> torch.Tensor:
            ids = work.ids(h, p)
            return baselines.next_token_logits(h.model, ids, h.device, cache=baselines.concatenate(blocks(p)),
                                               cached_tokens=len(ids) - len(p.question))
        return concat, concat_logits
    raise ValueError(f"unknown {NAME} method {method!r}")


def _warm(h: Harness, config: Config, work: Workload, probe: Callable[[Sequence, tuple[int, ...]], object]) -> None:
    """Show every pool document to ``probe`` once, in chunks, after the system prompt (untimed)."""
    chunk = max(config.docs)
    for start in range(0, config.pool, chunk):
        question = h.source.block(config.question_tokens, "rag-warm-question", start)
        probe(work.pool[start:start + chunk], question)
