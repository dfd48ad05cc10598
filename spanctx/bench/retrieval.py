"""Synthetic RAG retrieval in plain English: the task the ``tiny-trained`` preset learned
and the prompts the ``fidelity`` scenario scores. The task is built so that a model can
only answer by reading (copying from) its documents:

- **open vocabulary**: every name, city and pet is a fresh pronounceable letter string
  ("Tovarin", "Plessburg", "mokka"), drawn from pools of hundreds of thousands, and codes
  are four-digit numbers. A value belongs to the training or the held-out *split* by a hash
  (``split_of``): training worlds use only training values, held-out worlds only held-out
  ones, so no held-out answer was ever seen in training;
- **paraphrases**: each fact and each question has five or six hand-written templates;
  the last one of each is never used in training (``FACTS``, ``QUESTIONS``). Training
  worlds can also draw (``generated=True``), ``GENERATED_SHARE`` of the time, from
  thousands of generated paraphrases kept apart from the held-out ones
  (``spanctx.bench.paraphrases``; the shipped preset met them in the later part of its training);
- **filler**: every document carries zero to two prose sentences of natural English;
- **chain-of-lookup**: a two-document question asks about someone's manager ("Where does
  the manager of Mira work?") where the manager fact and the manager's fact sit in
  different documents; the answer names the bridge first (``Tovo, Oslo``), so both hops
  are forward copies ("manager of Mira" -> ``Tovo``, "Tovo works in" -> ``Oslo``).

A *world* is K documents over ``people_for(K)`` people, each with a code, a city, a pet and
a manager (another person of the world); their facts are shuffled and dealt round-robin
into the K documents. A prompt is a system line, the K documents in some order, then
``Q: <question>\\nA:``; the answer follows as `` <answer>\\n``. Within a world no value is
a prefix of another, so every question has exactly one answer. Everything is drawn from a
``random.Random``; the held-out prompts are frozen in ``data/retrieval-heldout.json``
(``write_heldout``), so they do not change with the Python version whose docs supply the
filler text.
"""

from __future__ import annotations

import json
import math
import random
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import attrs

from spanctx.bench.paraphrases import FACTS, QUESTIONS, training_facts, training_questions

__all__ = [
    "ANSWER_LEAD",
    "ATTRIBUTES",
    "FACTS",
    "HELDOUT_PATH",
    "QUESTIONS",
    "SYSTEM_LINES",
    "HeldOut",
    "Person",
    "Prompt",
    "Question",
    "World",
    "answer_of",
    "answer_text",
    "ask",
    "filler_sentences",
    "load_heldout",
    "make_world",
    "natural_text",
    "people_for",
    "question_text",
    "split_of",
    "write_heldout",
]

HELDOUT_PATH = Path(__file__).parent / "data" / "retrieval-heldout.json"
ANSWER_LEAD = " "  # what every answer starts with, after the prompt's "A:"
SPLITS = ("train", "heldout")
SYSTEM_LINES = (
    "Answer the question from the documents.\n",
    "Read the documents, then answer the question.\n",
    "You answer questions using only these notes.\n",
    "Use the documents below to answer.\n",
)
ATTRIBUTES = ("code", "city", "pet", "manager")
GENERATED_SHARE = 0.5  # of training facts and questions: a generated paraphrase, the rest hand-written
_ONSETS = ("b", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
           "kl", "pl", "st", "tr", "sh", "ch", "th")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou", "ee")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "k", "t")
_CITY_ENDINGS = ("", "", "", "burg", "ton", "ville", "ford", "stad", "polis", "mouth", "holm", "ia")


