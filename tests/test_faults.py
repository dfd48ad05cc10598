"""Faults: a model call that fails mid-way leaves the model, the store and the runtime as
they were (issue 17: the static executor's attention switch, batches with parallel rows,
reservations)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_runtime

import spanctx
from spanctx import Context

ATOL = 1e-4
SYSTEM = "You answer from the documents. "
DOCS = ("Doc 0: Ana's code is 4411. ", "Doc 1: Tomas's code is 9023. ", "Doc 2: Lee's code is 1170. ")


class Injected(RuntimeError):
    pass


class FailAt:
    """A forward pre-hook on the first decoder layer that raises on its ``n``-th call."""

    def __init__(self, model, n: int) -> None:
        self.n, self.calls = n, 0
        self.handle = model.model.layers[0].register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.n:
            raise Injected(f"injected failure at layer call {self.n}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def no_locks(store) -> bool:
    return len(list(store.index.evictable())) == len(store.index)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_a_failure_inside_a_static_generation_leaves_the_model_and_store_clean(n):
    model, tokenizer = tiny_model("llama")
    own = model.config._attn_implementation
    store = spanctx.KVStore(64 << 20)
    rt = spanctx.Runtime(model, tokenizer, store=store, executor="static")
    ctx = Context().append(SYSTEM).append("Q: Tomas?\nA:")
    with FailAt(model, n), pytest.raises(Injected):
        rt.generate(ctx, 4)
    assert model.config._attn_implementation == own and no_locks(store)
    want = spanctx.Runtime(model, tokenizer, store_bytes=1 << 20, executor="eager").generate(ctx, 4, reuse=False)
    assert rt.generate(ctx, 4).token_ids == want.token_ids
    budget = store.stats.bytes_budget
    rt.close()
    assert store.stats.bytes_budget > budget  # the reservation came back after the failure too


@pytest.mark.parametrize("n", [1, 3, 6])
def test_a_failure_inside_a_batch_with_a_parallel_row_stores_nothing_wrong(n):
    q = Context().append(SYSTEM).parallel(*DOCS).append("Q: What is the code of Tomas?\nA:")
    longer = Context().append(SYSTEM).append("Q: " + "Please tell me everything you know. " * 3 + "\nA:")
    rt = tiny_runtime(repair="head:4")
    model, _ = tiny_model("llama")
    with FailAt(model, n), pytest.raises(Injected):
        rt.generate_batch([longer, q], 4)
    assert no_locks(rt.store)
    cold = tiny_runtime(repair="head:4")
    rows = rt.generate_batch([longer, q], 4)  # the batch again, after the failure
    assert [r.token_ids for r in rows] == [cold.generate(c, 4).token_ids for c in (longer, q)]
    # nothing it stored is wrong: a later call equals a cold runtime's
    torch.testing.assert_close(rt.next_token_logits(q), tiny_runtime(repair="head:4").next_token_logits(q),
                               atol=ATOL, rtol=0)
