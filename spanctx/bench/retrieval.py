"""Synthetic RAG retrieval in plain English: the task the ``tiny-trained`` preset learned
and the prompts the ``fidelity`` scenario scores.

A *world* is a few people, each with a four-digit code, a city they work in and a pet.
Their facts ("The code of Mira is 4821.", "Mira works in Oslo.", "Mira has a pet owl.")
are shuffled and dealt into K documents of two to four facts each, plus at most one
sentence of filler text. A prompt is a system line, the K documents in some order, then
``Q: <question>\\nA:``; the answer follows as `` <answer>\\n``:

- single-document questions: "What is the code of Mira?" (``4821``), "Where does Mira
  work?" (``Oslo``), "What pet does Mira have?" (``owl``);
- two-document questions: "What is the code of the person who works in Oslo?" and "Where
  does the person with code 4821 work?", asked only where the two facts sit in different
  documents. Their answer names the bridge person first (``Mira, 4821``): both lookups
  are copies from a document, which a model of a few million parameters can learn.

Codes, cities and names are unique within a world and no name or city is a prefix of
another, so every question has exactly one answer. Everything is drawn from a
``random.Random``; the held-out prompts are frozen in ``data/retrieval-heldout.json``
(``write_heldout``), so they do not change with the Python version whose docs supply
the filler text.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import attrs

__all__ = [
    "ANSWER_LEAD",
    "HELDOUT_PATH",
    "SYSTEM_LINES",
    "HeldOut",
    "Prompt",
    "Person",
    "Question",
    "World",
    "answer_of",
    "answer_text",
    "ask",
    "filler_sentences",
    "load_heldout",
    "make_world",
    "natural_text",
    "question_text",
    "write_heldout",
]

HELDOUT_PATH = Path(__file__).parent / "data" / "retrieval-heldout.json"
ANSWER_LEAD = " "  # what every answer starts with, after the prompt's "A:"
SYSTEM_LINES = (
    "Answer the question from the documents.\n",
    "Read the documents, then answer the question.\n",
    "You answer questions using only these notes.\n",
    "Use the documents below to answer.\n",
)
CITIES = ("Oslo", "Lima", "Paris", "Cairo", "Quito", "Dakar", "Perth", "Turin", "Delhi", "Seoul", "Tokyo",
          "Rome", "Bern", "Riga", "Kyiv", "Baku", "Doha", "Accra", "Lagos", "Hanoi", "Manila", "Osaka", "Porto",
          "Lyon", "Malmo", "Graz", "Split", "Sofia", "Minsk", "Tunis", "Rabat", "Dubai", "Muscat", "Kabul",
          "Dhaka", "Lhasa", "Busan", "Taipei", "Sydney", "Hobart", "Darwin", "Austin", "Boston", "Denver",
          "Dallas", "Miami", "Quebec", "Havana", "Bogota", "Caracas", "Recife", "Natal", "Cusco", "Leeds",
          "York", "Bath", "Cork", "Ghent", "Bruges", "Aachen", "Bonn", "Basel", "Zurich", "Vienna", "Prague")
PETS = ("owl", "cat", "dog", "goat", "horse", "parrot", "rabbit", "turtle", "snake", "hamster", "ferret",
        "lizard", "duck", "goose", "pony", "frog", "mouse", "canary", "gecko", "crab")
CONSONANTS = "bdfghjklmnprstvz"
VOWELS = "aeiou"
ATTRIBUTES = ("code", "city", "pet")
FACT = {"code": "The code of {name} is {value}.", "city": "{name} works in {value}.",
        "pet": "{name} has a pet {value}."}
SINGLE = {"code": "What is the code of {name}?", "city": "Where does {name} work?",
          "pet": "What pet does {name} have?"}
TWO = {"code": "What is the code of the person who works in {city}?",
       "city": "Where does the person with code {code} work?"}


@attrs.frozen
class Person:
    name: str
    code: str
    city: str
    pet: str

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


@attrs.frozen
class World:
    """People and the K documents that hold their facts; ``where[(name, attribute)]`` is
    the index of the document holding that fact."""

    people: tuple[Person, ...]
    documents: tuple[str, ...]
    where: dict[tuple[str, str], int] = attrs.field(eq=False)


@attrs.frozen
class Question:
    """``kind``: ``"single"`` or ``"two"`` (documents needed); ``documents``: which ones."""

    text: str
    answer: str
    kind: str
    documents: tuple[int, ...]


def _names(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct four-letter names (consonant-vowel twice, capitalised): all of
    one length, so none is a prefix of another."""
    names: set[str] = set()
    while len(names) < count:
        letters = [rng.choice(CONSONANTS), rng.choice(VOWELS), rng.choice(CONSONANTS), rng.choice(VOWELS)]
        names.add("".join(letters).capitalize())
    return sorted(names, key=lambda _: rng.random())


