"""Defects where tenants and runtimes share a model and a store (issue 17, items 4-7 and
the model-identity note). Each test failed on main (02d1b05) before its fix; the history
shows it committed as a strict xfail first (in test_defects_2.py, split here since)."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from adapter_helpers import make_adapter
from conftest import tiny_model, tiny_runtime
from safetensors.torch import load_file, save_file

import spanctx
from spanctx import Context
from spanctx.session.adapters import AdapterError

ATOL = 1e-4
SYSTEM = "You answer from the documents. "
DOCS = ("Doc 0: Ana's code is 4411. ", "Doc 1: Tomas's code is 9023. ", "Doc 2: Lee's code is 1170. ")
QUESTION = "Q: What is the code of Tomas?\nA:"


def group_question() -> Context:
    return Context().append(SYSTEM).parallel(*DOCS).append(QUESTION)


# -- 4. adapter state belongs to a runtime ----------------------------------------------------

def test_unloading_an_adapter_in_one_runtime_leaves_another_runtimes(tmp_path):
    base, tokenizer = tiny_model("llama")
    folder = make_adapter(base, tmp_path / "c", seed=3)
    model = copy.deepcopy(base)
    ta, tb = (spanctx.Runtime(model, tokenizer, store_bytes=64 << 20) for _ in range(2))
    ta.add_adapter("c", folder)
    tb.add_adapter("c", folder)
    ctx = Context().append(SYSTEM).append(QUESTION)
    with_c = tb.next_token_logits(ctx, adapter="c", reuse=False)
    assert (with_c - tb.next_token_logits(ctx, reuse=False)).abs().max() > 1e-3  # the adapter changes outputs
    ta.unload_adapter("c")
    assert "c" in tb.list_adapters() and "c" not in ta.list_adapters()
    torch.testing.assert_close(tb.next_token_logits(ctx, adapter="c", reuse=False), with_c, atol=ATOL, rtol=0)
    tb.unload_adapter("c")
    torch.testing.assert_close(tb.next_token_logits(ctx, reuse=False),
                               spanctx.Runtime(base, tokenizer, store_bytes=1 << 20).next_token_logits(ctx, reuse=False),
                               atol=ATOL, rtol=0)


# -- 5. adapter loading checks its weights ------------------------------------------------------

def _damaged(tmp_path, name, damage):
    base, _ = tiny_model("llama")
    folder = make_adapter(base, tmp_path / name, seed=1)
    file = folder / "adapter_model.safetensors"
    weights = load_file(str(file))
    save_file(damage(weights), str(file))
    return folder


DAMAGES = {
    "no-lora-B": (lambda w: {k: v for k, v in w.items() if "lora_B" not in k}, "missing"),
    "layer-missing": (lambda w: {k: v for k, v in w.items() if ".layers.1." not in k}, "missing"),
    "nan": (lambda w: {k: (v.fill_(float("nan")) if i == 0 else v) for i, (k, v) in enumerate(w.items())},
            "non-finite"),
    "unexpected": (lambda w: {**w, "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight": torch.ones(2)},
                   "unexpected"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_adapter_file_is_refused_naming_the_file(tmp_path, damage):
    change, words = DAMAGES[damage]
    folder = _damaged(tmp_path, damage, change)
    base, tokenizer = tiny_model("llama")
    rt = spanctx.Runtime(copy.deepcopy(base), tokenizer, store_bytes=1 << 20)
    ctx = Context().append(QUESTION)
    before = rt.next_token_logits(ctx, reuse=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AdapterError, match=words) as error:
            rt.add_adapter("c", folder)
    assert "adapter_model.safetensors" in str(error.value) and damage in str(error.value)
    assert rt.list_adapters() == {}
    torch.testing.assert_close(rt.next_token_logits(ctx, reuse=False), before, atol=0, rtol=0)


# -- 6. a per-call salt on every call that reads spans ------------------------------------------

def _tenant_calls():
    ctx = Context().append(SYSTEM).append(QUESTION)
    group = group_question()
    messages = [{"role": "user", "content": "What is the code of Tomas?"}]
    return {
        "score": lambda rt, s: rt.score(ctx, [" 9023", " 4411"], salt=s),
        "rank": lambda rt, s: rt.rank(ctx, [" 9023", " 4411"], salt=s),
        "check": lambda rt, s: rt.check(ctx, ["It is short.", "It is kind."], salt=s),
        "check-parallel": lambda rt, s: rt.check(group, ["It is short."], salt=s),
        "check_loop": lambda rt, s: rt.check_loop(ctx, ["It is short."], max_rounds=1, max_new_tokens=3, salt=s),
        "hidden-last": lambda rt, s: rt.hidden_states(ctx, salt=s),
        "generate_json": lambda rt, s: rt.generate_json(ctx, {"type": "boolean"}, max_new_tokens=8, salt=s),
        "tool_turn": lambda rt, s: rt.tool_turn(messages, [], max_new_tokens=3, salt=s),
        "batch": lambda rt, s: rt.generate_batch([ctx, group], 2, salt=s),
        "logits": lambda rt, s: rt.next_token_logits(group, salt=s),
    }


class KeySpy:
    """Records the keys a store is given (``put``) and the keys it hands out (``lookup`` hits)."""

    def __init__(self, store) -> None:
        self.stored, self.hit = set(), set()
        put, lookup = store.put, store.lookup

        def spy_put(key, kv):
            self.stored.add(key)
            return put(key, kv)

        def spy_lookup(key):
            found = lookup(key)
            if found is not None:
                self.hit.add(key)
            return found

        store.put, store.lookup = spy_put, spy_lookup

    def reset(self) -> None:
        self.stored, self.hit = set(), set()


# score, rank, check, check-parallel, check_loop and hidden-last failed on main (no salt= or a
# dropped one); the others passed and stay as regression cases
@pytest.mark.parametrize("call", list(_tenant_calls()))
def test_tenants_with_different_call_salts_share_no_span(call):
    if call == "generate_json":
        pytest.importorskip("llguidance")
    fn = _tenant_calls()[call]
    rt = tiny_runtime()
    spy = KeySpy(rt.store)
    fn(rt, "tenant-a")
    tenant_a = spy.stored
    assert tenant_a
    spy.reset()
    fn(rt, "tenant-b")
    fn(rt, "tenant-b")
    assert not spy.hit & tenant_a  # no cross-tenant hit
    assert spy.hit  # ... while each tenant reuses its own


def test_a_salted_mean_embedding_stores_under_its_tenants_keys_only():
    rt = tiny_runtime()
    ctx = Context().append(SYSTEM).append(QUESTION)
    rt.hidden_states(ctx, "mean", salt="tenant-a")
    before = rt.store.stats.hits
    rt.next_token_logits(ctx, salt="tenant-b")
    assert rt.store.stats.hits == before
    rt.next_token_logits(ctx, salt="tenant-a")
    assert rt.store.stats.hits > before


# -- 7. a runtime gives its static buffers' reservation back ------------------------------------

def test_static_runtimes_give_their_reservation_back():
    model, tokenizer = tiny_model("llama")
    store = spanctx.KVStore(64 << 20)
    budget = store.stats.bytes_budget
    for _ in range(20):  # each takes about a quarter of the budget; dropped, each gives it back
        spanctx.Runtime(model, tokenizer, store=store, executor="static").generate(Context().append(QUESTION), 2)
    gc.collect()
    assert store.stats.bytes_budget == budget
    rt = spanctx.Runtime(model, tokenizer, store=store, executor="static")
    assert store.stats.bytes_budget < budget
    rt.close()
    rt.close()  # twice is harmless
    assert store.stats.bytes_budget == budget
    with pytest.raises(RuntimeError, match="closed"):
        rt.generate(Context().append(QUESTION), 2)
    with spanctx.Runtime(model, tokenizer, store=store, executor="static") as held:
        held.generate(Context().append(QUESTION), 2)
        assert store.stats.bytes_budget < budget
    assert store.stats.bytes_budget == budget


def test_two_models_with_other_weights_under_one_identity_are_refused():
    llama, tokenizer = tiny_model("llama")
    tuned = copy.deepcopy(llama)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01)
    store = spanctx.KVStore(16 << 20)
    spanctx.Runtime(llama, tokenizer, store=store, model_identity="my-model")
    with pytest.raises(ValueError, match="model_identity='my-model'"):
        spanctx.Runtime(tuned, tokenizer, store=store, model_identity="my-model")
    spanctx.Runtime(llama, tokenizer, store=store, model_identity="my-model")  # the same model again is fine
    spanctx.Runtime(tuned, tokenizer, store=store, model_identity="my-tuned-model")