def split_of(value: str) -> str:
    """``"heldout"`` for about a fifth of all values (by a CRC32 of the lower-cased
    value), else ``"train"``: the two splits never share a value."""
    return SPLITS[zlib.crc32(value.lower().encode()) % 5 == 0]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _value(rng: random.Random, attribute: str, split: str) -> str:
    """A fresh value of ``attribute`` in ``split``: a code, a name (2-3 syllables), a city
    (2 syllables and an ending) or a pet (lower case, 2 syllables)."""
    while True:
        if attribute == "code":
            value = str(rng.randrange(1000, 10000))
        elif attribute == "city":
            value = (_word(rng, 2) + rng.choice(_CITY_ENDINGS)).capitalize()
        elif attribute == "pet":
            value = _word(rng, 2)
        else:
            value = _word(rng, rng.choice((2, 2, 3))).capitalize()
        if 3 <= len(value) <= 12 and split_of(value) == split:
            return value


@attrs.frozen
class Person:
    name: str
    code: str
    city: str
    pet: str
    manager: str

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


@attrs.frozen
class World:
    """People and the K documents that hold their facts; ``where[(name, attribute)]`` is
    the index of the document holding that fact and ``unseen`` the facts written with a
    template held out of training."""

    people: tuple[Person, ...]
    documents: tuple[str, ...]
    where: dict[tuple[str, str], int] = attrs.field(eq=False)
    unseen: frozenset[tuple[str, str]] = frozenset()

    def person(self, name: str) -> Person:
        return next(p for p in self.people if p.name == name)


@attrs.frozen
class Question:
    """``kind``: ``"single"`` or ``"two"`` (documents needed); ``documents``: which ones;
    ``unseen``: the question's template, or a fact it needs, was held out of training."""

    text: str
    answer: str
    kind: str
    documents: tuple[int, ...]
    unseen: bool = False


def people_for(k: int) -> int:
    """People in a world of ``k`` documents: about two facts (of four per person) a document."""
    return max(2, math.ceil(k / 2) + 1)


def _template(rng: random.Random, hand: Sequence[str], generated: Sequence[str], split: str) -> tuple[str, bool]:
    """A template and whether it is held out of training: the held-out split draws from
    all of ``hand``; training from ``hand`` without its last, or (``GENERATED_SHARE`` of
    the time, when ``generated``) from ``generated``."""
    if split != "train":
        t = rng.randrange(len(hand))
        return hand[t], t == len(hand) - 1
    if generated and rng.random() < GENERATED_SHARE:
        return rng.choice(generated), False
    return hand[rng.randrange(len(hand) - 1)], False