def _prefix_free(words: Sequence[str]) -> list[str]:
    return [w for w in words if not any(o != w and o.startswith(w) for o in words)]


_CITIES = _prefix_free(CITIES)


def make_world(rng: random.Random, k: int, filler: Sequence[str], filler_rate: float = 0.5) -> World:
    """K documents over K people (three facts each, so about three facts a document).

    Facts are dealt round-robin after a shuffle, so every document gets two to four of
    them; each document gets one ``filler`` sentence at a random place with probability
    ``filler_rate``."""
    if not 1 <= k <= len(_CITIES):
        raise ValueError(f"k must be in 1..{len(_CITIES)}, got {k}")
    names = _names(rng, k)
    cities = rng.sample(_CITIES, k)
    codes = rng.sample(range(1000, 10000), k)
    people = tuple(Person(n, str(c), city, rng.choice(PETS)) for n, c, city in zip(names, codes, cities))
    facts = [(p, a) for p in people for a in ATTRIBUTES]
    rng.shuffle(facts)
    sizes = [3] * k
    for _ in range(k // 2):  # move a fact from one document to another: sizes 2..4, same total
        i, j = rng.randrange(k), rng.randrange(k)
        if i != j and sizes[i] > 2 and sizes[j] < 4:
            sizes[i] -= 1
            sizes[j] += 1
    documents, where, start = [], {}, 0
    for d, size in enumerate(sizes):
        sentences = []
        for person, attribute in facts[start:start + size]:
            sentences.append(FACT[attribute].format(name=person.name, value=person.value(attribute)))
            where[(person.name, attribute)] = d
        start += size
        if filler and rng.random() < filler_rate:
            sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(filler))
        documents.append(" ".join(sentences) + "\n")
    return World(people, tuple(documents), where)


def ask(rng: random.Random, world: World, kind: str) -> Question | None:
    """A random question of ``kind`` about ``world`` (None: no two-document question exists)."""
    if kind == "single":
        person, attribute = rng.choice(world.people), rng.choice(ATTRIBUTES)
        return Question(SINGLE[attribute].format(name=person.name), person.value(attribute), kind,
                        (world.where[(person.name, attribute)],))
    if kind != "two":
        raise ValueError(f"kind must be 'single' or 'two', got {kind!r}")
    split = [p for p in world.people if world.where[(p.name, "code")] != world.where[(p.name, "city")]]
    if not split:
        return None
    person, asked = rng.choice(split), rng.choice(("code", "city"))
    text = TWO[asked].format(city=person.city, code=person.code)
    docs = (world.where[(person.name, "city" if asked == "code" else "code")], world.where[(person.name, asked)])
    return Question(text, f"{person.name}, {person.value(asked)}", kind, docs)


def question_text(question: str) -> str:
    """The prompt's last span: the question, then the answer cue."""
    return f"Q: {question}\nA:"


def answer_text(answer: str) -> str:
    """How an answer follows its prompt: the lead space, the answer, a newline."""
    return f"{ANSWER_LEAD}{answer}\n"


