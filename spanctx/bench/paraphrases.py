"""The retrieval task's sentence templates: the hand-written ones (``FACTS``, ``QUESTIONS``;
the last of each is held out of training) and a broad set of training paraphrases
generated combinatorially (``training_facts``, ``training_questions``), so that a
held-out template is one more sample of a wide distribution rather than a sixth point
beside five.

The generator crosses subject forms ("Mira's code", "the code of Mira", "the code Mira
uses"), predicates ("is", "reads", "is set to"; "has", "holds", "was given"), question
frames ("What is ...?", "Which ... does ...?", "Give ...") and optional lead-ins and
tails ("By the way, ...", "..., as far as we know."). It is kept apart from the held-out
templates by one rule (``_apart``, tested): a generated template is never equal to a
held-out one, neither contains the other (case, spacing and punctuation aside), the two
are at least ``MIN_EDITS`` word edits apart, and it uses none of ``HELD_OUT_MARKERS``:
the words that make each held-out template a paraphrase ("working", "owns", "managed",
"tell", a leading "Name") occur in no training template of any kind. A colon is not one of
them: "key: value" is a format documents use, so generated facts include some ("Mira's
code: 4821.", "Mira - pet: mokka."); the held-out "Code of {name}: {value}." stays
unseen and at least ``MIN_EDITS`` away from each of them.
Training worlds use them with ``retrieval.make_world(..., generated=True)``; the shipped
``tiny-trained`` preset met them after the first 45% of its steps (a curriculum;
docs/fidelity.md says why).
"""

from __future__ import annotations

import functools
import re
from itertools import product

__all__ = ["FACTS", "HELD_OUT_MARKERS", "MIN_EDITS", "QUESTIONS", "edits", "held_out_templates", "training_facts",
           "training_questions", "words"]

# per attribute, fact templates: the last one is held out of training
FACTS = {
    "code": ("The code of {name} is {value}.", "{name}'s code is {value}.", "{name} has the code {value}.",
             "The code for {name} is {value}.", "{name} uses the code {value}.", "Code of {name}: {value}."),
    "city": ("{name} works in {value}.", "{name} has an office in {value}.", "The office of {name} is in {value}.",
             "{name} works in the city of {value}.", "The city where {name} works is {value}.",
             "{name} is working in {value}."),
    "pet": ("{name} has a pet {value}.", "{name} keeps a pet called {value}.", "The pet of {name} is a {value}.",
            "{name} has a {value} as a pet.", "The pet that {name} keeps is a {value}.", "{name} owns a pet {value}."),
    "manager": ("The manager of {name} is {value}.", "{name} reports to {value}.", "{name}'s manager is {value}.",
                "The boss of {name} is {value}.", "{name} works under {value}.", "{name} is managed by {value}."),
}
# per attribute, single-document questions (about {name}) and two-document ones (about
# {name}'s manager); the last of each is held out of training
QUESTIONS = {
    "single": {
        "code": ("What is the code of {name}?", "What code does {name} have?", "Which code belongs to {name}?",
                 "What is {name}'s code?", "Give the code of {name}.", "Tell me the code of {name}."),
        "city": ("Where does {name} work?", "In which city does {name} work?", "What city does {name} work in?",
                 "Where is the office of {name}?", "Which city does {name} work in?", "Which city is {name} working in?"),
        "pet": ("What pet does {name} have?", "Which pet does {name} keep?", "What is the pet of {name}?",
                "What is {name}'s pet?", "Which pet belongs to {name}?", "Name the pet of {name}."),
        "manager": ("Who is the manager of {name}?", "Who manages {name}?", "To whom does {name} report?",
                    "Who is the boss of {name}?", "Whom does {name} work under?", "Who is {name}'s manager?"),
    },
    "two": {
        "code": ("What is the code of the manager of {name}?", "What code does the manager of {name} have?",
                 "What is the code of the boss of {name}?", "Give the code of the manager of {name}.",
                 "Tell me the code of {name}'s manager."),
        "city": ("Where does the manager of {name} work?", "In which city does the manager of {name} work?",
                 "Where does the boss of {name} work?", "What city does the manager of {name} work in?",
                 "Which city is {name}'s manager working in?"),
        "pet": ("What pet does the manager of {name} have?", "Which pet does the manager of {name} keep?",
                "What pet does the boss of {name} have?", "What is the pet of the manager of {name}?",
                "Name the pet of {name}'s manager."),
    },
}
MIN_EDITS = 2
HELD_OUT_MARKERS = re.compile(r"\bworking\b|\bowns?\b|\bmanaged\b|\btell\b|^name\b")

