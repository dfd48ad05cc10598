"""The ``head:k+blend:r`` repair (EPIC's heads and CacheBlend's selection together):
its plan, its counts, and its limit (every token recomputed) against sequential prefill."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import tiny_runtime

from spanctx import Context
from spanctx.core.placement import BlendTokens, GroupLayout, RecomputeTokens, Repair, plan_placement
from spanctx.core.plan import PlanSegment

SYSTEM = "You are terse. "
DOCS = ("Doc A: the sky is blue. ", "Doc B: grass is green! ", "Doc C: snow is white? ")
unrepaired_tiny = functools.partial(tiny_runtime, repair="none")


def _rag(order=(0, 1, 2)) -> Context:
    return Context().append(SYSTEM).parallel(*(DOCS[i] for i in order)).append("Question?")


def test_the_spelling_round_trips_and_bad_ones_are_refused():
    mode = Repair.parse("head:8+blend:0.05")
    assert (mode.kind, mode.k, mode.fraction, str(mode)) == ("head+blend", 8, 0.05, "head:8+blend:0.05")
    for bad in ("head:0+blend:0.1", "head:8+blend:0", "head:8+", "blend:0.1+head:8"):
        with pytest.raises(ValueError, match="repair"):
            Repair.parse(bad)


def test_the_plan_forces_the_heads_and_offers_the_rest_to_blend():
    # BOS+system (4 tokens) then a group of three members of 10 tokens each, then a question
    segments = [PlanSegment(b"s", 4), *(PlanSegment(bytes([m]), 10) for m in range(3)),
                PlanSegment(b"q", 3)]
    group = GroupLayout(b"g", 1, 4, 4)
    plan = plan_placement(segments, [group], lambda key: False, True, Repair.parse("head:3+blend:0.25"))
    fix = plan.steps[-1].repair
    assert isinstance(fix, BlendTokens)
    assert fix.forced == (14, 15, 16, 24, 25, 26)  # the moved members' first three tokens
    assert fix.candidates == (*range(17, 24), *range(27, 34)) and fix.count == 4  # ceil(0.25 x 14)
    assert plan.recomputed_tokens == 6 + 4 and plan.checked_tokens == 14
    short = plan_placement(segments, [group], lambda key: False, True, Repair.parse("head:10+blend:0.5"))
    assert short.steps[-1].repair == RecomputeTokens((*range(14, 24), *range(24, 34)))  # nothing left to check


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_counts_and_its_limit_equal_sequential_prefill(arch):
    rt = unrepaired_tiny(arch)
    lengths = [len(rt.tokenizer(d, add_special_tokens=False)["input_ids"]) for d in DOCS]
    result = rt.generate(_rag((1, 0, 2)), 4, repair="head:2+blend:0.5")
    rest = lengths[0] - 2 + lengths[2] - 2  # docs A and C moved; doc B sits right after the anchor
    assert result.stats.parallel.checked_tokens == rest
    assert result.stats.recomputed_tokens == 4 + -(-rest // 2)
    ctx = _rag((2, 0, 1))
    torch.testing.assert_close(rt.next_token_logits(ctx, repair="head:2+blend:1"),
                               rt.next_token_logits(ctx, reuse=False), atol=1e-4, rtol=0)
    assert rt.generate(ctx, 4, repair="head:2+blend:1").token_ids == rt.generate(ctx, 4, reuse=False).token_ids
