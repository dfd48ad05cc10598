"""The synthetic retrieval task and its frozen held-out prompts (pure Python, no model)."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from spanctx.bench import retrieval

HELDOUT = retrieval.load_heldout()


def _facts(documents) -> list[str]:
    return [s for d in documents for s in re.split(r"(?<=\.) ", d.strip())]


@pytest.mark.parametrize("seed", range(20))
def test_every_question_has_exactly_one_answer_in_its_documents(seed):
    rng = random.Random(seed)
    world = retrieval.make_world(rng, rng.randint(2, 16), ["Filler prose goes here."])
    names = [p.name for p in world.people]
    cities = [p.city for p in world.people]
    assert len(set(names)) == len(names) and len({p.code for p in world.people}) == len(names)
    assert not any(a != b and b.startswith(a) for a in cities for b in cities)
    facts = _facts(world.documents)
    assert len([f for f in facts if f != "Filler prose goes here."]) == 3 * len(names)
    for kind in ("single", "two"):
        q = retrieval.ask(rng, world, kind)
        if q is None:
            continue
        assert len(q.documents) == (1 if kind == "single" else 2) and len(set(q.documents)) == len(q.documents)
        for value in q.answer.split(", "):
            assert any(value in world.documents[d] for d in q.documents)
    assert all(2 <= sum(f != "Filler prose goes here." for f in _facts([d])) <= 4 for d in world.documents)


def test_the_held_out_set_covers_every_k_and_kind():
    counts = Counter((p.k, p.kind) for p in HELDOUT.prompts)
    assert {k for k, _ in counts} == {2, 4, 8, 16}
    assert all(counts[(k, "single")] == 32 for k in (2, 4, 8, 16))
    assert all(counts[(k, "two")] >= 24 for k in (2, 4, 8, 16))
    assert max(len(HELDOUT.text(p)) for p in HELDOUT.prompts) <= 2048  # contexts up to ~2K byte tokens
    assert len(HELDOUT.select([16], worlds=2)) == 8 and {p.k for p in HELDOUT.select([16], worlds=2)} == {16}


def test_held_out_answers_sit_in_the_documents_the_question_needs():
    for p in HELDOUT.prompts:
        docs = HELDOUT.docs(p)
        assert sorted(p.order) == list(range(p.k))
        text = "".join(docs)
        if p.kind == "single":
            assert p.answer in text
        else:
            name, value = p.answer.split(", ")
            bridge = re.search(r"(works in|with code) (\w+)", p.question)[2]
            near_bridge = [d for d in docs if bridge in d and name in d]
            near_value = [d for d in docs if value in d and name in d]
            assert near_bridge and near_value and not set(near_bridge) & set(near_value)


def test_answers_are_read_off_the_first_generated_line():
    assert retrieval.answer_text("4821") == " 4821\n"
    assert retrieval.answer_of(" Mira, 4821\nQ: next") == "Mira, 4821"
    assert retrieval.question_text("Where does Mira work?") == "Q: Where does Mira work?\nA:"