# -- the grammar of the generated training paraphrases ------------------------------------------
# {n}: the person (a name, or in a two-document question a phrase about the manager)
_NOUN = {"code": ("code", "access code", "personal code", "code number"),
         "city": ("office", "workplace", "place of work"),
         "pet": ("pet",),
         "manager": ("manager", "boss", "supervisor", "team lead")}
_OF = ("{n}'s {x}", "the {x} of {n}", "the {x} for {n}")
_COLON = ("{n}'s {x}: {value}", "{n} - {x}: {value}", "{x} on file for {n}: {value}")  # "key: value" facts
_FACT_FRAMES = {
    "code": [f"{s} {p} {{value}}" for s in _OF + ("the {x} that {n} uses", "the {x} assigned to {n}")
             for p in ("is", "reads", "is set to", "is listed as", "is now")]
    + [f"{{n}} {v} {a} {{value}}" for v in ("has", "holds", "was given", "got", "was assigned", "goes by", "keeps")
       for a in ("the code", "the access code", "code", "the personal code", "the code number")] + list(_COLON),
    "city": [f"{s} is in {{value}}" for s in _OF + ("the {x} that {n} goes to",)]
    + [f"{{n}} {v} {{value}}" for v in ("works in", "works at an office in", "has a job in", "is currently based in",
                                        "goes to work in", "works out of", "holds a job in", "now works in",
                                        "lives and works in", "took a job in", "has a desk in",
                                        "commutes to work in", "is employed at an office in")]
    + [f"the city {{n}} works in is {{value}}", "the city of {n}'s office is {value}", *_COLON],
    "pet": [f"{s} is a {{value}}" for s in _OF[:2] + ("the pet {n} keeps", "the animal that {n} keeps",
                                                      "the pet living with {n}", "the animal {n} looks after")]
    + [f"{{n}} {v} {a} {{value}}" for v in ("has", "keeps", "looks after", "lives with", "takes care of",
                                             "adopted", "brought home")
       for a in ("a pet", "a pet called", "a pet named", "one pet, a")]
    + ["{n} has a {value} at home", "{n} keeps a {value} as a pet", "at home {n} has a {value}", *_COLON],
    "manager": [f"{s} is {{value}}" for s in _OF[:2] + ("the person {n} reports to", "the one who leads {n}")]
    + [f"{{n}} {v} {{value}}" for v in ("reports to", "works for", "answers to", "works under", "reports directly to",
                                         "is on the team of", "is in the team led by", "has the boss",
                                         "takes orders from", "works on the team of")]
    + ["{n} has {value} as a manager", "{n} has {value} as a boss", "{n}'s team is led by {value}", *_COLON],
}
_FACT_LEADS = ("", "", "", "", "also, ", "by the way, ", "for the record, ", "as it happens, ", "note that ",
               "these days ", "in short, ")
_FACT_TAILS = ("", "", "", "", ", as far as we know", ", as noted", " these days", ", it seems", " for now")
_ASK_THING = {"code": ("What is {t}?", "Which {x} does {n} have?", "What {x} does {n} hold?", "Give {t}.",
                       "What {x} was {n} given?", "Please give {t}.", "I need {t}.", "Do you know {t}?",
                       "What does {t} read?", "Which number is {t}?", "Can you give {t}?", "Say {t}."),
              "city": ("Where does {n} work?", "Where is {n} based?", "In what city does {n} work?",
                       "Where is {t}?", "What city is {t} in?", "In which city is {t}?", "Where can {n} be found at work?",
                       "Which city does {n} have a job in?", "Where is {n} employed?", "Which city is {n} based in?",
                       "Do you know where {n} works?", "In which town does {n} work?"),
              "pet": ("What is {t}?", "Which pet does {n} have?", "What pet does {n} look after?",
                      "What animal does {n} keep?", "Which animal does {n} have as a pet?", "Give {t}.",
                      "What kind of pet does {n} have?", "Do you know {t}?", "What is the animal of {n}?",
                      "Please give {t}.", "What does {n} keep as a pet?", "Say {t}."),
              "manager": ("Who is {t}?", "Who does {n} report to?", "Who does {n} work for?", "Give {t}.",
                          "Whom does {n} answer to?", "Who leads {n}?", "Who does {n} answer to?",
                          "Do you know {t}?", "Who is in charge of {n}?", "Please give {t}.", "Say {t}.")}
