"""Parallel spans end to end: against an HF-primitives reference, against sequential
prefill (repair="full"), store hits on order swaps, fallbacks, repair accounting."""

from __future__ import annotations

import functools
import types

import pytest
import torch
from conftest import tiny_runtime
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rope_models import ROPE_MODELS, rope_runtime
from strategies import ParallelPromptSpec, parallel_prompt_specs
from transformers import DynamicCache

import spanctx
from spanctx import Context
from spanctx.engine import EagerExecutor
from spanctx.engine.masks import in_place_allowed
from spanctx.hf import cache_kwargs

ATOL = 1e-4

# these tests are about placement itself: repair only where a test names it
unrepaired_tiny = functools.partial(tiny_runtime, repair="none")
unrepaired_rope = functools.partial(rope_runtime, repair="none")
SYSTEM = "You are terse. "
DOCS = ("Doc A: the sky is blue. ", "Doc B: grass is green! ", "Doc C: snow is white? ")


# -- an independent reference: HF forwards with explicit position_ids, span by span -----


def _forward(model, cache, ids: list[int], start: int) -> torch.Tensor:
    positions = torch.arange(start, start + len(ids))[None]
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), position_ids=positions, use_cache=True, **cache_kwargs(model, cache))
    return out.logits[0, -1]


def _first_tokens(cache, n: int) -> DynamicCache:
    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone(), i)
    return out


def _node_len(node) -> int:
    return len(node[1]) if node[0] == "span" else sum(len(m) for m in node[1])


def _reference_build(model, nodes, shift: int, movable: bool):
    """(cache, last logits) of ``nodes`` laid out from position ``shift``, span by span.

    A group member on a model whose keys move is prefilled right after its anchor, the
    two together placed so that the member lands at its own positions (what moving a
    stored span reproduces); otherwise right after the anchor's KV as it sits in the
    prompt, at the member's positions (what recomputing at its place gives).
    """
    cache, logits, ends = DynamicCache(), None, [0]
    for node in nodes:
        if node[0] == "span":
            logits = _forward(model, cache, list(node[1]), shift + ends[-1])
        else:
            _, members, depth = node
            anchor_end, start = ends[depth], ends[-1]
            for member in members:
                if movable:
                    sub, _ = _reference_build(model, nodes[:depth], shift + start - anchor_end, movable)
                else:
                    sub = _first_tokens(cache, anchor_end)
                _forward(model, sub, list(member), shift + start)
                for i, layer in enumerate(sub.layers):
                    cache.update(layer.keys[:, :, anchor_end:], layer.values[:, :, anchor_end:], i)
                start += len(member)
        ends.append(ends[-1] + _node_len(node))
    return cache, logits


def reference_logits(model, nodes, movable: bool) -> torch.Tensor:
    """Next-token logits of a parallel prompt (BOS included in ``nodes``). When it ends with
    a group, the group's last token is computed like a following span (full attention),
    as the runtime does."""
    nodes = list(nodes)
    if nodes[-1][0] == "group":
        _, members, depth = nodes[-1]
        *rest, last = members
        nodes[-1:] = [("group", (*rest, last[:-1]) if len(last) > 1 else tuple(rest), depth), ("span", last[-1:])]
        if not nodes[-2][1]:
            del nodes[-2]
    return _reference_build(model, nodes, 0, movable)[1]


def _with_bos(spec: ParallelPromptSpec, bos: int) -> list[tuple]:
    shifted = [(n[0], n[1], n[2] + 1) if n[0] == "group" else n for n in spec.nodes]
    return [("span", (bos,)), *shifted]


def _context(spec: ParallelPromptSpec) -> Context:
    path = [Context()]
    for node in spec.nodes:
        if node[0] == "span":
            path.append(path[-1].append(list(node[1])))
        else:
            _, members, depth = node
            path.append(path[-1].parallel(*(list(m) for m in members), anchor=path[depth]))
    return path[-1]


