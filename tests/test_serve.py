"""The server on a loopback port with a tiny model, driven by the official ``openai`` client,
raw HTTP and ``spanctx.serve.client``. Answers are compared with direct ``Runtime`` calls
on another runtime over the same weights (greedy, so equal tokens are expected)."""

from __future__ import annotations

import copy
import json
import threading
import time

import pytest
from adapter_helpers import INVOCATION, invocation_ids, make_adapter
from conftest import tiny_model, tiny_runtime

import spanctx
from spanctx import Context
from spanctx.core.messages import GenerationPrompt
from spanctx.session.logprobs import token_logprobs

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from spanctx.serve.app import create_app, serving  # noqa: E402
from spanctx.serve.client import Client, ServerError  # noqa: E402
from spanctx.serve.jobs import Job  # noqa: E402
from spanctx.serve.local import LocalBackend  # noqa: E402
from spanctx.serve.protocol import GenRequest  # noqa: E402

SYSTEM = "You answer questions about the shared manual. " * 12
MODEL = "tiny"


@pytest.fixture(scope="module", params=["batched", "lanes"])
def server(tmp_path_factory, request):
    """(url, backend): a server over its own copy of the tiny Llama with an aLoRA ``judge``;
    its scheduler batches whole calls (the eager executor) or runs lanes that join and
    leave between steps (``engine.lanes``, on the static executor)."""
    model, tokenizer = tiny_model("llama")
    executor = "static" if request.param == "lanes" else "eager"
    rt = spanctx.Runtime(copy.deepcopy(model), tokenizer, store_bytes=64 << 20, executor=executor)
    folder = make_adapter(model, tmp_path_factory.mktemp("judge") / "alora", invocation=invocation_ids(tokenizer))
    rt.add_adapter("judge", folder, invocation=INVOCATION)
    backend = LocalBackend(rt, max_batch=4, max_queue=4)
    assert backend.scheduler.continuous == (request.param == "lanes")
    with serving(create_app(backend, MODEL)) as url:
        yield url, backend
    backend.scheduler.close()


@pytest.fixture(scope="module")
def direct():
    return tiny_runtime("llama")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


class Blocked:
    """Holds the scheduler's worker on an exclusive call until released."""

    def __init__(self, backend: LocalBackend) -> None:
        self.scheduler, self.release = backend.scheduler, threading.Event()
        started = threading.Event()
        self.scheduler.submit(Job(lambda event: None, call=lambda rt: (started.set(), self.release.wait(60))))
        assert started.wait(60)

    def wait_queued(self, n: int) -> None:
        deadline = time.monotonic() + 60
        while self.scheduler.waiting < n:
            assert time.monotonic() < deadline, "requests did not reach the queue"
            time.sleep(0.01)


def test_chat_equals_runtime_and_repeat_is_cached(client, direct):
    msgs = chat("What is in chapter one?")
    first = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6)
    expected = direct.generate(Context.chat(msgs), 6)
    assert first.choices[0].message.content == expected.text
    assert first.usage.prompt_tokens == expected.stats.prompt_tokens
    assert first.usage.completion_tokens == 6 and first.choices[0].finish_reason == "length"
    again = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6)
    assert again.choices[0].message.content == expected.text
    assert again.usage.prompt_tokens_details.cached_tokens > 0.9 * again.usage.prompt_tokens


def test_streaming_chat(client):
    msgs = chat("Stream chapter two.")
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=7).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=7, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 7 and chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_completions_and_stop(client, direct):
    prompt = "The manual says that"
    expected = direct.generate(Context().append(prompt), 8).text
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8)
    assert out.choices[0].text == expected
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt=prompt,
                                                                               max_tokens=8, stream=True))
    assert streamed == expected
    stop = expected[3:5]  # a stop string the greedy answer reaches: the text is cut before it
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, stop=[stop])
    assert cut.choices[0].text == expected[:expected.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_cache_salt_separates(server):
    url = server[0]
    body = {"model": MODEL, "messages": chat("Salted question?"), "max_tokens": 2}
    usage = [httpx.post(url + "/v1/chat/completions", json={**body, "cache_salt": salt}, timeout=120)
             .json()["usage"]["prompt_tokens_details"]["cached_tokens"] for salt in ("tenant-a", "tenant-b",
                                                                                      "tenant-a")]
    assert usage[0] == 0 and usage[1] == 0 and usage[2] > 0


@pytest.mark.parametrize("body, status, param", [
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 5}, 400, "n"),  # more than the queue (4) holds
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}, 400, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 400, "frobnicate"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9000}, 400, None),  # past 8192 positions
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    response = httpx.post(server[0] + "/v1/chat/completions", json={"model": MODEL, **body}, timeout=120)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_bad_json_and_openai_client_errors(server, client):
    response = httpx.post(server[0] + "/v1/completions", content=b"{not json", timeout=60)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="not supported") as err:
        client.chat.completions.create(model=MODEL, messages=chat("tools?"), tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {}}}}])
    assert err.value.body["param"] == "tools" and err.value.body["code"] == "unsupported_parameter"


