"""The cache-reuse demo: shared documents, several questions, each answered twice: by a
full prefill of the whole prompt and with span reuse (the documents' KV computed once).

The workload is the synthetic retrieval task the ``tiny-trained`` preset learned
(``spanctx.bench.retrieval``): a system line, K documents of facts about people, then
``Q: ...\\nA:``. On ``tiny-trained`` (the default) the answers are real and checked
against the facts; on a random-weight preset they are noise, their timings still real.
The documents are cut to fit the model's positions.
"""

from __future__ import annotations

import re

import attrs
import torch

from .bench import retrieval
from .core.spans import Context
from .presets import PRESETS
from .runtime import Runtime
from .session.results import Result

DEFAULT_MODEL = "tiny-trained"
SMALL_MODEL_PARAMETERS = 50_000_000  # below this, the demo runs on one CPU thread


@attrs.frozen
class Question:
    text: str
    answer: str  # the right answer, from the facts


@attrs.frozen
class Workload:
    """One shared context (system line, then the documents as one span) and the questions."""

    shared: Context
    questions: tuple[Question, ...]
    num_docs: int

    def prompt(self, question: Question) -> Context:
        return self.shared.append(retrieval.question_text(question.text))


@attrs.frozen
class DemoRow:
    """One question answered twice: full prefill and span reuse."""

    question: Question
    full: Result
    reused: Result

    @property
    def identical(self) -> bool:
        return self.full.token_ids == self.reused.token_ids

    @property
    def right(self) -> bool:
        return retrieval.answer_of(self.reused.text) == self.question.answer

    @property
    def ttft_speedup(self) -> float:
        return self.full.stats.ttft_s / max(self.reused.stats.ttft_s, 1e-9)


def _fact_pattern(template: str) -> re.Pattern:
    """A regex of one fact template of ``retrieval.FACTS``: groups name and value."""
    escaped = re.escape(template).replace(r"\{name\}", r"(?P<name>\w+)").replace(r"\{value\}", r"(?P<value>\w+)")
    return re.compile(escaped)


# per attribute: every fact wording the documents may use, and the question asked (the
# first, trained wording); cities, pets and managers first: the model copies those best
FACTS = tuple((tuple(_fact_pattern(t) for t in retrieval.FACTS[attribute]), retrieval.QUESTIONS["single"][attribute][0])
              for attribute in ("city", "pet", "manager", "code"))


def workload(num_docs: int, num_questions: int) -> Workload:
    """The documents of a frozen held-out world (``bench/data/retrieval-heldout.json``:
    people, codes, cities and filler the model never trained on) with the most documents,
    at most ``num_docs`` (held-out worlds have 2 to 32), and ``num_questions``
    single-document questions about its facts, the same every run."""
    heldout = retrieval.load_heldout()
    sizes = sorted({p.k for p in heldout.prompts})
    k = max((size for size in sizes if size <= num_docs), default=None)
    if k is None:
        raise ValueError(f"the demo's worlds have {sizes} documents; --docs must be at least {sizes[0]}")
    documents = heldout.documents[next(p.world for p in heldout.prompts if p.k == k)]
    text = "".join(documents)
    by_kind = [[Question(question.format(name=m["name"]), m["value"])
                for pattern in patterns for m in pattern.finditer(text)]
               for patterns, question in FACTS]
    mixed = [q for group in zip(*by_kind) for q in group]  # code, city, pet, code, ...
    shared = Context().append(heldout.system).append(text)
    return Workload(shared, tuple(mixed[:num_questions]), k)


def fitted_workload(rt: Runtime, num_docs: int, num_questions: int, max_new_tokens: int) -> Workload:
    """The largest workload of at most ``num_docs`` documents whose every prompt, plus
    ``max_new_tokens``, fits the model's positions."""
    k = num_docs
    while True:
        w = workload(k, num_questions)
        longest = max(len(rt.token_ids(w.prompt(q))) for q in w.questions)
        if rt.max_positions is None or longest + max_new_tokens <= rt.max_positions:
            return w
        if w.num_docs == 2:
            raise ValueError(f"even {w.num_docs} documents and {max_new_tokens} new tokens exceed the model's "
                             f"{rt.max_positions} positions")
        k = w.num_docs - 1