def _reversed_groups(spec: ParallelPromptSpec) -> ParallelPromptSpec:
    return ParallelPromptSpec(tuple((n[0], n[1][::-1], n[2]) if n[0] == "group" else n for n in spec.nodes))


# every rope kind, and sliding windows (16) that the test prompts cross
REFERENCE_KINDS = [*ROPE_MODELS, "mistral", "gemma2"]


@given(kind=st.sampled_from(REFERENCE_KINDS), spec=parallel_prompt_specs())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_logits_match_the_hf_reference_and_full_repair_matches_sequential_prefill(kind, spec):
    rt = unrepaired_rope(kind) if kind in ROPE_MODELS else unrepaired_tiny(kind)
    model, tokenizer = rt.model, rt.tokenizer
    movable = ROPE_MODELS[kind][2] if kind in ROPE_MODELS else True
    for prompt in (spec, _reversed_groups(spec)):  # the second one reuses what the first stored
        expected = reference_logits(model, _with_bos(prompt, tokenizer.bos_token_id), movable)
        torch.testing.assert_close(rt.next_token_logits(_context(prompt)), expected, atol=ATOL, rtol=0)
    ctx = _context(spec)
    torch.testing.assert_close(rt.next_token_logits(ctx, repair="full"), rt.next_token_logits(ctx, reuse=False),
                               atol=ATOL, rtol=0)


# -- repair="full" is sequential prefill; one span after its anchor is exact ------------------


def _rag(order=(0, 1, 2), question: str | None = "Question?", docs=DOCS) -> Context:
    ctx = Context().append(SYSTEM).parallel(*(docs[i] for i in order))
    return ctx.append(question) if question else ctx


def _same_as_sequential(rt, ctx: Context, repair: str) -> None:
    torch.testing.assert_close(rt.next_token_logits(ctx, repair=repair), rt.next_token_logits(ctx, reuse=False),
                               atol=ATOL, rtol=0)
    parallel = rt.generate(ctx, 4, repair=repair)
    assert parallel.token_ids == rt.generate(ctx, 4, reuse=False).token_ids


def test_full_repair_equals_sequential_prefill(arch):
    rt = unrepaired_tiny(arch)
    for ctx in (_rag((2, 0, 1)), _rag((1, 2), question=None)):
        _same_as_sequential(rt, ctx, "full")


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_blend_of_every_token_equals_sequential_prefill(arch):
    _same_as_sequential(unrepaired_tiny(arch), _rag((2, 0, 1)), "blend:1")


def test_one_parallel_span_after_its_anchor_is_exact_dependent_reuse(arch):
    rt = unrepaired_tiny(arch)
    base = Context().append(SYSTEM)
    parallel, dependent = base.parallel(DOCS[0]).append("Q?"), base.append(DOCS[0]).append("Q?")
    assert rt.token_ids(parallel) == rt.token_ids(dependent)
    torch.testing.assert_close(rt.next_token_logits(parallel), rt.next_token_logits(dependent, reuse=False),
                               atol=ATOL, rtol=0)
    result = rt.generate(parallel, 6, repair="full")
    assert result.token_ids == rt.generate(dependent, 6).token_ids
    assert result.stats.recomputed_tokens == 0 and result.stats.parallel.moved_tokens == 0


# -- the store: order swaps, shared system prompts, repaired groups ------------------------------


def test_an_order_swap_computes_only_the_new_question():
    rt = unrepaired_tiny("llama")
    rt.generate(_rag(question="First question?"), 4)
    hits = rt.store.stats.hits
    second = rt.generate(_rag((2, 0, 1), question="Second?"), 4)
    question = len(rt.tokenizer("Second?", add_special_tokens=False)["input_ids"])
    assert second.stats.computed_tokens == question
    assert second.stats.cached_tokens == second.stats.prompt_tokens - question
    assert rt.store.stats.hits - hits == 5  # BOS, system, three documents
    moved = sum(len(rt.tokenizer(DOCS[i], add_special_tokens=False)["input_ids"]) for i in (0, 1))
    assert second.stats.parallel.moved_tokens == moved  # doc C sits right after the anchor


