"""Hypothesis strategies shared by the tests (keep them all here)."""

from __future__ import annotations

import json

import attrs
from hypothesis import strategies as st

import spanctx
from spanctx.core.placement import GroupLayout, Repair
from spanctx.core.plan import PlanSegment

# -- core: span trees, planner inputs, store operations -----------------------------------

TOKEN = st.integers(min_value=0, max_value=255)  # byte tokens: valid for every tiny preset


def span_ids(max_len: int = 12):
    return st.lists(TOKEN, min_size=1, max_size=max_len).map(tuple)


@st.composite
def span_trees(draw, max_nodes: int = 7, max_len: int = 12):
    """A random tree of token-id spans; returns every node's Context (root excluded).

    Each new node hangs under a random earlier node (or the root), so siblings share
    ancestors and paths share prefixes of every length.
    """
    root = spanctx.Context()
    nodes = [root]
    for _ in range(draw(st.integers(1, max_nodes))):
        parent = draw(st.sampled_from(nodes))
        nodes.append(parent.append(draw(span_ids(max_len))))
    return nodes[1:]


@st.composite
def planner_inputs(draw, max_segments: int = 8):
    """(segments, stored key set) for the pure planner."""
    n = draw(st.integers(1, max_segments))
    lengths = draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    segments = [spanctx.PlanSegment(i.to_bytes(16, "little"), length) for i, length in enumerate(lengths)]
    stored = {seg.key for seg in segments if draw(st.booleans())}
    return segments, stored


# -- tools (tests/test_tools.py) ---------------------------------------------------------


