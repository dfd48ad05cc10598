"""Adapters on the base cache: LoRA and aLoRA against PEFT's own full prefill.

Every reuse path is compared with PEFT's ``generate`` / forward on a full prefill of the
same ids (identical greedy tokens, logits within 1e-4 in fp32), and base calls must give
bitwise what they gave before any adapter call.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from adapter_helpers import (
    INVOCATION,
    adapter_pair,
    fresh_runtime,
    invocation_ids,
    make_adapter,
    peft_reference,
    reference_logits,
    reference_tokens,
)
from conftest import tiny_model
from peft import IA3Config, get_peft_model
from peft.tuners.lora import LoraLayer

import spanctx
from spanctx.cache.fingerprint import model_namespace
from spanctx.core.keys import span_key
from spanctx.session.adapters import AdapterError, AdapterSet

ARCHS = ["llama", "qwen2"]
ATOL = 1e-4


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory):
    """(arch, aLoRA folder, LoRA folder) for one architecture."""
    return adapter_pair(request.param, tmp_path_factory, "adapters", (1, 2))


def context() -> spanctx.Context:
    return spanctx.Context().append("You answer in one word. ").append("What is the capital of France?")


def test_alora_reuses_the_base_cache_and_matches_peft(setup):
    arch, alora, _ = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora, invocation=INVOCATION)
    ref = peft_reference(arch, alora)
    ctx = context()
    base_ids = rt.token_ids(ctx)
    base_logits = rt.next_token_logits(ctx)  # stores the context under base keys
    ids = rt.token_ids(ctx, adapter="check")
    assert ids == base_ids + invocation_ids(rt.tokenizer)

    res = rt.generate(ctx, 6, adapter="check")
    assert res.stats.cached_tokens == len(base_ids)
    assert res.stats.computed_tokens == len(ids) - len(base_ids)
    assert res.token_ids == reference_tokens(ref, ids, 6)

    logits = rt.next_token_logits(ctx, adapter="check")
    torch.testing.assert_close(logits, reference_logits(ref, ids), atol=ATOL, rtol=0)
    # the adapter matters: its logits are far from the base model's on the same ids
    assert (logits - reference_logits(rt.model, ids)).abs().max() > 1e-2
    assert rt.generate(ctx, 6, adapter="check", reuse=False).token_ids == res.token_ids
    torch.testing.assert_close(rt.next_token_logits(ctx, adapter="check", reuse=False), logits, atol=ATOL, rtol=0)
    assert not torch.equal(base_logits, logits)


@pytest.mark.parametrize("reuse", [True, False])
def test_alora_stays_on_for_every_decode_step(setup, reuse):
    """Each generated token is PEFT's full-prefill choice given the tokens before it, and
    at some decode step the base model would choose another: an adapter that switched off
    after the prefill (as when the cache argument is missed on decode steps) fails here."""
    arch, alora, _ = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora, invocation=INVOCATION)
    ref = peft_reference(arch, alora)
    base, _ = tiny_model(arch)
    ctx = context()
    rt.next_token_logits(ctx)  # the base context is stored: the adapter call reuses it
    ids = rt.token_ids(ctx, adapter="check")
    tokens = rt.generate(ctx, 12, adapter="check", reuse=reuse).token_ids
    assert len(tokens) == 12
    base_differs = []
    for step, token in enumerate(tokens):
        seen = ids + list(tokens[:step])
        assert reference_logits(ref, seen).argmax().item() == token, f"decode step {step}"
        base_differs.append(reference_logits(base, seen).argmax().item() != token)
    assert any(base_differs[1:]), "the adapter never changes a decode step's choice: the test would not see it off"


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3", "gpt2"])
def test_alora_on_other_architectures(arch, tmp_path):
    """Sliding windows crossed by the prompt, per-layer RoPE, and GPT-2's Conv1D layers."""
    model, tokenizer = tiny_model(arch)
    gpt2_layers = {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True} if arch == "gpt2" else {}
    make_adapter(model, tmp_path, invocation=invocation_ids(tokenizer), seed=1, **gpt2_layers)
    rt = fresh_runtime(arch)
    rt.add_adapter("check", tmp_path)
    ref = peft_reference(arch, tmp_path)
    ctx = context()
    rt.generate(ctx, 1)
    ids = rt.token_ids(ctx, adapter="check")
    res = rt.generate(ctx, 6, adapter="check")
    assert res.stats.cached_tokens == len(rt.token_ids(ctx))
    assert res.token_ids == reference_tokens(ref, ids, 6)
    torch.testing.assert_close(rt.next_token_logits(ctx, adapter="check"), reference_logits(ref, ids),
                               atol=ATOL, rtol=0)