def test_head_repair_recomputes_the_heads_of_moved_documents():
    rt = unrepaired_tiny("llama")
    rt.next_token_logits(_rag())
    lengths = [len(rt.tokenizer(d, add_special_tokens=False)["input_ids"]) for d in DOCS]
    result = rt.generate(_rag((1, 0, 2), question="Other?"), 4, repair="head:5")
    assert result.stats.recomputed_tokens == 5 + 5  # docs A and C; doc B is exact
    assert result.stats.computed_tokens == len(rt.tokenizer("Other?", add_special_tokens=False)["input_ids"])
    _same_as_sequential(rt, _rag((1, 0, 2)), f"head:{max(lengths)}")  # heads covering everything: full


def test_blend_recomputes_the_asked_fraction():
    rt = unrepaired_tiny("qwen2")
    result = rt.generate(_rag(), 4, repair="blend:0.25")
    moved = sum(len(rt.tokenizer(DOCS[i], add_special_tokens=False)["input_ids"]) for i in (1, 2))
    assert result.stats.parallel.checked_tokens == moved
    assert result.stats.recomputed_tokens == -(-moved // 4)


def test_a_repaired_group_is_stored_and_reused_by_the_next_question():
    rt = unrepaired_tiny("llama")
    first = rt.generate(_rag(question="One?"), 4, repair="head:3")
    second = rt.generate(_rag(question="Two?"), 4, repair="head:3")
    assert first.stats.recomputed_tokens == 6 and second.stats.recomputed_tokens == 0
    assert second.stats.computed_tokens == len(rt.tokenizer("Two?", add_special_tokens=False)["input_ids"])
    fresh = unrepaired_tiny("llama")
    torch.testing.assert_close(rt.next_token_logits(_rag(question="Two?"), repair="head:3"),
                               fresh.next_token_logits(_rag(question="Two?"), repair="head:3"), atol=ATOL, rtol=0)


def test_position_independent_documents_are_shared_across_system_prompts():
    rt = unrepaired_tiny("llama")
    model, tokenizer = rt.model, rt.tokenizer
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in DOCS]
    for system in ("You are terse. ", "Answer in French, please. "):
        ctx = Context().append(system).parallel(DOCS[0], DOCS[1], anchor="root").append("Q?")
        result = rt.generate(ctx, 3)
        nodes = [("span", (tokenizer.bos_token_id,)), ("span", tuple(tokenizer(system, add_special_tokens=False)
                                                                      ["input_ids"])),
                 ("group", (tuple(ids[0]), tuple(ids[1])), 1), ("span", tuple(tokenizer("Q?")["input_ids"][1:]))]
        torch.testing.assert_close(rt.next_token_logits(ctx), reference_logits(model, nodes, True), atol=ATOL, rtol=0)
    assert result.stats.computed_tokens == len(nodes[1][1]) + len(nodes[3][1])  # the documents were cached
    assert result.stats.parallel.moved_tokens == len(ids[0]) + len(ids[1])


@pytest.mark.parametrize("kind", ["absolute", "dynamic"])
def test_models_whose_keys_cannot_move_recompute_at_the_place_and_say_so(kind):
    rt = unrepaired_rope(kind)
    rt.next_token_logits(_rag())  # stores doc A, which sits right after the anchor
    result = rt.generate(_rag((0, 2, 1)), 3)
    moved_docs = sum(len(rt.tokenizer(DOCS[i], add_special_tokens=False)["input_ids"]) for i in (2, 1))
    assert result.stats.parallel.fallback_tokens == moved_docs
    assert result.stats.parallel.moved_tokens == 0 and result.stats.parallel.fallback_reason
    assert result.stats.computed_tokens == moved_docs + len(rt.tokenizer("Question?")["input_ids"]) - 1


