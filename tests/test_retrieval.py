"""The synthetic retrieval task and its frozen held-out prompts (pure Python, no model):
one answer per question, values and paraphrases of the held-out set never in training."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from spanctx.bench import paraphrases, retrieval

HELDOUT = retrieval.load_heldout()
FILLER = "Filler prose goes here."


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{name\}", r"\S+").replace(r"\{value\}", r"\S+") + "$")


UNSEEN_FACTS = [_pattern(t[-1]) for t in retrieval.FACTS.values()]
UNSEEN_QUESTIONS = [_pattern(t[-1]) for kind in retrieval.QUESTIONS.values() for t in kind.values()]


def _facts(documents) -> list[str]:
    return [s for d in documents for s in re.split(r"(?<=\.) ", d.strip()) if s != FILLER]


@pytest.mark.parametrize("seed", range(20))
def test_every_question_has_exactly_one_answer_in_its_documents(seed):
    rng = random.Random(seed)
    k = rng.randint(1, 32)
    world = retrieval.make_world(rng, k, [FILLER], split=("train", "heldout")[seed % 2])
    assert len(world.documents) == k and len(world.people) == retrieval.people_for(k)
    values = [p.value(a) for p in world.people for a in ("code", "city", "pet")] + [p.name for p in world.people]
    assert not any(a != b and b.startswith(a) for a in values for b in values)
    assert all(p.manager != p.name and p.manager in {q.name for q in world.people} for p in world.people)
    assert len(_facts(world.documents)) == 4 * len(world.people)
    for kind in ("single", "two"):
        q = retrieval.ask(rng, world, kind)
        if q is None:
            continue
        assert len(q.documents) == (1 if kind == "single" else 2) and len(set(q.documents)) == len(q.documents)
        for value, doc in zip(q.answer.split(", "), q.documents):
            assert value in world.documents[doc]


@pytest.mark.parametrize("generated", [False, True])
def test_training_worlds_use_only_training_values_and_seen_paraphrases(generated):
    rng = random.Random(0)
    for _ in range(30):
        world = retrieval.make_world(rng, rng.randint(1, 32), [FILLER], generated=generated)
        assert {retrieval.split_of(p.value(a)) for p in world.people for a in retrieval.ATTRIBUTES} == {"train"}
        assert not any(p.match(f) for f in _facts(world.documents) for p in UNSEEN_FACTS) and not world.unseen
        for kind in ("single", "two"):
            q = retrieval.ask(rng, world, kind, generated=generated)
            assert q is None or not any(p.match(q.text) for p in UNSEEN_QUESTIONS)


def test_the_held_out_set_reads_values_never_trained_on_and_unseen_paraphrases():
    answers = [v for p in HELDOUT.prompts for v in p.answer.split(", ")]
    assert {retrieval.split_of(v) for v in answers} == {"heldout"}
    assert len(set(answers)) > 0.8 * len(answers)  # fresh values, not a small pool
    unseen = [p for p in HELDOUT.prompts if any(q.match(p.question) for q in UNSEEN_QUESTIONS)]
    assert unseen and all(p.paraphrase == "unseen" for p in unseen)
    assert any(q.match(f) for d in HELDOUT.documents for f in _facts(d) for q in UNSEEN_FACTS)
    assert Counter(p.paraphrase for p in HELDOUT.prompts)["seen"] > len(HELDOUT.prompts) / 2


def test_the_held_out_set_covers_every_k_and_kind():
    counts = Counter((p.k, p.kind) for p in HELDOUT.prompts)
    assert set(counts) == {(k, kind) for k in (2, 4, 8, 16, 32) for kind in ("single", "two")}
    assert all(n == 32 for n in counts.values())
    assert max(len(HELDOUT.text(p)) for p in HELDOUT.prompts) <= 6144  # within the training rows
    assert len(HELDOUT.select([16], worlds=2)) == 8 and {p.k for p in HELDOUT.select([16], worlds=2)} == {16}


def test_held_out_answers_sit_in_the_documents_the_question_needs():
    for p in HELDOUT.prompts:
        docs = HELDOUT.docs(p)
        assert sorted(p.order) == list(range(p.k))
        if p.kind == "single":
            assert p.answer in "".join(docs)
            continue
        manager, value = p.answer.split(", ")
        (name,) = re.findall(r"[A-Z][a-z]+", p.question)[1:]  # the one capitalised word after the first
        links = {t.format(name=name, value=manager) for t in retrieval.FACTS["manager"]}
        link = [i for i, d in enumerate(docs) if links & set(_facts([d]))]
        fact = [i for i, d in enumerate(docs) for f in _facts([d]) if manager in f and value in f]
        assert len(link) == len(fact) == 1 and link != fact


def test_answers_are_read_off_the_first_generated_line():
    assert retrieval.answer_text("4821") == " 4821\n"
    assert retrieval.answer_of(" Tovo, Oslo\nQ: next") == "Tovo, Oslo"
    assert retrieval.question_text("Where does Mira work?") == "Q: Where does Mira work?\nA:"


def test_a_question_can_be_asked_about_a_given_attribute():
    rng = random.Random(3)
    world = retrieval.make_world(rng, 8, [FILLER])
    for kind, attribute in (("single", "code"), ("single", "manager"), ("two", "code"), ("two", "pet")):
        q = retrieval.ask(rng, world, kind, attribute=attribute)
        value = q.answer.split(", ")[-1]
        assert any(p.value(attribute) == value for p in world.people)
        assert q.kind == kind
    with pytest.raises(ValueError, match="asks about one of"):
        retrieval.ask(rng, world, "two", attribute="manager")  # a manager chain ends on code, city or pet



def test_generated_training_paraphrases_are_many_and_far_from_every_held_out_one():
    held = [paraphrases.words(t) for t in paraphrases.held_out_templates()]
    facts, questions = paraphrases.training_facts(), paraphrases.training_questions()
    generated = [t for ts in facts.values() for t in ts] + [t for d in questions.values() for ts in d.values() for t in ts]
    hand = [t for ts in retrieval.FACTS.values() for t in ts[:-1]] \
        + [t for d in retrieval.QUESTIONS.values() for ts in d.values() for t in ts[:-1]]
    assert min(map(len, facts.values())) > 500 and min(len(ts) for d in questions.values() for ts in d.values()) > 50
    for template in hand + generated:
        mine = " ".join(paraphrases.words(template))
        assert not any(mine in " ".join(h) or " ".join(h) in mine for h in held), template
    for template in generated:
        mine = paraphrases.words(template)
        assert not re.search(r"\b(working|owns?|managed|tell)\b", " ".join(mine)) and mine[0] != "name", template
        for h in held:  # at least two word edits (substitute, insert, delete) apart
            if abs(len(mine) - len(h)) < 2:
                assert sum(a != b for a, b in zip(mine, h)) >= 2 or len(mine) != len(h), (template, h)
                assert len(mine) == len(h) or not any(mine[:i] + mine[i + 1:] == h or h[:i] + h[i + 1:] == mine
                                                      for i in range(max(len(mine), len(h)))), (template, h)


def test_training_worlds_mix_hand_written_and_generated_paraphrases():
    rng = random.Random(5)
    hand = [_pattern(t) for ts in retrieval.FACTS.values() for t in ts]
    generated = {a: [_pattern(t) for t in ts] for a, ts in paraphrases.training_facts().items()}
    facts = [f for _ in range(10) for f in _facts(retrieval.make_world(rng, 8, [FILLER], generated=True).documents)]
    from_hand = sum(any(p.match(f) for p in hand) for f in facts)
    assert 0.3 * len(facts) < from_hand < 0.8 * len(facts)
    assert all(any(p.match(f) for p in hand + [q for ps in generated.values() for q in ps]) for f in facts)
    plain = retrieval.make_world(random.Random(5), 8, [FILLER])  # the shipped preset's training data
    assert all(any(p.match(f) for p in hand) for f in _facts(plain.documents))