def make_world(rng: random.Random, k: int, filler: Sequence[str], split: str = "train",
               generated: bool = False) -> World:
    """K documents over ``people_for(k)`` people, values and templates of ``split``
    (training: with the generated paraphrases too when ``generated``).

    Facts are shuffled and dealt round-robin, so document sizes differ by at most one
    fact; each document gets 0, 1, 1 or 2 ``filler`` sentences at random places."""
    if not 1 <= k <= 64:
        raise ValueError(f"k must be in 1..64, got {k}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = people_for(k)
    values: dict[str, list[str]] = {}
    taken: list[str] = []
    for attribute in ("code", "city", "pet", "name"):
        values[attribute] = []
        while len(values[attribute]) < n:
            v = _value(rng, "manager" if attribute == "name" else attribute, split)
            if not any(v.startswith(o) or o.startswith(v) for o in taken):
                taken.append(v)
                values[attribute].append(v)
    names = values["name"]
    managers = [rng.choice([m for m in names if m != name]) for name in names]
    people = tuple(Person(*row) for row in zip(names, values["code"], values["city"], values["pet"], managers))
    facts = [(p, a) for p in people for a in ATTRIBUTES]
    rng.shuffle(facts)
    sentences: list[list[str]] = [[] for _ in range(k)]
    where, unseen = {}, set()
    for i, (person, attribute) in enumerate(facts):
        template, held_out = _template(rng, FACTS[attribute], training_facts()[attribute] if generated else (),
                                       split)
        sentences[i % k].append(template.format(name=person.name, value=person.value(attribute)))
        where[(person.name, attribute)] = i % k
        if held_out:
            unseen.add((person.name, attribute))
    documents = []
    for doc in sentences:
        rng.shuffle(doc)
        for _ in range(rng.choice((0, 1, 1, 2)) if filler else 0):
            doc.insert(rng.randrange(len(doc) + 1), rng.choice(filler))
        documents.append(" ".join(doc) + "\n")
    return World(people, tuple(documents), where, frozenset(unseen))


def ask(rng: random.Random, world: World, kind: str, split: str = "train",
        attribute: str | None = None, generated: bool = False) -> Question | None:
    """A random question of ``kind`` about ``world``, its template from ``split``'s (as in
    ``make_world``), about ``attribute`` (None: any, uniformly). Two-document questions are asked only where the
    manager fact and the manager's fact sit in different documents (None: no such person)."""
    if kind not in QUESTIONS:
        raise ValueError(f"kind must be 'single' or 'two', got {kind!r}")
    if attribute is not None and attribute not in QUESTIONS[kind]:
        raise ValueError(f"a {kind!r} question asks about one of {tuple(QUESTIONS[kind])}, got {attribute!r}")
    if kind == "single":
        person = rng.choice(world.people)
        attribute = attribute or rng.choice(ATTRIBUTES)
        needs = [(person.name, attribute)]
        answer = person.value(attribute)
    else:
        pairs = [(p, a) for p in world.people for a in QUESTIONS["two"]
                 if world.where[(p.name, "manager")] != world.where[(p.manager, a)] and attribute in (None, a)]
        if not pairs:
            return None
        person, attribute = rng.choice(pairs)
        needs = [(person.name, "manager"), (person.manager, attribute)]
        answer = f"{person.manager}, {world.person(person.manager).value(attribute)}"
    template, held_out = _template(rng, QUESTIONS[kind][attribute],
                                   training_questions()[kind][attribute] if generated else (), split)
    unseen = held_out or any(n in world.unseen for n in needs)
    return Question(template.format(name=person.name), answer, kind, tuple(world.where[n] for n in needs), unseen)


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
    """One held-out request: the world's documents in ``order``, then the question.
    ``paraphrase``: ``"unseen"`` when its question template or a fact it needs was
    written with a template held out of training, else ``"seen"``."""

    world: int
    k: int
    order: tuple[int, ...]
    question: str
    answer: str
    kind: str
    paraphrase: str = "seen"


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


def write_heldout(path: str | Path = HELDOUT_PATH, seed: int = 20261203, ks: Sequence[int] = (2, 4, 8, 16, 32),
                  worlds: int = 16, per_kind: int = 2) -> Path:
    """Draw the held-out set (held-out values, all templates, filler from the held-out
    topics) and write it as JSON: per K, ``worlds`` worlds, each asked ``per_kind``
    single and two-document questions, each with its own shuffled document order."""
    rng = random.Random(seed)
    filler = filler_sentences(natural_text(held_out=True))
    documents, prompts = [], []
    for k in ks:
        for _ in range(worlds):
            world = make_world(rng, k, filler, split="heldout")
            index = len(documents)
            documents.append(list(world.documents))
            for kind in ("single", "two"):
                for _ in range(per_kind):
                    q = ask(rng, world, kind, split="heldout")
                    if q is not None:
                        order = rng.sample(range(k), k)
                        prompts.append({"world": index, "k": k, "order": order, "question": q.text,
                                        "answer": q.answer, "kind": q.kind,
                                        "paraphrase": "unseen" if q.unseen else "seen"})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seed": seed, "system": SYSTEM_LINES[0], "documents": documents,
                                "prompts": prompts}, indent=0) + "\n")
    return path


def load_heldout(path: str | Path = HELDOUT_PATH) -> HeldOut:
    data = json.loads(Path(path).read_text())
    prompts = tuple(Prompt(p["world"], p["k"], tuple(p["order"]), p["question"], p["answer"], p["kind"],
                           p.get("paraphrase", "seen")) for p in data["prompts"])
    return HeldOut(data["system"], tuple(tuple(d) for d in data["documents"]), prompts)