def test_alora_cold_then_repeated(setup):
    arch, alora, _ = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora)
    ref = peft_reference(arch, alora)
    ctx = context()
    ids = rt.token_ids(ctx, adapter="check")
    cold = rt.generate(ctx, 6, adapter="check")
    assert cold.stats.cached_tokens == 0
    again = rt.generate(ctx, 6, adapter="check")  # the invocation is stored under the adapter's keys
    assert again.stats.computed_tokens == 1
    assert cold.token_ids == again.token_ids == reference_tokens(ref, ids, 6)
    # the cold call stored the context under base keys: a base call reuses it
    assert rt.generate(ctx, 4).stats.cached_tokens == len(rt.token_ids(ctx)) - 1


@pytest.mark.parametrize("layout", ["own span", "inside a span"])
def test_context_that_already_ends_with_the_invocation(setup, layout):
    arch, alora, _ = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora)
    ref = peft_reference(arch, alora)
    ctx = context()
    ctx = ctx.append(INVOCATION) if layout == "own span" else ctx.append(f"Check it. {INVOCATION}")
    ids = rt.token_ids(ctx)
    assert rt.token_ids(ctx, adapter="check") == ids  # not appended twice
    rt.generate(ctx, 4)  # stores the invocation's BASE KV under base keys: it must not be reused
    res = rt.generate(ctx, 6, adapter="check")
    assert res.stats.computed_tokens >= len(invocation_ids(rt.tokenizer))
    assert res.token_ids == reference_tokens(ref, ids, 6)
    torch.testing.assert_close(rt.next_token_logits(ctx, adapter="check"), reference_logits(ref, ids),
                               atol=ATOL, rtol=0)


def test_lora_spans_live_under_the_adapter_namespace(setup):
    arch, _, lora = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("style", lora)
    ref = peft_reference(arch, lora)
    ctx = context()
    ids = rt.token_ids(ctx)
    assert rt.token_ids(ctx, adapter="style") == ids
    rt.generate(ctx, 4)  # base entries for every span of ctx
    first = rt.generate(ctx, 6, adapter="style")
    assert first.stats.cached_tokens == 0  # base KV is never used for a LoRA
    second = rt.generate(ctx.append(" Be brief."), 6, adapter="style")
    assert second.stats.cached_tokens == len(ids)  # its own entries are
    assert first.token_ids == reference_tokens(ref, ids, 6)
    torch.testing.assert_close(rt.next_token_logits(ctx, adapter="style"), reference_logits(ref, ids),
                               atol=ATOL, rtol=0)
    assert (reference_logits(ref, ids) - reference_logits(rt.model, ids)).abs().max() > 1e-2


def test_base_calls_are_untouched_by_adapter_calls(setup):
    arch, alora, lora = setup
    rt = fresh_runtime(arch)
    namespace = rt.namespace
    contexts = [context(), context().append(INVOCATION), spanctx.Context().append("Other text.")]

    def base_outputs():
        return [(rt.generate(c, 4).token_ids, rt.next_token_logits(c), rt.next_token_logits(c, reuse=False))
                for c in contexts]

    before = base_outputs()
    rt.add_adapter("check", alora)
    rt.add_adapter("style", lora)
    assert rt.namespace == namespace
    for c in contexts:
        rt.generate(c, 4, adapter="style")
        rt.generate(c, 4, adapter="check")
        "".join(rt.stream(c, 4, adapter="check"))
        rt.check(c, ["Is short."], adapter="check")
    after = base_outputs()
    rt.unload_adapter("check")
    rt.unload_adapter("style")
    assert not any(isinstance(m, LoraLayer) for m in rt.model.modules())
    unloaded = base_outputs()
    for b, a, u in zip(before, after, unloaded):
        assert b[0] == a[0] == u[0]
        for x, y, z in zip(b[1:], a[1:], u[1:]):
            assert torch.equal(x, y) and torch.equal(x, z)
    assert model_namespace(rt.model) == namespace


