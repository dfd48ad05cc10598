"""Two spanctx replicas on a local Ray cluster (2 CPUs) behind the span-affinity router:
a repeated context lands on the replica that holds its spans, proven by that replica's
own store counters in its replies; the official ``openai`` client works through Ray."""

from __future__ import annotations

import socket

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from spanctx.serve.local import RuntimeSpec  # noqa: E402
from spanctx.serve.ray_app import build_app  # noqa: E402

DOCS = [f"Document {name}: " + f"the {name} pump needs oil every week. " * 12 for name in ("red", "blue", "green")]


@pytest.fixture(scope="module")
def url():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(RuntimeSpec("tiny-llama", device="cpu", store_bytes=64 << 20), "tiny", replicas=2)
        serve.run(app, name="spanctx", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def ask(url: str, doc: str, question: str) -> dict:
    body = {"context": [doc, f"Question: {question}? Answer:"], "max_tokens": 2}
    response = httpx.post(url + "/v1/spanctx/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_repeated_context_lands_on_the_replica_that_holds_it(url):
    replies = {doc: [ask(url, doc, f"q{i}") for i in range(3)] for doc in DOCS}
    for doc, rs in replies.items():
        (replica,) = {r["replica"] for r in rs}  # every question of a document on one replica
        assert rs[0]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        for earlier, later in zip(rs, rs[1:]):  # that replica's own store served the document again
            assert later["store"]["hits"] > earlier["store"]["hits"]
            assert later["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(doc)


def test_openai_client_and_errors_through_ray(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.usage.completion_tokens == 3
    chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    two = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, n=2,
                                         logprobs=True)  # both choices on one replica, with log-probabilities
    assert [c.message.content for c in two.choices] == [reply.choices[0].message.content] * 2
    assert all(len(c.logprobs.content) == 3 for c in two.choices) and two.usage.completion_tokens == 6
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], logit_bias={"1": 1})
    response = httpx.post(url + "/v1/spanctx/generate", json={"context": ["x"], "adapter": "none", "max_tokens": 1},
                          timeout=120)
    assert response.status_code == 400 and "none" in response.json()["error"]["message"]