def get_weather(city: str, days: int | None = None) -> dict:
    """Weather forecast for a city.

    Args:
        city: The city's name.
        days: How many days ahead (today when absent).
    """
    return {"city": city, "days": days, "forecast": "sunny"}


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first term.
        b: The second term.
    """
    return a + b


def now() -> str:
    """The current time."""
    return "12:00"


TOOL_FUNCTIONS = (get_weather, add, now)

_json_ints = st.integers(min_value=-(10**6), max_value=10**6)
_texts = st.text(st.characters(codec="utf-8", exclude_characters="<>"), max_size=12)

# valid arguments per tool, as (name, arguments)
valid_calls = st.one_of(
    st.tuples(st.just("get_weather"),
              st.fixed_dictionaries({"city": _texts}, optional={"days": st.none() | st.integers(0, 30)})),
    st.tuples(st.just("add"), st.fixed_dictionaries({"a": _json_ints, "b": _json_ints})),
    st.tuples(st.just("now"), st.just({})),
)


@st.composite
def call_json(draw, call: tuple[str, dict]) -> str:
    """One call as the JSON a model could write: key order, alias, string-encoded
    arguments and indentation vary."""
    name, arguments = call
    key = draw(st.sampled_from(["arguments", "parameters"]))
    value = json.dumps(arguments) if draw(st.booleans()) else arguments
    body = {"name": name, key: value} if draw(st.booleans()) else {key: value, "name": name}
    return json.dumps(body, indent=draw(st.sampled_from([None, 2])), ensure_ascii=draw(st.booleans()))


@st.composite
def tagged_replies(draw) -> tuple[str, str, list[tuple[str, dict]]]:
    """``(text, content, calls)``: prose around ``<tool_call>`` blocks holding ``calls``."""
    calls = draw(st.lists(valid_calls, max_size=3))
    prose = [draw(_texts) for _ in range(len(calls) + 1)]
    pieces = [prose[0]]
    for call, after in zip(calls, prose[1:]):
        pad = draw(st.sampled_from(["", "\n", " "]))
        pieces += [f"<tool_call>{pad}{draw(call_json(call))}{pad}</tool_call>", after]
    return "".join(pieces), "".join(prose).strip(), calls


noisy_replies = st.lists(
    st.sampled_from(['<tool_call>', '</tool_call>', '{', '}', '[', ']', ',', ':', '"name"', '"arguments"',
                     '"parameters"', '"get_weather"', '"add"', '"now"', '"city"', '"a"', '"b"', '1', '"x"',
                     'null', 'true', ' ', '\n'])
    | _texts,
    max_size=24,
).map("".join)

# -- JSON output (tests/test_structured.py) ---------------------------------------------
# Schemas whose values have a bounded length in compact JSON, so that a random model
# under the grammar mask must finish within a few dozen tokens.

_leaf_schemas = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.integers(0, 999).map(lambda hi: {"type": "integer", "minimum": 0, "maximum": hi}),
    st.lists(st.sampled_from(["red", "green", "blue", "x"]), min_size=1, max_size=3, unique=True)
    .map(lambda words: {"enum": words}),
    st.just({"type": "string", "pattern": "^[a-z]{1,4}$"}),
    st.integers(0, 2).map(lambda n: {"type": "array", "items": {"type": "boolean"}, "maxItems": n}),
)
_property_names = st.text(st.sampled_from("abcxyz"), min_size=1, max_size=3)


def _objects(values) -> st.SearchStrategy[dict]:
    @st.composite
    def build(draw) -> dict:
        props = draw(st.dictionaries(_property_names, values, min_size=1, max_size=3))
        required = [name for name in props if draw(st.booleans())]
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}

    return build()


bounded_json_schemas = _objects(_leaf_schemas | _objects(_leaf_schemas))


# -- parallel spans (issue 3) ------------------------------------------------------------


@attrs.frozen
class PlacementCase:
    """A prompt layout for the placement planner, with what the store holds."""

    segments: tuple[PlanSegment, ...]
    groups: tuple[GroupLayout, ...]
    stored: frozenset[bytes]
    movable: bool
    repair: Repair


def repairs() -> st.SearchStrategy[Repair]:
    return st.one_of(
        st.sampled_from([Repair("none"), Repair("full")]),
        st.integers(1, 6).map(lambda k: Repair("head", k=k)),
        st.sampled_from([0.1, 0.25, 0.5, 1.0]).map(lambda r: Repair("blend", fraction=r)),
    )


@st.composite
def placement_cases(draw, max_nodes: int = 6) -> PlacementCase:
    """Random prompts of dependent spans and parallel groups (members may repeat), with
    an optional BOS, random anchors, a random stored subset of all keys, and a random
    rope (movable or not) and repair mode."""
    counter = iter(range(1 << 30))

    def new_key() -> bytes:
        return next(counter).to_bytes(16, "little")

    segments: list[PlanSegment] = []
    groups: list[GroupLayout] = []
    ends = [0]  # prompt tokens after the first d nodes
    if draw(st.booleans()):
        segments.append(PlanSegment(new_key(), 1))
        ends = [1]
    for _ in range(draw(st.integers(1, max_nodes))):
        if draw(st.booleans()):
            segments.append(PlanSegment(new_key(), draw(st.integers(1, 5))))
            ends.append(ends[-1] + segments[-1].num_tokens)
            continue
        anchor_end = ends[draw(st.integers(0, len(ends) - 1))]
        first = len(segments)
        for _ in range(draw(st.integers(1, 4))):
            if len(segments) > first and draw(st.integers(0, 4)) == 0:  # a repeated member
                segments.append(draw(st.sampled_from(segments[first:])))
            else:
                segments.append(PlanSegment(new_key(), draw(st.integers(1, 5))))
        groups.append(GroupLayout(new_key(), first, len(segments), anchor_end))
        ends.append(ends[-1] + sum(s.num_tokens for s in segments[first:]))
    all_keys = sorted({s.key for s in segments} | {g.key for g in groups})
    stored = draw(st.sets(st.sampled_from(all_keys))) if all_keys else set()
    return PlacementCase(tuple(segments), tuple(groups), frozenset(stored), draw(st.booleans()), draw(repairs()))


@attrs.frozen
class ParallelPromptSpec:
    """A prompt as nodes: ``("span", ids)`` or ``("group", members, anchor_depth)``, where
    ``anchor_depth`` counts the nodes before the group that its members attend to."""

    nodes: tuple[tuple, ...]


def token_lists(max_len: int = 6) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(st.integers(0, 255), min_size=1, max_size=max_len).map(tuple)


@st.composite
def parallel_prompt_specs(draw, max_nodes: int = 3) -> ParallelPromptSpec:
    """Random prompts of byte-token spans and parallel groups (at least one group), each
    group anchored at a random prefix of the path."""
    nodes: list[tuple] = []
    count = draw(st.integers(1, max_nodes))
    group_at = draw(st.integers(0, count - 1))
    for n in range(count):
        if n == group_at or draw(st.booleans()):
            members = tuple(draw(st.lists(token_lists(), min_size=1, max_size=3)))
            nodes.append(("group", members, draw(st.integers(0, n))))
        else:
            nodes.append(("span", draw(token_lists())))
    return ParallelPromptSpec(tuple(nodes))


# -- chat (issue 5): random conversations ---------------------------------------------------

ROLES = ("system", "user", "assistant", "tool")
# printable text, newlines, non-ASCII letters and the ChatML markers themselves
MESSAGE_TEXT = st.text(
    st.one_of(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), st.sampled_from("\n\t")),
    max_size=24,
) | st.sampled_from(["<|im_start|>", "<|im_end|>\n", "assistant\n", ""])


def chat_messages(max_messages: int = 6):
    """A list of message dicts with random roles and contents (roles need not alternate)."""
    message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": MESSAGE_TEXT})
    return st.lists(message, min_size=1, max_size=max_messages)


# -- the store's index (tests/test_index.py) -------------------------------------------------

INDEX_KEYS = tuple(bytes([i]) for i in range(6))  # few keys: hits, re-admits and locks collide
INDEX_POLICIES = ("lru", "largest-first")


@attrs.frozen
class IndexProgram:
    """A byte budget and a sequence of index operations, each a tuple:
    ``("admit", key, nbytes)``, ``("touch" | "lock" | "unlock" | "remove", key)``,
    ``("shrink", nbytes)`` or ``("policy", name)`` (one of ``INDEX_POLICIES``). Operations may be invalid (unlock
    without lock, lock of a missing key): the index must refuse them as its model does."""

    budget: int
    ops: tuple[tuple, ...]


# operation kinds, weighted: admits most, policy swaps and budget cuts rarely
_INDEX_OP_KINDS = ("admit",) * 4 + ("touch", "lock", "unlock", "remove") * 2 + ("policy", "shrink")


@st.composite
def index_programs(draw, min_ops: int = 20, max_ops: int = 80) -> IndexProgram:
    """Random index traffic. Most unlocks name a key locked earlier in the program (so
    lock/unlock pairs, nested ones included, are common); the rest name any key."""
    ops: list[tuple] = []
    locked: list[bytes] = []  # keys of the lock ops not yet matched by an unlock op
    for kind in draw(st.lists(st.sampled_from(_INDEX_OP_KINDS), min_size=min_ops, max_size=max_ops)):
        if kind == "policy":
            ops.append((kind, draw(st.sampled_from(INDEX_POLICIES))))
        elif kind == "admit":
            ops.append((kind, draw(st.sampled_from(INDEX_KEYS)), draw(st.integers(0, 12))))
        elif kind == "shrink":
            ops.append((kind, draw(st.integers(0, 8))))
        elif kind == "unlock" and locked and draw(st.integers(0, 3)):
            ops.append((kind, locked.pop(draw(st.integers(0, len(locked) - 1)))))
        else:
            ops.append((kind, draw(st.sampled_from(INDEX_KEYS))))
            if kind == "lock":
                locked.append(ops[-1][1])
    return IndexProgram(draw(st.integers(0, 40)), tuple(ops))


# -- model namespaces (tests/test_keys.py) ---------------------------------------------------


def element_edits() -> st.SearchStrategy[tuple[int, int, int]]:
    """``(tensor pick, element pick, XOR mask)``: one element's 32 bits flipped under a
    non-zero int32 mask (negative masks flip the sign bit); the test reduces the picks
    modulo its model's tensor and element counts."""
    mask = st.integers(-(1 << 31), (1 << 31) - 1).filter(bool)
    return st.tuples(st.integers(min_value=0), st.integers(min_value=0), mask)