# -- API ------------------------------------------------------------------------------------------


def test_the_runtime_default_repair_and_per_call_override():
    rt = unrepaired_tiny("llama", repair="full")
    torch.testing.assert_close(rt.next_token_logits(_rag()), rt.next_token_logits(_rag(), reuse=False),
                               atol=ATOL, rtol=0)
    assert rt.generate(_rag((1, 0, 2)), 2, repair="none").stats.parallel.repair == "none"


def test_stream_yields_what_generate_returns():
    rt = unrepaired_tiny("llama")
    ctx = _rag((2, 1, 0))
    assert "".join(rt.stream(ctx, 8, repair="head:2")) == rt.generate(ctx, 8, repair="head:2").text


def test_fidelity_of_full_repair_is_perfect_and_of_none_is_measured():
    rt = unrepaired_tiny("llama")
    full = spanctx.fidelity(rt, _rag(), repair="full", greedy_tokens=4)
    assert full.kl < 1e-8 and full.top1_agrees and full.greedy_agreement == 1.0 and full.repair == "full"
    none = spanctx.fidelity(rt, _rag(), repair="none", greedy_tokens=4)
    assert none.kl > 1e-6 and 0.0 <= none.greedy_agreement <= 1.0 and none.repair == "none"


def test_bad_input_is_refused_clearly():
    rt = unrepaired_tiny("llama")
    with pytest.raises(ValueError, match="repair"):
        rt.generate(_rag(), 2, repair="head:0")
    with pytest.raises(ValueError, match="repair"):
        spanctx.Runtime(rt.model, rt.tokenizer, store_bytes=1 << 20, repair="some")
    with pytest.raises(ValueError, match="at least one"):
        Context().append("a").parallel()
    with pytest.raises(ValueError, match="empty"):
        Context().parallel("a", "")
    with pytest.raises(ValueError, match="not a prefix"):
        Context().append("a").parallel("b", anchor=Context().append("z"))
    with pytest.raises(ValueError, match="anchor must be"):
        Context().parallel("b", anchor="parent")
    fake = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(NotImplementedError, match="sdpa"):
        EagerExecutor(fake).forward(torch.zeros(1, 1), None, positions=torch.zeros(1), allowed=torch.ones(1, 1))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_forward_stopped_after_a_layer_grows_only_the_layers_up_to_it(arch):
    rt = unrepaired_tiny(arch)
    cache = DynamicCache()
    _forward(rt.model, cache, [5, 6, 7, 8], 0)
    slots = torch.tensor([1, 3])
    with torch.inference_mode():
        EagerExecutor(rt.model).forward(torch.tensor([[6, 8]]), cache, positions=slots,
                                        allowed=in_place_allowed(4, slots), stop_after_layer=1)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [6, 6, 4, 4]


def test_a_lone_exact_member_shares_what_follows_it_across_repair_modes():
    rt = unrepaired_tiny("llama")
    ctx = Context().append(SYSTEM).parallel(DOCS[0]).append("Q?")
    rt.generate(ctx, 2, repair="none")
    assert rt.generate(ctx, 2, repair="head:4").stats.computed_tokens == 1


def test_the_repair_travels_on_the_resolved_prompt():
    rt = tiny_runtime()
    ctx = Context().append("System. ").parallel("Doc A. ", "Doc B. ").append("Question?")
    assert rt.resolve(ctx)[0].repair == rt.repair
    own = rt.resolve(ctx, repair="blend:0.5")[0]
    assert own.repair == spanctx.Repair.parse("blend:0.5") and own.groups[0].key != rt.resolve(ctx)[0].groups[0].key
    with rt.prepared(ctx, repair="head:2") as call:  # the engine places the groups with the prompt's repair
        assert call.assembly.parallel.repair == "head:2" == str(call.prompt.repair)