def run_queued_together(backend, requests) -> None:
    """Send ``requests`` (callables, each making one request) from threads while the model
    is held busy, so that all of them wait in the queue, then let the scheduler take them."""
    blocked = Blocked(backend)
    threads = [threading.Thread(target=request) for request in requests]
    for t in threads:
        t.start()
    blocked.wait_queued(len(requests))
    blocked.release.set()
    for t in threads:
        t.join(120)


def ran_together(backend: LocalBackend, rows: int, tokens: int, run) -> None:
    """``run()`` and check that its ``rows`` requests (``tokens`` new tokens in all) shared
    model calls: one batched call, or lanes stepping together (fewer steps than tokens)."""
    scheduler = backend.scheduler
    lanes, steps = scheduler.counts["lanes"], scheduler.counts["lane_steps"]
    run()
    if scheduler.continuous:
        assert scheduler.counts["lanes"] - lanes == rows
        assert scheduler.counts["lane_steps"] - steps <= tokens - rows + 1  # at least two rows in a step
    else:
        assert scheduler.batch_sizes[-1] == rows


def test_waiting_requests_run_as_one_batch(server, client, direct):
    backend = server[1]
    questions = [f"Batched question {i}?" for i in range(3)]
    results: dict[int, object] = {}
    ran_together(backend, 3, 12, lambda: run_queued_together(backend, [
        lambda i=i: results.__setitem__(i, client.chat.completions.create(
            model=MODEL, messages=chat(questions[i]), max_tokens=3 + i)) for i in range(3)]))
    for i, q in enumerate(questions):  # each row stops at its own limit, with its solo tokens
        assert results[i].choices[0].message.content == direct.generate(Context.chat(chat(q)), 3 + i).text
        assert results[i].usage.completion_tokens == 3 + i


def test_a_bad_row_does_not_fail_its_batch(server, client, direct):
    backend = server[1]
    results: dict[int, object] = {}

    def ask(i: int, max_tokens: int) -> None:
        try:
            results[i] = client.completions.create(model=MODEL, prompt=f"row {i}", max_tokens=max_tokens)
        except openai.BadRequestError as exc:
            results[i] = exc

    run_queued_together(backend, [lambda i=i: ask(i, 9000 if i == 1 else 3) for i in range(3)])  # row 1: too long
    assert isinstance(results[1], openai.BadRequestError) and "positions" in str(results[1])
    for i in (0, 2):  # the good rows answer as the runtime does alone (a turn end may stop them early)
        expected = direct.generate(Context().append(f"row {i}"), 3)
        assert results[i].choices[0].text == expected.text
        assert results[i].usage.completion_tokens <= expected.stats.new_tokens  # the server counts no turn end