def run_demo(rt: Runtime, w: Workload, max_new_tokens: int = 16) -> list[DemoRow]:
    """Ask every question after the shared context, first as a full prefill, then with
    reuse. The first reused question is a miss (it computes and stores the documents);
    the others reuse them and compute only their question."""
    rt.generate(w.prompt(w.questions[0]), max_new_tokens=2, reuse=False)  # warm-up: first-call costs stay out
    rows = []
    for question in w.questions:
        ctx = w.prompt(question)
        full = rt.generate(ctx, max_new_tokens=max_new_tokens, reuse=False)
        reused = rt.generate(ctx, max_new_tokens=max_new_tokens)
        rows.append(DemoRow(question, full, reused))
    return rows


def format_table(rows: list[DemoRow]) -> str:
    header = ("question", "answer (full)", "answer (reuse)", "right", "prompt", "cached", "computed",
              "TTFT full", "TTFT reuse", "speedup", "same tokens")
    lines = [header]
    for row in rows:
        f, r = row.full.stats, row.reused.stats
        lines.append((
            row.question.text[:34], _shown(row.full.text), _shown(row.reused.text), "yes" if row.right else "no",
            str(f.prompt_tokens), str(r.cached_tokens), str(r.computed_tokens),
            f"{f.ttft_s * 1e3:.1f} ms", f"{r.ttft_s * 1e3:.1f} ms", f"{row.ttft_speedup:.1f}x",
            "yes" if row.identical else "NO",
        ))
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _shown(text: str) -> str:
    return repr(retrieval.answer_of(text))[:16]


def main(args) -> int:
    """``spanctx demo`` (arguments in ``spanctx.cli``): 0 when every answer with reuse has
    the same tokens as without."""
    name = args.model or DEFAULT_MODEL
    rt = Runtime.from_pretrained(name, device=args.device, dtype=args.dtype, tiers=args.tier)
    preset = PRESETS.get(name)
    if preset is not None and preset.weights is not None:
        print(f"model: preset {name!r} ({preset.description}; 6M parameters): it answers this task, "
              "not general questions")
    elif preset is not None:
        print(f"model: preset {name!r} ({preset.description}) with RANDOM weights: its answers are noise, "
              "its timings and reuse are real.\n       The default, tiny-trained, answers for real; or point at "
              "a real model with --model PATH_OR_HUB_ID.")
    else:
        print(f"model: {name}")
    if rt.device.type == "cpu" and sum(p.numel() for p in rt.model.parameters()) < SMALL_MODEL_PARAMETERS:
        # a small model is overhead-bound: one thread is as fast on an idle CPU and several
        # times faster on a busy one (threads of one op wait for each other's time slices)
        torch.set_num_threads(1)
    print(f"{rt}, {torch.get_num_threads()} CPU thread(s)" if rt.device.type == "cpu" else rt)
    w = fitted_workload(rt, args.docs, args.questions, args.max_new_tokens)
    shared_tokens = len(rt.token_ids(w.shared))
    print(f"shared context: a system line and {w.num_docs} documents, {shared_tokens} tokens"
          f"{'' if w.num_docs == args.docs else f' (cut from {args.docs} documents to fit the model)'}; "
          f"{len(w.questions)} questions\n")
    rows = run_demo(rt, w, args.max_new_tokens)
    print(format_table(rows))
    warm = rows[1:]
    same = all(r.identical for r in rows)
    stats = rt.store.stats
    if warm:
        speedup = sum(r.ttft_speedup for r in warm) / len(warm)
        print(f"\nfirst question: cold store (computes and stores the documents); the other {len(warm)}: "
              f"mean TTFT speedup {speedup:.1f}x")
    print(f"right answers: {sum(r.right for r in rows)}/{len(rows)}")
    print(f"outputs identical with and without reuse: {'yes' if same else 'NO'}")
    print(f"store: {stats.entries} spans, {stats.bytes_used / 2**20:.1f} MiB of "
          f"{stats.bytes_budget / 2**20:.0f} MiB, {stats.hits} hits, {stats.misses} misses, "
          f"{stats.evictions} evictions")
    if rt.tiers is not None and rt.tiers.flush(timeout=60):
        print(f"tiers: {rt.tiers.totals.hits} spans fetched, {rt.tiers.totals.written} written")
    return 0 if same else 1
