"""The cache-reuse demo: shared documents, several questions, each answered twice: by a
full prefill of the whole prompt and with span reuse (the documents' KV computed once).

The workload is the synthetic retrieval task the ``tiny-trained`` preset learned
(``spanctx.bench.retrieval``): a system line, K documents of facts about people, then
``Q: ...\\nA:``. On ``tiny-trained`` (the default) the answers are real and checked
against the facts; on a random-weight preset they are noise, their timings still real.
The documents are cut to fit the model's positions.
"""

from __future__ import annotations

import random

import attrs

from .bench import retrieval
from .presets import PRESETS
from .results import Result
from .runtime import Runtime
from .spans import Context

DEFAULT_MODEL = "tiny-trained"


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


def workload(num_docs: int, num_questions: int, seed: int = 0) -> Workload:
    """K = ``num_docs`` documents about K people and ``num_questions`` distinct
    single-document questions about them (seeded: the same every run)."""
    rng = random.Random(seed)
    world = retrieval.make_world(rng, num_docs, filler=())
    questions: dict[str, Question] = {}
    while len(questions) < min(num_questions, 3 * num_docs):
        q = retrieval.ask(rng, world, "single")
        questions.setdefault(q.text, Question(q.text, q.answer))
    shared = Context().append(retrieval.SYSTEM_LINES[0]).append("".join(world.documents))
    return Workload(shared, tuple(questions.values()), num_docs)


def fitted_workload(rt: Runtime, num_docs: int, num_questions: int, max_new_tokens: int) -> Workload:
    """The largest workload of at most ``num_docs`` documents whose every prompt, plus
    ``max_new_tokens``, fits the model's positions."""
    for k in range(num_docs, 0, -1):
        w = workload(k, num_questions)
        longest = max(len(rt.token_ids(w.prompt(q))) for q in w.questions)
        if rt.max_positions is None or longest + max_new_tokens <= rt.max_positions:
            return w
    raise ValueError(f"even one document and {max_new_tokens} new tokens exceed the model's "
                     f"{rt.max_positions} positions")


def run_demo(rt: Runtime, w: Workload, max_new_tokens: int = 10) -> list[DemoRow]:
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
    rt = Runtime.from_pretrained(name, device=args.device, dtype=args.dtype)
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
    print(rt)
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
    return 0 if same else 1