def test_lora_and_alora_mixed(setup):
    arch, alora, lora = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora)
    rt.add_adapter("style", lora)
    infos = rt.list_adapters()
    assert list(infos) == ["check", "style"]
    assert infos["check"].is_alora and not infos["style"].is_alora
    assert len({rt.namespace, infos["check"].namespace, infos["style"].namespace}) == 3
    refs = {"check": peft_reference(arch, alora), "style": peft_reference(arch, lora), None: tiny_model(arch)[0]}
    ctx = context()
    for adapter in ["check", None, "style", "check"]:
        ids = rt.token_ids(ctx, adapter=adapter)
        assert rt.generate(ctx, 6, adapter=adapter).token_ids == reference_tokens(refs[adapter], ids, 6)
    rt.unload_adapter("style")
    assert list(rt.list_adapters()) == ["check"]
    ids = rt.token_ids(ctx, adapter="check")
    torch.testing.assert_close(rt.next_token_logits(ctx, adapter="check"), reference_logits(refs["check"], ids),
                               atol=ATOL, rtol=0)
    with pytest.raises(AdapterError, match="no adapter named 'style'"):
        rt.generate(ctx, 4, adapter="style")


def test_switching_agrees_with_peft(setup):
    arch, alora, lora = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora)
    rt.add_adapter("style", lora)
    layers = [m for m in rt.model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(layer.disable_adapters for layer in layers)
    for name in ["style", "check"]:
        _, activation = rt.resolve(context(), adapter=name)
        with rt.activated(activation):
            assert all(layer.active_adapters == [name] and not layer.disable_adapters for layer in layers)
        assert all(layer.disable_adapters for layer in layers)


def test_stream_with_an_adapter(setup):
    arch, alora, _ = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora)
    ctx = context()
    assert "".join(rt.stream(ctx, 6, adapter="check")) == rt.generate(ctx, 6, adapter="check").text


def test_alora_prompt_keys():
    model, tokenizer = tiny_model("llama")
    rt = spanctx.Runtime(model, tokenizer, store_bytes=1 << 20)
    inv = (7, 8, 9)
    adapter_ns = b"adapter"

    def resolve(ctx):
        return rt.resolver.resolve(ctx, adapter_namespace=adapter_ns, invocation=inv)

    plain_ctx = spanctx.Context().append([1, 2]).append([3, 4])
    plain = rt.resolver.resolve(plain_ctx)
    prompt = resolve(plain_ctx)
    assert (prompt.invocation_start, prompt.token_ids) == (plain.num_tokens, plain.token_ids + inv)
    assert prompt.segments[:-1] == plain.segments
    assert prompt.segments[-1].key == span_key(plain.segments[-1].key, inv, adapter_ns)
    # ends with the invocation inside its last span: the span is cut where it starts
    cut_ctx = spanctx.Context().append([1, 2]).append([3, 7, 8, 9])
    cut = rt.resolver.resolve(cut_ctx)
    prompt = resolve(cut_ctx)
    assert (prompt.invocation_start, prompt.token_ids) == (cut.num_tokens - 3, cut.token_ids)
    assert prompt.segments[:-2] == cut.segments[:-1]
    head = prompt.segments[-2]
    assert (head.num_tokens, head.key) == (1, span_key(cut.segments[-2].key, (3,), rt.namespace))
    assert prompt.segments[-1].key == span_key(head.key, inv, adapter_ns)
    # the invocation as its own span: that span's base key is dropped, not reused
    own_ctx = spanctx.Context().append([1, 2]).append(inv)
    own = rt.resolver.resolve(own_ctx)
    prompt = resolve(own_ctx)
    assert prompt.segments[-1].key not in {s.key for s in own.segments}