_QUESTION_LEADS = ("", "", "", "", "Quick question. ", "One more question. ", "Now, ", "And ", "Also, ")
_MANAGER_OF = ("the manager of {name}", "{name}'s manager", "the boss of {name}", "{name}'s boss",
               "the supervisor of {name}", "the person {name} reports to")


def words(template: str) -> list[str]:
    """A template's words for comparison: lower case, placeholders and punctuation kept."""
    return re.findall(r"\{\w+\}|[a-z0-9]+|[^\sa-z0-9]", template.lower())


def edits(a: list[str], b: list[str]) -> int:
    """Levenshtein distance between two word lists (substitutions, insertions, deletions)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def held_out_templates() -> list[str]:
    """Every hand-written template never used in training (the last of each tuple)."""
    return [t[-1] for t in FACTS.values()] + [t[-1] for kind in QUESTIONS.values() for t in kind.values()]


@functools.cache
def _held_out_words() -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(words(t)) for t in held_out_templates())


def _apart(template: str, body: str | None = None) -> bool:
    """The module's rule: ``template`` is far from every held-out template (module docstring);
    the edit distance is taken on its ``body`` (without lead-in and tail) when given."""
    mine, core = words(template), words(body or template)
    joined = " ".join(mine)
    for held in _held_out_words():
        theirs = " ".join(held)
        if joined in theirs or theirs in joined:
            return False
        if abs(len(core) - len(held)) < MIN_EDITS and edits(core, list(held)) < MIN_EDITS:
            return False
    return not HELD_OUT_MARKERS.search(joined)


def _sentence(lead: str, body: str, tail: str, end: str) -> str:
    if lead and not lead.endswith(". "):
        body = body[0].lower() + body[1:]
    text = lead + body + tail + end
    return text[0].upper() + text[1:]


def _expand(frame: str, attribute: str, who: str) -> set[str]:
    return {frame.replace("{x}", x).replace("{n}", who) for x in _NOUN[attribute]}


@functools.cache
def training_facts() -> dict[str, tuple[str, ...]]:
    """Per attribute, the generated fact templates (``{name}``, ``{value}``), sorted."""
    out = {}
    for attribute, frames in _FACT_FRAMES.items():
        bodies = {b for f in frames for b in _expand(f, attribute, "{name}")}
        bodies = {b for b in bodies if _apart(b + ".")}
        out[attribute] = tuple(sorted({t for b, lead, tail in product(bodies, _FACT_LEADS, _FACT_TAILS)
                                       if not (tail and tail.strip() in lead)
                                       and _apart(t := _sentence(lead, b, tail, "."), b + ".")}))
    return out


@functools.cache
def training_questions() -> dict[str, dict[str, tuple[str, ...]]]:
    """Per kind and attribute, the generated question templates (``{name}``), sorted; a
    two-document question is a single one about a phrase for the manager of ``{name}``."""
    out: dict[str, dict[str, tuple[str, ...]]] = {"single": {}, "two": {}}
    for attribute, frames in _ASK_THING.items():
        for kind, people in (("single", ("{name}",)), ("two", _MANAGER_OF)):
            if kind == "two" and attribute == "manager":
                continue
            bodies = set()
            for frame, who in product(frames, people):
                forms = _OF[1:2] if who.startswith("the ") else _OF[:2]  # no "the manager of Mira's code"
                things = {s.replace("{n}", who) for s in forms} | ({f"the {{x}} that {who} uses"}
                                                                   if attribute == "code" else set())
                for thing in things:
                    bodies |= _expand(frame.replace("{t}", thing), attribute, who)
            bodies = {b for b in bodies if _apart(b)}
            out[kind][attribute] = tuple(sorted({t for b, lead in product(bodies, _QUESTION_LEADS)
                                                 if _apart(t := _sentence(lead, b, "", ""), b)}))
    return out