def answer_of(generated: str) -> str:
    """The answer in a generated continuation: its first line, stripped."""
    return generated.split("\n", 1)[0].strip()


# -- natural text (the Python docs that ship with CPython) ----------------------------------

def natural_text(held_out: bool = False) -> dict[str, str]:
    """CPython's ``pydoc_data.topics`` (the language reference's topics as plain text; PSF
    License 2.0), by topic: every tenth topic (by sorted name) is held out from training."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    return {n: topics[n] for i, n in enumerate(names) if (i % 10 == 0) == held_out}


def filler_sentences(texts: dict[str, str], min_chars: int = 24, max_chars: int = 90) -> list[str]:
    """Single-line prose sentences of ``texts``, for documents' filler (no code lines)."""
    out = []
    for text in texts.values():
        for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            if min_chars <= len(sentence) <= max_chars and sentence[0].isupper() and sentence.isascii() \
                    and not re.search(r"[{}\[\]=*>`|\\]", sentence):
                out.append(sentence)
    return sorted(set(out))


# -- held-out prompts ---------------------------------------------------------------------------

@attrs.frozen
class Prompt:
    """One held-out request: the world's documents in ``order``, then the question."""

    world: int
    k: int
    order: tuple[int, ...]
    question: str
    answer: str
    kind: str


@attrs.frozen(eq=False)
class HeldOut:
    """The frozen held-out set: ``documents[w]`` are world ``w``'s documents."""

    system: str
    documents: tuple[tuple[str, ...], ...]
    prompts: tuple[Prompt, ...]

    def docs(self, prompt: Prompt) -> list[str]:
        return [self.documents[prompt.world][j] for j in prompt.order]

    def text(self, prompt: Prompt) -> str:
        """The whole prompt as one text (without BOS)."""
        return self.system + "".join(self.docs(prompt)) + question_text(prompt.question)

    def select(self, ks: Sequence[int] | None = None, worlds: int | None = None) -> tuple[Prompt, ...]:
        """The prompts of K in ``ks`` (all when None) from the first ``worlds`` worlds of each K."""
        firsts: dict[int, list[int]] = {}
        for p in self.prompts:
            seen = firsts.setdefault(p.k, [])
            if p.world not in seen:
                seen.append(p.world)
        keep = {w for seen in firsts.values() for w in (seen if worlds is None else seen[:worlds])}
        return tuple(p for p in self.prompts if (ks is None or p.k in ks) and p.world in keep)


def write_heldout(path: str | Path = HELDOUT_PATH, seed: int = 20261126, ks: Sequence[int] = (2, 4, 8, 16),
                  worlds: int = 16, per_kind: int = 2) -> Path:
    """Draw the held-out set (filler from the held-out topics) and write it as JSON: per
    K, ``worlds`` worlds, each asked ``per_kind`` single and two-document questions, each
    question with its own shuffled document order."""
    rng = random.Random(seed)
    filler = filler_sentences(natural_text(held_out=True))
    documents, prompts = [], []
    for k in ks:
        for _ in range(worlds):
            world = make_world(rng, k, filler)
            index = len(documents)
            documents.append(list(world.documents))
            for kind in ("single", "two"):
                for _ in range(per_kind):
                    q = ask(rng, world, kind)
                    if q is not None:
                        order = rng.sample(range(k), k)
                        prompts.append({"world": index, "k": k, "order": order, "question": q.text,
                                        "answer": q.answer, "kind": q.kind})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seed": seed, "system": SYSTEM_LINES[0], "documents": documents,
                                "prompts": prompts}, indent=0) + "\n")
    return path


def load_heldout(path: str | Path = HELDOUT_PATH) -> HeldOut:
    data = json.loads(Path(path).read_text())
    prompts = tuple(Prompt(p["world"], p["k"], tuple(p["order"]), p["question"], p["answer"], p["kind"])
                    for p in data["prompts"])
    return HeldOut(data["system"], tuple(tuple(d) for d in data["documents"]), prompts)