# -- bad input ---------------------------------------------------------------------------

def test_bad_adapter_folders(tmp_path, setup):
    arch, alora, lora = setup
    rt = fresh_runtime(arch)
    rt.generate(context(), 1)  # store the context: later calls reuse it
    before = rt.next_token_logits(context())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rt.add_adapter("x", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        rt.add_adapter("x", tmp_path)
    with pytest.raises(AdapterError, match="tokenizes to"):
        rt.add_adapter("x", alora, invocation="<|im_start|>assistant")
    with pytest.raises(AdapterError, match="plain LoRA"):
        rt.add_adapter("x", lora, invocation=INVOCATION)
    rt.add_adapter("x", lora)
    with pytest.raises(AdapterError, match="loaded already"):
        rt.add_adapter("x", alora)
    rt.unload_adapter("x")
    for adapter in (None, 3, "nope"):
        with pytest.raises(AdapterError, match="no adapter named"):
            rt.unload_adapter(adapter)
    for call in (lambda: rt.generate(context(), 2, adapter="nope"),
                 lambda: rt.next_token_logits(context(), adapter="nope"),
                 lambda: rt.check(context(), ["Short."], adapter="nope")):
        with pytest.raises(AdapterError, match="no adapter named 'nope'"):
            call()
    assert rt.list_adapters() == {}
    assert not any(isinstance(m, LoraLayer) for m in rt.model.modules())
    assert torch.equal(rt.next_token_logits(context()), before)


def test_adapters_for_another_base_model(tmp_path):
    rt = fresh_runtime("llama")
    _, tokenizer = tiny_model("llama")
    narrow, _ = spanctx.load_preset("tiny-llama", hidden_size=64, intermediate_size=128)
    make_adapter(narrow, tmp_path / "narrow")
    with pytest.raises(AdapterError, match="size 64.*another base model"):
        rt.add_adapter("x", tmp_path / "narrow")
    gpt2, _ = tiny_model("gpt2")
    make_adapter(gpt2, tmp_path / "gpt2", target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(AdapterError, match="does not have: the adapter is for another base model"):
        rt.add_adapter("x", tmp_path / "gpt2")
    assert not any(isinstance(m, LoraLayer) for m in rt.model.modules())
    # same shapes, another name: loaded, with a warning
    model, _ = tiny_model("llama")
    make_adapter(model, tmp_path / "named")
    config_file = tmp_path / "named" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "base_model_name_or_path": "org/other-model"}))
    rt.model.config._name_or_path = "/models/tiny-llama"
    with pytest.warns(UserWarning, match="trained on 'org/other-model'"):
        rt.add_adapter("x", tmp_path / "named")
    assert "x" in rt.list_adapters()


def test_a_failed_load_leaves_the_model_as_it_was(setup, monkeypatch, tmp_path):
    arch, alora, lora = setup
    rt = fresh_runtime(arch)
    rt.generate(context(), 1)
    before = rt.next_token_logits(context())

    def broken(self, name):
        raise RuntimeError("disk on fire")

    for loaded in ([], ["style"]):  # the first adapter (PEFT wraps the model) and a later one
        for name in loaded:
            rt.add_adapter(name, lora)
        with monkeypatch.context() as patch:
            patch.setattr(AdapterSet, "_fingerprint", broken)
            with pytest.raises(RuntimeError, match="disk on fire"):
                rt.add_adapter("check", alora)
        assert list(rt.list_adapters()) == loaded
        assert all("check" not in layer.lora_A for layer in rt.model.modules() if isinstance(layer, LoraLayer))
        assert torch.equal(rt.next_token_logits(context()), before)
    rt.unload_adapter("style")
    assert not any(isinstance(m, LoraLayer) for m in rt.model.modules())
    config_file = tmp_path / "adapter_config.json"
    make_adapter(tiny_model(arch)[0], tmp_path, invocation=[5, 99999])
    with pytest.raises(AdapterError, match="not token ids"):
        rt.add_adapter("x", tmp_path)
    assert config_file.is_file()


