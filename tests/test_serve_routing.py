"""The server's pure parts: contexts as JSON, OpenAI bodies, span-affinity routing, and a
stream's text rows (stop strings, partial characters). No model, no HTTP."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spanctx import Context
from spanctx.core.messages import Message
from spanctx.core.spans import Span
from spanctx.presets import byte_tokenizer
from spanctx.serve.jobs import Job, Row
from spanctx.serve.protocol import ApiError, chat_request, completion_request, context_from_json, context_to_json
from spanctx.serve.routing import affinity_ranks, route_key

texts = st.text(min_size=1, max_size=8)
ids = st.lists(st.integers(0, 300), min_size=1, max_size=4)
messages = st.builds(lambda role, content: {"role": role, "content": content},
                     st.sampled_from(["system", "user", "assistant"]), texts)


@st.composite
def contexts(draw) -> Context:
    ctx = Context()
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["text", "ids", "message", "parallel", "chat"]))
        if kind == "text":
            ctx = ctx.append(draw(texts))
        elif kind == "ids":
            ctx = ctx.append(draw(ids))
        elif kind == "message":  # built directly: Context.message after a parallel group fails (spans.py)
            ctx = Context(ctx, Span(Message.of(**draw(messages))))
        elif kind == "parallel":
            ctx = ctx.parallel(*draw(st.lists(texts | ids, min_size=1, max_size=3)),
                               anchor=draw(st.sampled_from(["path", "root"])))
        elif ctx.is_root:
            ctx = ctx.chat(draw(st.lists(messages, min_size=1, max_size=2)), tools=[{"name": "f"}])
    return ctx


@given(contexts())
def test_contexts_round_trip_through_json(ctx):
    import json

    assert context_from_json(json.loads(json.dumps(context_to_json(ctx)))) == ctx


def test_a_messages_node_expands_like_context_chat():
    msgs = [{"role": "user", "content": "hi"}]
    assert context_from_json(["doc", {"messages": msgs, "system": "be brief"}]) == \
        Context().append("doc").chat(msgs, system="be brief")


@pytest.mark.parametrize("nodes, param", [([], "context"), ([{"text": 3}], "context[0]"),
                                          (["a", {"parallel": ["b"], "anchor_depth": 5}], "context[1]"),
                                          ([{"text": "a", "ids": [1]}], "context[0]")])
def test_malformed_contexts_name_the_node(nodes, param):
    with pytest.raises(ApiError) as err:
        context_from_json(nodes)
    assert err.value.status == 400 and err.value.param == param


def test_openai_bodies():
    req = chat_request({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                        "temperature": 0, "top_p": 0.5, "seed": 3, "stop": "x", "max_tokens": 4, "cache_salt": "t"})
    assert req.generate_kwargs == {"do_sample": False, "seed": 3} and req.stop == ("x",)
    assert req.salt == "t" and req.max_new_tokens == 4 and req.ctx == Context.chat([{"role": "user", "content": "hi"}])
    assert completion_request({"prompt": [[1, 2, 3]]}).ctx == Context().append([1, 2, 3])
    sampled = completion_request({"prompt": "a", "temperature": 0.7, "top_p": 0.9})
    assert sampled.generate_kwargs == {"temperature": 0.7, "top_p": 0.9}
    for body in ({"prompt": ["a", "b"]}, {"prompt": 3}, {"prompt": "a", "stop": ["a"] * 5},
                 {"prompt": "a", "seed": 1.5}, {"prompt": "a", "cache_salt": ""}):
        with pytest.raises(ApiError):
            completion_request(body)


def test_route_keys_follow_the_first_nodes_and_the_salt():
    doc = Context().append("a long shared document")
    assert route_key(doc.append("q1"), None) == route_key(doc.append("q2"), None)
    assert route_key(doc.append("q1"), None) != route_key(doc.append("q1"), "tenant")
    assert route_key(doc.append("q1"), None, depth=2) != route_key(doc.append("q2"), None, depth=2)


def test_affinity_ranks_prefer_one_replica_and_spill_when_it_is_loaded():
    replicas = ["r0", "r1", "r2"]
    loads = dict.fromkeys(replicas, 0)
    ranks = affinity_ranks("k", replicas, str, loads.get, spill=2)
    assert sorted(r for (r,) in ranks) == replicas
    preferred = ranks[0][0]
    assert affinity_ranks("k", list(reversed(replicas)), str, loads.get, spill=2)[0] == [preferred]  # stable
    keys = {affinity_ranks(f"key{i}", replicas, str, loads.get, spill=2)[0][0] for i in range(40)}
    assert keys == set(replicas)  # keys spread over the replicas
    loads[preferred] = 2
    spilled = affinity_ranks("k", replicas, str, loads.get, spill=2)
    assert spilled[-1] == [preferred] and spilled[0] != [preferred]
    loads.update(dict.fromkeys(replicas, 5))  # everyone as loaded: stay
    assert affinity_ranks("k", replicas, str, loads.get, spill=2)[0] == [preferred]
    assert affinity_ranks(None, replicas, str, loads.get, spill=2) == [replicas]
    assert affinity_ranks("k", [], str, loads.get, spill=2) == []


def rows_of(text_ids: list[int], stop=(), limit=100) -> tuple[list, Row, Job]:
    from spanctx.core.options import merge_options
    from spanctx.serve.protocol import GenRequest

    events = []
    job = Job(events.append, request=GenRequest(Context().append("x"), limit, {}, tuple(stop), stream=True),
              opts=merge_options({}, {"max_new_tokens": limit}))
    row = Row(job, byte_tokenizer(), frozenset({257}))
    for token in text_ids:
        row.add(token)
    return events, row, job


def test_a_row_cuts_at_stop_strings_and_holds_back_their_start():
    tok = byte_tokenizer()
    events, row, job = rows_of(tok("hello world, bye", add_special_tokens=False)["input_ids"], stop=["world"])
    assert "".join(events) == "hello " and row.reason == "stop" and job.stopped.is_set()
    done = row.done(10, 0)
    assert (done.finish_reason, done.prompt_tokens, done.completion_tokens) == ("stop", 10, len(row.ids))
    assert done.ttft_s is not None and done.ttft_s >= 0


def test_a_row_holds_a_partial_character_and_stops_at_eos_and_limit():
    tok = byte_tokenizer()
    euro = tok("€", add_special_tokens=False)["input_ids"]  # three bytes
    events, row, _ = rows_of([*euro[:2]])
    assert "".join(events) == ""  # two bytes of three: nothing sent yet
    row.add(euro[2])
    assert "".join(events) == "€"
    row.add(257)
    assert row.reason == "stop" and row.done(1, 0).completion_tokens == 3
    events, row, _ = rows_of(tok("abcdef", add_special_tokens=False)["input_ids"], limit=3)
    assert "".join(events) == "abc" and row.reason == "length"


def test_a_cancelled_row_takes_no_more_tokens():
    events, row, job = rows_of([])
    job.cancel()
    row.add(65)
    assert events == [] and row.done(1, 0).finish_reason == "cancelled"
    assert isinstance(job.stopped, threading.Event)


def test_a_whole_reply_is_sent_once_at_the_end():
    from spanctx.core.options import merge_options
    from spanctx.serve.protocol import GenRequest

    events = []
    job = Job(events.append, request=GenRequest(Context().append("x"), 3, {}), opts=merge_options({}, {}))
    tok = byte_tokenizer()
    row = Row(job, tok, frozenset({257}))
    for token in tok("AB", add_special_tokens=False)["input_ids"]:
        row.add(token)
    assert events == []
    row.add(257)
    assert events == ["AB"]
