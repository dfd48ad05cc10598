"""Hypothesis strategies shared by the tests (keep them all here)."""

from __future__ import annotations

from hypothesis import strategies as st

import spanctx

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
