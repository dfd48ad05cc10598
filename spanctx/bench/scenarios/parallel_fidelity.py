"""``fidelity``: right answers with parallel documents, on a model trained for retrieval.

The held-out prompts of ``retrieval`` (system line, K = 2..32 documents in a shuffled
order, a single-document or a two-document (manager chain) question, values and some
paraphrases never seen in training; ``data/retrieval-heldout.json``) are answered by
greedy decoding up to the first newline. Every method sees the same prompt ids. Per
(K, question kind, method) a row gives the exact-match ``accuracy``; the
``answer_agreement`` with full prefill's answer; ``top1_agreement`` and ``kl`` of the
first answer token's distribution against full prefill's; ``recomputed_fraction``
(tokens that repair ran again over document tokens) and ``checked_fraction`` (tokens
blend ran through its check layers, over document tokens); times (median per prompt).

Methods:
- ``full``: HF ``generate`` of the whole prompt (the reference).
- ``naive-concat``: Mellea's KV smashing: the system line (with BOS) and every document
  prefilled alone from position 0, the caches concatenated, the question after them.
- ``parallel:<repair>``: ``Context().append(system).parallel(*docs)`` (the system line is
  the members' shared prefix, as in APE) with repair ``none``, ``head:k`` (EPIC; k = 4, 8,
  16, 32), ``blend:r`` (CacheBlend; r = 0.05, 0.15, 0.3) or both, ``head:k+blend:r``.
- ``parallel-root:<repair>``: the same group anchored at the root
  (``anchor="root"``: documents computed after BOS only, position-independent),
  with ``none`` or ``head:k``.

Before each prompt the store is cleared and the documents' KV is stored after each
anchor (untimed warm-up), as in a RAG server that has seen the documents but not this
arrangement: every repair runs (a repaired group of the same order is never reused).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from ...core.spans import Context
from ...hf import cache_kwargs
from .. import baselines
from ..agreement import compare_logits
from ..harness import Harness
from ..records import Row
from ..retrieval import (
    ANSWER_LEAD,
    HELDOUT_PATH,
    HeldOut,
    Prompt,
    answer_of,
    load_heldout,
    question_text,
)
from ..timing import FirstTokenClock, Measured, Outcome, now, timed

NAME = "fidelity"
HEADS = (4, 8, 16, 32)
BLENDS = (0.05, 0.15, 0.3)
HEAD_BLENDS = ("head:4+blend:0.1", "head:8+blend:0.05")
ROOT_HEADS = (16,)
METHODS = ("full", "naive-concat", "parallel:none", *(f"parallel:head:{k}" for k in HEADS),
           *(f"parallel:blend:{r:g}" for r in BLENDS), *(f"parallel:{m}" for m in HEAD_BLENDS),
           "parallel-root:none", *(f"parallel-root:head:{k}" for k in ROOT_HEADS))


@attrs.frozen
class Config:
    docs: tuple[int, ...] = (2, 4, 8, 16, 32)
    worlds: int | None = None  # per K, the first N worlds of the held-out set (None: all 16)
    max_new_tokens: int = 28  # longer than any answer (two names of at most 12 letters, ", ") + newline
    heldout: str = str(HELDOUT_PATH)


@attrs.frozen
class Answer:
    """One method's answer to one prompt, and what its repair cost."""

    text: str
    recomputed: int
    checked: int


def run(h: Harness, config: Config, methods: tuple[str, ...]) -> list[Row]:
    heldout = load_heldout(config.heldout)
    prompts = heldout.select(config.docs, config.worlds)
    if not prompts:
        raise ValueError(f"no held-out prompts with K in {config.docs}")
    runner = _Runner(h, heldout, config.max_new_tokens)
    answers: dict[str, list[Answer]] = {m: [] for m in methods}
    probes: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    samples: dict[str, list] = {m: [] for m in methods}
    bar = h.bar(len(prompts) * len(methods), NAME)
    anchors = {m.partition(":")[0] for m in methods if m.startswith("parallel")}
    for prompt in prompts:
        # the store holds this prompt's documents and nothing else: no repaired group of an
        # earlier prompt in the same order is reused, so every repair is paid and counted
        h.runtime.store.clear()
        runner.warm(prompt, anchors)
        bar.set_postfix_str(f"K={prompt.k}, {prompt.kind}")
        for method in methods:
            holder: list[Answer] = []
            samples[method].append(timed(lambda: runner.answer(method, prompt, holder), h.device))
            answers[method].append(holder[0])
            probes[method].append(runner.probe(method, prompt))
            bar.update()
    bar.close()
    h.runtime.store.clear()
    return _rows(runner, prompts, methods, answers, probes, samples)


