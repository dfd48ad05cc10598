"""Concurrency: threads over one model and one store give what solo runs give (issue 17:
static and eager executors over one model, re-entrant callbacks, tenants by salt)."""

from __future__ import annotations

import threading

import torch
from conftest import tiny_model
from transformers import LogitsProcessor, LogitsProcessorList

import spanctx
from spanctx import Context

ATOL = 1e-4
SYSTEM = "You answer from the documents. "
DOCS = ("Doc 0: Ana's code is 4411. ", "Doc 1: Tomas's code is 9023. ")
QUESTIONS = ("Q: Tomas?\nA:", "Q: Ana?\nA:", "Q: who cleaned it?\nA:")
ROUNDS = 3
JOIN = 300  # seconds before a worker counts as hung (a deadlock guard, not a timing)


def contexts() -> list[Context]:
    plain = [Context().append(SYSTEM).append(q) for q in QUESTIONS]
    return plain + [Context().append(SYSTEM).parallel(*DOCS).append(q) for q in QUESTIONS[:2]]


class AsksForLogits(LogitsProcessor):
    """A re-entrant callback: asks its runtime for logits at every step."""

    def __init__(self, rt, ctx) -> None:
        self.rt, self.ctx = rt, ctx

    def __call__(self, input_ids, scores):
        self.rt.next_token_logits(self.ctx)
        return scores


def run_threads(*jobs) -> None:
    failures: list[BaseException] = []

    def guarded(job):
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            failures.append(exc)

    workers = [threading.Thread(target=guarded, args=(job,), daemon=True) for job in jobs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(JOIN)
    assert not any(w.is_alive() for w in workers), "a worker hung"
    if failures:
        raise failures[0]


def test_static_and_eager_runtimes_over_one_model_in_threads_equal_solo_runs():
    model, tokenizer = tiny_model("llama")
    own = model.config._attn_implementation
    store = spanctx.KVStore(64 << 20)
    static = spanctx.Runtime(model, tokenizer, store=store, executor="static")
    eager = spanctx.Runtime(model, tokenizer, store=store, executor="eager")
    reference = spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor="eager")
    ctxs = contexts()
    # solo runs with reuse (a parallel group's repaired KV is not a full prefill's)
    want_tokens = [reference.generate(c, 5).token_ids for c in ctxs]
    want_logits = [reference.next_token_logits(c) for c in ctxs]
    got_tokens, got_logits, got_rows = [], [], []

    def static_job():
        for _ in range(ROUNDS):
            for i, c in enumerate(ctxs):
                processors = LogitsProcessorList([AsksForLogits(static, ctxs[(i + 1) % len(ctxs)])])
                got_tokens.append((i, static.generate(c, 5, logits_processor=processors).token_ids))

    def eager_job():
        for _ in range(ROUNDS):
            for i, c in enumerate(ctxs):
                got_logits.append((i, eager.next_token_logits(c)))
            got_rows.append(eager.generate_batch(ctxs, 5))

    run_threads(static_job, eager_job)
    assert model.config._attn_implementation == own
    assert all(tokens == want_tokens[i] for i, tokens in got_tokens) and len(got_tokens) == ROUNDS * len(ctxs)
    for i, logits in got_logits:
        torch.testing.assert_close(logits, want_logits[i], atol=ATOL, rtol=0)
    for rows in got_rows:
        assert [r.token_ids for r in rows] == want_tokens


def test_tenants_in_threads_never_read_each_others_spans():
    model, tokenizer = tiny_model("llama")
    rt = spanctx.Runtime(model, tokenizer, store_bytes=64 << 20)
    tenant = threading.local()
    stored: dict[str, set[bytes]] = {"a": set(), "b": set()}
    hit: dict[str, set[bytes]] = {"a": set(), "b": set()}
    put, lookup = rt.store.put, rt.store.lookup

    def spy_put(key, kv):
        stored[tenant.name].add(key)
        return put(key, kv)

    def spy_lookup(key):
        found = lookup(key)
        if found is not None:
            hit[tenant.name].add(key)
        return found

    rt.store.put, rt.store.lookup = spy_put, spy_lookup
    ctx = contexts()

    def job(name):
        def run():
            tenant.name = name
            salt = f"tenant-{name}"
            for _ in range(ROUNDS):
                rt.score(ctx[0], [" 9023", " 4411"], salt=salt)
                rt.check(ctx[1], ["It is short."], salt=salt)
                rt.hidden_states(ctx[3], salt=salt)
                rt.generate_batch(ctx[2:], 2, salt=salt)
        return run

    run_threads(job("a"), job("b"))
    assert hit["a"] and hit["b"]  # each tenant reuses its own spans
    assert not hit["a"] & stored["b"] and not hit["b"] & stored["a"]