def test_refused_adapter_kinds(tmp_path):
    rt = fresh_runtime("llama")
    model, tokenizer = tiny_model("llama")
    inv = invocation_ids(tokenizer)
    for adapter_invocation in (inv, None):
        make_adapter(model, tmp_path / "saves", invocation=adapter_invocation, modules_to_save=["lm_head"])
        with pytest.raises(AdapterError, match="modules_to_save"):
            rt.add_adapter("x", tmp_path / "saves")
    make_adapter(model, tmp_path / "bias", bias="all")
    with pytest.raises(AdapterError, match="biases"):
        rt.add_adapter("x", tmp_path / "bias")
    ia3 = get_peft_model(copy.deepcopy(model), IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj"],
                                                         feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(AdapterError, match="IA3 adapter"):
        rt.add_adapter("x", tmp_path / "ia3")
    assert rt.list_adapters() == {}


# -- aLoRA invocation inside the prompt (alora_start="in_prompt") ------------------------

def in_prompt_context(occurrences: int) -> spanctx.Context:
    """A conversation-like context whose invocation sits inside, followed by more text."""
    ctx = context()
    for i in range(occurrences):
        ctx = ctx.append(f"Answer {i}. ").append(f"{INVOCATION}: is it short? Reply now.")
    return ctx


@pytest.mark.parametrize("occurrences", [1, 2])
def test_alora_from_the_last_invocation_inside_the_prompt_matches_peft(setup, occurrences):
    arch, alora, _ = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora, alora_start="in_prompt")
    ref = peft_reference(arch, alora)
    ctx = in_prompt_context(occurrences)
    ids = rt.token_ids(ctx)
    assert rt.token_ids(ctx, adapter="check") == ids  # nothing appended
    inv = tuple(invocation_ids(rt.tokenizer))
    start = max(i for i in range(len(ids)) if tuple(ids[i:i + len(inv)]) == inv)
    before = ctx.parent  # every span before the last one: it ends before the last invocation
    rt.next_token_logits(before)  # stores the base spans
    res = rt.generate(ctx, 6, adapter="check")
    assert res.stats.cached_tokens == len(rt.token_ids(before)) == start
    assert res.token_ids == reference_tokens(ref, ids, 6)
    logits = rt.next_token_logits(ctx, adapter="check")
    torch.testing.assert_close(logits, reference_logits(ref, ids), atol=ATOL, rtol=0)
    assert (logits - reference_logits(rt.model, ids)).abs().max() > 1e-2  # the adapter ran
    assert rt.generate(ctx, 6, adapter="check", reuse=False).token_ids == res.token_ids


def test_alora_in_prompt_refuses_a_prompt_without_the_invocation(setup):
    arch, alora, _ = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora, alora_start="in_prompt")
    with pytest.raises(ValueError, match="does not hold the aLoRA's invocation"):
        rt.generate(context(), 2, adapter="check")
    with pytest.raises(AdapterError, match="alora_start is one of"):
        rt.add_adapter("other", alora, alora_start="end")


def test_alora_prompt_keys_in_prompt():
    model, tokenizer = tiny_model("llama")
    rt = spanctx.Runtime(model, tokenizer, store_bytes=1 << 20)
    inv = (7, 8)
    adapter_ns = b"adapter"
    ctx = spanctx.Context().append([1, 7, 8, 2]).append([3, 7, 8, 4, 5])
    base = rt.resolver.resolve(ctx)
    prompt = rt.resolver.resolve(ctx, adapter_namespace=adapter_ns, invocation=inv, invocation_in_prompt=True)
    # the last of two occurrences
    assert (prompt.invocation_start, prompt.token_ids) == (base.num_tokens - 4, base.token_ids)
    assert prompt.segments[:-2] == base.segments[:-1]
    head = prompt.segments[-2]
    assert (head.num_tokens, head.key) == (1, span_key(base.segments[-2].key, (3,), rt.namespace))
    assert prompt.segments[-1].key == span_key(head.key, (7, 8, 4, 5), adapter_ns)