class _Runner:
    """Answers one prompt with one method; knows the prompt's ids and spans."""

    def __init__(self, h: Harness, heldout: HeldOut, max_new_tokens: int) -> None:
        self.h, self.heldout, self.max_new_tokens = h, heldout, max_new_tokens
        self._ids: dict[str, tuple[int, ...]] = {}
        self.stop_ids = [self.ids("\n")[-1], h.tokenizer.eos_token_id]

    def ids(self, text: str) -> tuple[int, ...]:
        if text not in self._ids:
            self._ids[text] = tuple(self.h.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._ids[text]

    def prompt_ids(self, prompt: Prompt) -> tuple[tuple[int, ...], list[tuple[int, ...]], tuple[int, ...]]:
        """(system ids, document ids in order, question ids)."""
        return (self.ids(self.heldout.system), [self.ids(d) for d in self.heldout.docs(prompt)],
                self.ids(question_text(prompt.question)))

    def context(self, prompt: Prompt, anchor: str) -> Context:
        root = Context().append(self.heldout.system)
        docs = root.parallel(*self.heldout.docs(prompt), anchor="root" if anchor == "parallel-root" else "path")
        return docs.append(question_text(prompt.question))

    def warm(self, prompt: Prompt, anchors: set[str]) -> None:
        for anchor in sorted(anchors):
            self.h.runtime.next_token_logits(self.context(prompt, anchor), repair="none")

    def answer(self, method: str, prompt: Prompt, out: list[Answer]) -> Outcome:
        """Answer ``prompt`` with ``method`` (the timed call); the answer goes to ``out``."""
        if method in ("full", "naive-concat"):
            return self._answer_hf(method, prompt, out)
        anchor, _, repair = method.partition(":")
        result = self.h.runtime.generate(self.context(prompt, anchor), self.max_new_tokens, repair=repair,
                                         do_sample=False, eos_token_id=self.stop_ids)
        stats = result.stats
        out.append(Answer(answer_of(result.text), stats.recomputed_tokens,
                          stats.parallel.checked_tokens if stats.parallel else 0))
        return Outcome(stats.ttft_s, result.token_ids, stats.computed_tokens, stats.cached_tokens)

    def probe(self, method: str, prompt: Prompt) -> torch.Tensor:
        """Logits ``[vocab]`` of the first answer token after its leading space (the token
        that picks the fact; the space itself is always certain), untimed."""
        h = self.h
        if method in ("full", "naive-concat"):
            system, docs, question = self.prompt_ids(prompt)
            ids = h.prompt_ids(system, *docs, question, self.ids(ANSWER_LEAD))
            if method == "full":
                return baselines.next_token_logits(h.model, ids, h.device)
            return baselines.next_token_logits(h.model, ids, h.device, cache=self._naive_cache(system, docs),
                                               cached_tokens=len(h.prompt_ids(system, *docs)))
        anchor, _, repair = method.partition(":")
        return h.runtime.next_token_logits(self.context(prompt, anchor).append(ANSWER_LEAD), repair=repair)

    def _naive_cache(self, system: tuple[int, ...], docs: list[tuple[int, ...]]):
        """Mellea's cache: the system line (with BOS) and each document prefilled alone from
        position 0, concatenated along time without moving any key."""
        h = self.h
        blocks = [baselines.prefill_alone(h.model, h.prompt_ids(system), h.device),
                  *(baselines.prefill_alone(h.model, d, h.device) for d in docs)]
        return baselines.concatenate(blocks)

    def _answer_hf(self, method: str, prompt: Prompt, out: list[Answer]) -> Outcome:
        h = self.h
        system, docs, question = self.prompt_ids(prompt)
        ids = h.prompt_ids(system, *docs, question)
        start = now(h.device)
        cache = self._naive_cache(system, docs) if method == "naive-concat" else None  # per request, timed
        cached = len(ids) - len(question) if cache is not None else 0
        with torch.inference_mode():
            input_ids = torch.tensor([ids], dtype=torch.long, device=h.device)  # [1, S]
            clock = FirstTokenClock(h.device)
            generated = h.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         max_new_tokens=self.max_new_tokens, eos_token_id=self.stop_ids,
                                         pad_token_id=baselines.pad_token_id(h.model, h.tokenizer), streamer=clock,
                                         **baselines.GREEDY, **({} if cache is None else cache_kwargs(h.model, cache)))
        new_ids = tuple(generated[0, len(ids):].tolist())
        out.append(Answer(answer_of(h.tokenizer.decode(new_ids, skip_special_tokens=True)), 0, 0))
        return Outcome(clock.first_token_at - start, new_ids, len(ids) - cached, cached)


def _rows(runner: _Runner, prompts: Sequence[Prompt], methods: Sequence[str], answers: dict[str, list[Answer]],
          probes: dict[str, list[torch.Tensor]], samples: dict[str, list]) -> list[Row]:
    h, rows = runner.h, []
    sizes = []  # (prompt tokens, document tokens) per prompt
    for p in prompts:
        system, docs, question = runner.prompt_ids(p)
        sizes.append((len(h.prompt_ids(system, *docs, question)), sum(map(len, docs))))
    for k, kind in dict.fromkeys((p.k, p.kind) for p in prompts):
        index = [i for i, p in enumerate(prompts) if (p.k, p.kind) == (k, kind)]
        has_reference = "full" in answers
        documents = sum(sizes[i][1] for i in index)
        context = round(sum(sizes[i][0] for i in index) / len(index))
        for method in methods:
            mine = [answers[method][i] for i in index]
            extra = {"accuracy": sum(a.text == prompts[i].answer for a, i in zip(mine, index)) / len(index),
                     "recomputed_fraction": sum(a.recomputed for a in mine) / documents,
                     "checked_fraction": sum(a.checked for a in mine) / documents}
            if has_reference and method != "full":
                f = compare_logits([probes["full"][i] for i in index], [probes[method][i] for i in index])
                agree = sum(answers[method][i].text == answers["full"][i].text for i in index) / len(index)
                extra |= {"top1_agreement": f.top1_agreement, "kl": f.kl, "answer_agreement": agree}
            measured = Measured(tuple(samples[method][i] for i in index))
            new_tokens = round(sum(len(s.outcome.new_ids) for s in measured.samples) / len(index))
            rows.append(Row.measured(NAME, method, context, new_tokens, measured, docs=k, question=kind, **extra))
    return rows