def test_bounded_load_keeps_every_answer(server, client, direct):
    """12 requests from 4 concurrent clients (half streamed; no more clients than the queue
    holds), loopback: every answer is the one the runtime gives alone, whatever batches the
    scheduler formed."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> str:
        kwargs = {"model": MODEL, "messages": chat(f"Load question {i}?"), "max_tokens": 4}
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs,
                                                                                               stream=True))
        return client.chat.completions.create(**kwargs).choices[0].message.content

    with ThreadPoolExecutor(server[1].scheduler.max_queue) as pool:
        answers = list(pool.map(one, range(12)))
    assert answers == [direct.generate(Context.chat(chat(f"Load question {i}?")), 4).text for i in range(12)]


def test_full_queue_answers_429(server):
    url, backend = server
    blocked = Blocked(backend)
    body = {"model": MODEL, "prompt": "queued", "max_tokens": 1}
    threads = [threading.Thread(target=httpx.post, args=(url + "/v1/completions",), kwargs={"json": body,
                                                                                            "timeout": 120})
               for _ in range(backend.scheduler.max_queue)]
    for t in threads:
        t.start()
    blocked.wait_queued(backend.scheduler.max_queue)
    response = httpx.post(url + "/v1/completions", json=body, timeout=60)
    blocked.release.set()
    for t in threads:
        t.join(120)
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "queue_full"


def test_disconnected_stream_frees_its_slot(server):
    url, backend = server
    scheduler = backend.scheduler
    cancelled = scheduler.counts["cancelled"]
    body = {"model": MODEL, "prompt": "a long answer", "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 60
    while scheduler.counts["cancelled"] == cancelled or scheduler.running:
        assert time.monotonic() < deadline, "the cancelled stream still holds the model"
        time.sleep(0.02)
    follow = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "next", "max_tokens": 2},
                        timeout=120)
    assert follow.status_code == 200


def test_span_endpoint_with_parallel_group_and_client(server, direct):
    system = Context.chat([{"role": "system", "content": "Answer from the notes."}], add_generation_prompt=False)
    ctx = system.parallel("Note A: red.", "Note B: blue.").append("Which note is red? Answer:")
    client = Client(server[0])
    reply = client.generate(ctx, max_tokens=5, repair="head:4")
    assert reply.text == direct.generate(ctx, 5, repair="head:4").text
    again = client.generate(ctx, max_tokens=5, repair="head:4")
    assert again.text == reply.text and again.cached_tokens > 0
    assert "".join(client.stream(ctx, max_tokens=5, repair="head:4")) == reply.text
    with pytest.raises(ServerError) as err:
        client.generate(ctx, max_tokens=2, adapter="missing")
    assert err.value.status == 400 and "missing" in err.value.error["message"]


def test_check_endpoint_matches_runtime(server):
    url, backend = server
    ctx = Context.chat([{"role": "user", "content": "Summarise the manual."},
                        {"role": "assistant", "content": "It covers pumps."}], add_generation_prompt=False)
    requirements = ["Mentions pumps.", "Is polite."]
    verdicts = Client(url).check(ctx, requirements, adapter="judge")
    expected = backend.rt.check(ctx, requirements, adapter="judge")
    assert [v["requirement"] for v in verdicts] == requirements
    for got, want in zip(verdicts, expected):
        assert got["passed"] == want.passed and got["probability"] == pytest.approx(want.probability, abs=1e-5)
    response = httpx.post(url + "/v1/spanctx/check", json={"context": [{"bad": 1}], "requirements": ["x"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "context[0]"


def test_health_and_metrics(server, client):
    url = server[0]
    client.chat.completions.create(model=MODEL, messages=chat("metrics?"), max_tokens=3)
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["store"]["hits"] > 0
    text = httpx.get(url + "/metrics").text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['spanctx_prompt_tokens_total{source="cached"}'] > 0
    assert samples["spanctx_store_hits"] == health["store"]["hits"]
    assert samples["spanctx_ttft_seconds_count"] > 0 and samples["spanctx_generated_tokens_total"] > 0
    assert json.loads(httpx.get(url + "/v1/models").text)["data"][0]["id"] == MODEL


def test_n_choices_run_as_one_batch_and_seeds_step(server, client, direct):
    backend = server[1]
    msgs = chat("Three answers, please?")
    one = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5)
    replies = []  # the n choices are queued at once and batched
    ran_together(backend, 3, 15, lambda: replies.append(client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=5, n=3)))
    (three,) = replies
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}  # greedy: alike
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # one prompt, counted once
    sampled = {"model": MODEL, "messages": msgs, "max_tokens": 8, "temperature": 1.0}
    pair = client.chat.completions.create(**sampled, n=2, seed=7)
    alone = [client.chat.completions.create(**sampled, seed=s).choices[0].message.content for s in (7, 8)]
    assert [c.message.content for c in pair.choices] == alone  # choice i samples with seed + i
    assert alone[0] != alone[1]
    prompt = "The manual says that"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, n=2, stream=True))
    texts, finishes = ["", ""], [None, None]
    for chunk in chunks:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    expected = direct.generate(Context().append(prompt), 6).text
    assert texts == [expected, expected] and finishes == ["length", "length"]


def test_logprobs_are_the_models_distribution(server, client, direct):
    msgs = chat("How sure are you?")
    reply = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    want = direct.generate(Context.chat(msgs), 5, output_scores=True)
    assert [e.token for e in content] == [direct.tokenizer.decode([t]) for t in want.token_ids]
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    for entry, expected in zip(content, want.logprobs(3), strict=True):
        assert entry.logprob == pytest.approx(expected.logprob, abs=1e-4)
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx([p for _, p in expected.top], abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the likeliest
        assert entry.bytes == list(entry.token.encode())
    streamed = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, logprobs=True,
                                                   top_logprobs=3, stream=True))
    again = [e for c in streamed for e in (c.choices[0].logprobs.content if c.choices[0].logprobs else [])]
    assert [e.token for e in again] == [e.token for e in content]  # (from the store now: equal up to rounding)
    assert [e.logprob for e in again] == pytest.approx([e.logprob for e in content], abs=1e-4)
    # sampled: the log-probabilities are the model's, before temperature (as vLLM reports them)
    prompt = "The pump is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, logprobs=2, temperature=0.5, seed=3)
    sampled = direct.generate(Context().append(prompt), 4, output_logits=True, temperature=0.5, seed=3)
    lp = out.choices[0].logprobs
    assert lp.tokens == [direct.tokenizer.decode([t]) for t in sampled.token_ids]
    expected = token_logprobs(sampled.logits, sampled.token_ids, 2)
    assert lp.token_logprobs == pytest.approx([e.logprob for e in expected], abs=1e-4)
    assert all(token in top and len(top) <= 3 for token, top in zip(lp.tokens, lp.top_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_logprobs_of_batched_rows(server, client, direct):
    """A row that asks for log-probabilities shares a batch with one that does not."""
    backend = server[1]
    results: dict[int, object] = {}
    ran_together(backend, 2, 6, lambda: run_queued_together(backend, [
        lambda i=i: results.__setitem__(i, client.completions.create(
            model=MODEL, prompt=f"Batched row {i}", max_tokens=3, **({"logprobs": 1} if i == 0 else {})))
        for i in range(2)]))
    want = direct.generate(Context().append("Batched row 0"), 3, output_scores=True).logprobs(1)
    got = results[0].choices[0].logprobs
    assert got.token_logprobs == pytest.approx([e.logprob for e in want], abs=1e-4)
    assert results[1].choices[0].logprobs is None


def test_a_message_after_a_parallel_group(server, direct):
    notes = Context.chat([{"role": "system", "content": "Answer from the notes."}], add_generation_prompt=False)
    ctx = notes.parallel("Note A: red.", "Note B: blue.").message("user", "Which note is red?",
                                                                  add_generation_prompt=True)
    assert ctx == notes.parallel("Note A: red.", "Note B: blue.").chat([{"role": "user",
                                                                        "content": "Which note is red?"}])
    assert ctx.spans[-1].content == GenerationPrompt() and ctx.message("assistant", "A").spans[-1].content.role \
        == "assistant"  # the generation prompt was a placeholder for the reply
    reply = Client(server[0]).generate(ctx, max_tokens=4, repair="head:4")
    assert reply.text == direct.generate(ctx, 4, repair="head:4").text


def test_n_choices_enter_the_queue_all_or_none(server):
    url, backend = server
    blocked = Blocked(backend)
    body = {"model": MODEL, "prompt": "queued", "max_tokens": 1}
    threads = [threading.Thread(target=httpx.post, args=(url + "/v1/completions",), kwargs={"json": body,
                                                                                            "timeout": 120})
               for _ in range(backend.scheduler.max_queue - 1)]
    for t in threads:
        t.start()
    blocked.wait_queued(backend.scheduler.max_queue - 1)
    response = httpx.post(url + "/v1/completions", json={**body, "n": 2}, timeout=60)  # one place left, two asked
    waiting = backend.scheduler.waiting
    blocked.release.set()
    for t in threads:
        t.join(120)
    assert response.status_code == 429 and response.json()["error"]["code"] == "queue_full"
    assert waiting == backend.scheduler.max_queue - 1  # neither choice was queued


def test_logprobs_through_the_static_executor():
    """A row's log-probabilities come from the step's scores on either executor (the static
    one reuses its logits buffer: the scores are copied at their step)."""
    from spanctx.core.options import merge_options
    from spanctx.features.batch import eos_ids
    from spanctx.serve.jobs import Row
    from spanctx.serve.scheduler import run_rows, run_single

    model, tokenizer = tiny_model("llama")
    contexts = [Context().append(SYSTEM).append(q) for q in ("One?", "Two, longer?")]
    got = {}
    for executor in ("eager", "static"):
        rt = spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor=executor)
        for run, ctxs in ((run_single, contexts[:1]), (run_rows, contexts)):
            events = [[] for _ in ctxs]
            jobs = [Job(sink.append, request=GenRequest(ctx, 4, {}, (), stream=True, logprobs=2),
                        opts=merge_options({}, {"max_new_tokens": 4})) for ctx, sink in zip(ctxs, events)]
            run(rt, jobs, [Row(job, tokenizer, eos_ids(rt.generation_config.eos_token_id)) for job in jobs])
            got[executor, run.__name__] = [[info for delta in sink for info in delta.logprobs] for sink in events]
        want = rt.generate(contexts[0], 4, output_scores=True).logprobs(2)
        assert len(want) == 4 and all(len(row) == 4 for row in got[executor, "run_rows"])
        assert [i.logprob for i in got[executor, "run_single"][0]] == pytest.approx([w.logprob for w in want], abs=1e-4)
    for key in ("run_single", "run_rows"):
        assert [[i.token for i in row] for row in got["static", key]] == [[i.token for i in row]
                                                                          for row in got["eager", key]]
        for s_row, e_row in zip(got["static", key], got["eager", key]):
            assert [i.logprob for i in s_row] == pytest.approx([i.logprob for i in e_row], abs=1e-4)
