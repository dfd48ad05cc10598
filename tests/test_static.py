"""The static executor (fixed KV buffers, bucketed steps) against full prefill, in fp32.

On CPU (CI) graphs are off: the steps that a GPU captures run as plain forwards with the
same padded buckets, masks and buffers, so everything but the capture is exercised.
``SPANCTX_TEST_DEVICE=cuda`` runs the same tests on a GPU with graphs on (by hand, on the
device machine: CI has no GPU).
"""

import functools
import os

import pytest
import torch
from conftest import ARCHS, tiny_model
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

import spanctx
from spanctx.cache.kv import KVSlice, as_slices, empty_cache
from spanctx.core.options import merge_options
from spanctx.engine.static import Row, StaticExecutor
from spanctx.engine.static_layout import suffix_bucket
from spanctx.hf import cache_kwargs

ATOL = 1e-4
DEVICE = torch.device(os.environ.get("SPANCTX_TEST_DEVICE", "cpu"))
MODELS = {**ARCHS, "phi3": ("tiny-phi3", {})}
PLAIN = [arch for arch in MODELS if arch != "gemma2"]  # gemma2 soft-caps its attention logits


@functools.cache
def model_of(arch: str):
    if arch in ARCHS:
        return tiny_model(arch)[0].to(DEVICE)
    preset, overrides = MODELS[arch]
    torch.manual_seed(0)
    return spanctx.load_preset(preset, device=DEVICE, dtype=torch.float32, **overrides)[0]


def ids_of(n: int, seed: int = 0, rows: int = 1) -> torch.Tensor:
    return torch.randint(3, 250, (rows, n), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def on_device(values) -> torch.Tensor:
    return torch.tensor(values, device=DEVICE)


def prefix_of(model, ids: torch.Tensor, end: int, cuts=()) -> list[KVSlice]:
    """The KV of ``ids[:, :end]`` by a plain HF forward, as slices cut at ``cuts``."""
    with torch.inference_mode():
        cache = empty_cache()
        model(input_ids=ids[:, :end], use_cache=True, **cache_kwargs(model, cache))
    span, bounds = as_slices(cache), [0, *cuts, end]
    return [KVSlice(span, a, b) for a, b in zip(bounds, bounds[1:])]


def full_logits(model, ids: torch.Tensor, keep: int) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits[:, -keep:].float()


def hf_generate(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)


def one(prefix, ids: torch.Tensor, start: int, offset=None) -> list[Row]:
    """The rows of ``ids [B, S]``, each after ``prefix`` (a row's aLoRA ``offset``: a list per row)."""
    offsets = offset if offset is not None else [None] * ids.shape[0]
    return [Row(row, prefix, start, o) for row, o in zip(ids, offsets)]


def options(**kwargs):
    return merge_options({}, kwargs)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("attention", ["hf", "split"])
def test_logits_and_greedy_tokens_match_full_prefill(arch, attention):
    if attention == "split" and arch not in PLAIN:
        pytest.skip("split attention computes plain softmax attention")
    model = model_of(arch)
    ex = StaticExecutor(model, max_tokens=128, attention=attention)
    ids = ids_of(40, seed=1)  # crosses the sliding windows of 16
    prefix = prefix_of(model, ids, 29, cuts=(11,))
    out = ex.forward(one(prefix, ids, 29), logits_to_keep=3)
    torch.testing.assert_close(out.logits.float(), full_logits(model, ids, 3), atol=ATOL, rtol=0)
    generated = ex.generate(one(prefix, ids, 29), options=options(max_new_tokens=6))
    assert generated.sequences.tolist() == hf_generate(model, ids, max_new_tokens=6, do_sample=False).tolist()
    assert generated.stats.attention == attention
    assert generated.stats.path == ("graph" if DEVICE.type == "cuda" else "eager")


def test_prompt_kv_is_the_prompts_cache():
    model = model_of("llama")
    ids = ids_of(30)
    ex = StaticExecutor(model, max_tokens=64)
    out = ex.forward(one(prefix_of(model, ids, 20), ids, 20))
    full = prefix_of(model, ids, 30)[0].kv
    for got, want in zip((*out.kv.keys, *out.kv.values), (*full.keys, *full.values)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_buckets_are_built_once_and_reused():
    model = model_of("llama")
    ex = StaticExecutor(model, max_tokens=512)
    ids = ids_of(60)
    prefix = prefix_of(model, ids, 40)
    first = ex.generate(one(prefix, ids, 40), options=options(max_new_tokens=3))  # tail of 20: bucket 32
    assert (first.stats.suffix_bucket, first.stats.builds) == (32, 2)  # the tail's bucket and the decode's
    again = ex.generate(one(prefix_of(model, ids, 35), ids, 35), options=options(max_new_tokens=3))  # tail of 25
    assert (again.stats.suffix_bucket, again.stats.cache_bucket) == (32, first.stats.cache_bucket)
    assert again.stats.builds == 0
    longer = ex.generate(one(prefix, ids, 40), options=options(max_new_tokens=300))  # another cache bucket
    assert longer.stats.cache_bucket > first.stats.cache_bucket and longer.stats.builds == 2
    assert ex.build_stats.builds == 4


def test_a_long_tail_runs_unpadded(monkeypatch):
    from spanctx.engine import static, static_warmup

    for module in (static, static_warmup):  # tails past it run without a graph (and unpadded)
        monkeypatch.setattr(module, "GRAPH_TOKENS", 512)
    model = model_of("llama")
    ex = StaticExecutor(model, max_tokens=1024)
    ids = ids_of(600, seed=8)
    out = ex.forward(one(prefix_of(model, ids, 10), ids, 10))
    assert out.stats.suffix_bucket == 590
    torch.testing.assert_close(out.logits.float(), full_logits(model, ids, 1), atol=ATOL, rtol=0)


def test_bucket_sizes():
    assert [suffix_bucket(n) for n in (1, 2, 16, 17, 64, 65)] == [1, 16, 16, 32, 64, 128]


def test_a_prefix_already_in_place_is_not_copied_again_and_a_new_one_is():
    model = model_of("llama")
    ex = StaticExecutor(model, max_tokens=128)
    ids, other = ids_of(30, seed=1), ids_of(30, seed=2)
    prefix = prefix_of(model, ids, 20, cuts=(8,))
    assert ex.forward(one(prefix, ids, 20)).stats.copied_tokens == 20
    assert ex.forward(one(prefix, ids, 20)).stats.copied_tokens == 0
    assert ex.forward(one(prefix[:1], ids, 8)).stats.copied_tokens == 0  # the first slice is still in place
    out = ex.forward(one(prefix_of(model, other, 20, cuts=(8,)), other, 20))  # same slots, other tensors
    assert out.stats.copied_tokens == 20
    torch.testing.assert_close(out.logits.float(), full_logits(model, other, 1), atol=ATOL, rtol=0)
    # the tail of the last call overwrote slots 20.., so the first prompt's KV must come back
    out = ex.forward(one(prefix, ids, 20))
    assert out.stats.copied_tokens == 20
    torch.testing.assert_close(out.logits.float(), full_logits(model, ids, 1), atol=ATOL, rtol=0)


def test_sampling_with_a_seed_is_reproducible_and_matches_hf():
    model = model_of("llama")
    ex = StaticExecutor(model, max_tokens=128)
    ids = ids_of(30)
    prefix = prefix_of(model, ids, 20)
    sampled = [ex.generate(one(prefix, ids, 20), options=options(max_new_tokens=8, seed=seed, temperature=0.7,
                                                            top_p=0.9)).sequences for seed in (5, 5, 6)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])
    torch.manual_seed(5)
    reference = hf_generate(model, ids, max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9)
    assert torch.equal(sampled[0], reference)


class _Ban(LogitsProcessor):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores):
        scores[:, self.token] = -float("inf")
        return scores


class _StopAfter(StoppingCriteria):
    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool,
                          device=input_ids.device)


def test_processors_criteria_and_eos_follow_hf_generate():
    model = model_of("llama")
    ex = StaticExecutor(model, max_tokens=128)
    ids = ids_of(30)
    prefix = prefix_of(model, ids, 20)
    greedy = hf_generate(model, ids, max_new_tokens=8, do_sample=False)[0, 30:].tolist()
    kwargs = dict(repetition_penalty=1.3, logits_processor=LogitsProcessorList([_Ban(greedy[0])]),
                  stopping_criteria=StoppingCriteriaList([_StopAfter(36)]))
    got = ex.generate(one(prefix, ids, 20), options=options(max_new_tokens=8, **kwargs)).sequences
    assert got.tolist() == hf_generate(model, ids, max_new_tokens=8, do_sample=False, **kwargs).tolist()
    assert got.shape[1] == 36 and got[0, 30] != greedy[0]
    eos = greedy[2]  # the third greedy token ends the answer
    got = ex.generate(one(prefix, ids, 20), options=options(max_new_tokens=8, eos_token_id=eos)).sequences
    assert got.tolist() == hf_generate(model, ids, max_new_tokens=8, do_sample=False, eos_token_id=eos).tolist()
    assert got[0, -1] == eos and got.shape[1] <= 33


class _Recorder(BaseStreamer):
    def __init__(self) -> None:
        self.puts, self.ended = [], 0

    def put(self, value) -> None:
        self.puts.append(value.tolist())

    def end(self) -> None:
        self.ended += 1


def test_the_streamer_gets_the_prompt_then_each_token():
    model = model_of("llama")
    ex = StaticExecutor(model, max_tokens=128)
    ids = ids_of(30)
    streamer = _Recorder()
    out = ex.generate(one(prefix_of(model, ids, 20), ids, 20), options=options(max_new_tokens=5), streamer=streamer)
    assert streamer.puts[0] == ids.tolist() and streamer.ended == 1
    assert [p[0] for p in streamer.puts[1:]] == out.sequences[0, 30:].tolist()


@pytest.mark.parametrize("attention", ["hf", "split"])
def test_packed_rows_with_their_own_prefixes_equal_each_row_alone(attention):
    model = model_of("mistral")  # a sliding window: it follows positions, not slots
    ex = StaticExecutor(model, max_tokens=256, attention=attention)
    short, long = ids_of(24, seed=3), ids_of(34, seed=4)
    rows = [Row(short[0], prefix_of(model, short, 16), 16), Row(long[0], prefix_of(model, long, 26, cuts=(13,)), 26)]
    out = ex.generate(rows, options=options(max_new_tokens=5))
    assert out.packing.shared_tokens == 0 and out.stats.rows == 2
    for row, alone in enumerate((short, long)):
        want = hf_generate(model, alone, max_new_tokens=5, do_sample=False)[0, alone.shape[1]:]
        assert out.sequences[row, 34:].tolist() == want.tolist()
    assert out.sequences[0, :10].tolist() == [model.generation_config.pad_token_id or 0] * 10  # left padding
    logits = ex.forward(rows).logits
    for row, alone in enumerate((short, long)):
        torch.testing.assert_close(logits[row].float(), full_logits(model, alone, 1)[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", PLAIN)
def test_rows_sharing_a_prefix_lay_it_once_and_equal_each_row_alone(arch):
    model = model_of(arch)
    ex = StaticExecutor(model, max_tokens=256, attention="split")
    context = ids_of(30, seed=11)
    shared = prefix_of(model, context, 30, cuts=(12,))
    tails = [ids_of(n, seed=20 + n) for n in (3, 9, 5)]
    prompts = [torch.cat([context, tail], dim=1) for tail in tails]
    rows = [Row(p[0], shared, 30) for p in prompts]
    out = ex.forward(rows, logits_to_keep=0)  # every tail token, row r's first
    assert out.packing.shared_tokens == 30 and out.logits.shape[:2] == (3, 9)
    for r, p in enumerate(prompts):
        n = tails[r].shape[1]
        torch.testing.assert_close(out.logits[r, :n].float(), full_logits(model, p, n)[0], atol=ATOL, rtol=0)
        assert not out.logits[r, n:].any()
    generated = ex.generate(rows, options=options(max_new_tokens=4))
    width = max(p.shape[1] for p in prompts)
    for r, p in enumerate(prompts):  # a row that ends (EOS) early is padded after it, as in HF's batches
        want = hf_generate(model, p, max_new_tokens=4, do_sample=False)[0, p.shape[1]:]
        assert generated.sequences[r, width:width + len(want)].tolist() == want.tolist()
    # the rows' tails are where the packing says: a row's KV is its prompt's
    full = prefix_of(model, prompts[1], prompts[1].shape[1])[0].kv
    base = generated.packing.bases[1] - 30
    torch.testing.assert_close(generated.kv.keys[0][0, :, base + 30:base + 39], full.keys[0][0, :, 30:39],
                               atol=ATOL, rtol=0)


def test_what_it_refuses_and_why():
    model = model_of("llama")
    ex = StaticExecutor(model, max_tokens=100)
    assert ex.max_tokens == 256  # rounded up to whole attention buckets
    ids = ids_of(30)
    assert ex.refuses_rows(one([], ids, 0), new_tokens=200, options=options()) is None
    assert "slots" in ex.refuses_rows(one([], ids, 0), new_tokens=240)
    assert "slots" in ex.refuses_rows(one([], ids_of(30, rows=3), 0), new_tokens=60)  # 3 x 30 + 3 x 60 > 256
    assert "rows" in ex.refuses_rows(one([], ids_of(3, rows=65), 0))
    assert "no_repeat_ngram_size" in ex.refuses_rows(one([], ids, 0), options=options(no_repeat_ngram_size=2))
    assert "stop_strings" in ex.refuses_rows(one([], ids, 0), options=options(stop_strings=["x"]))
    with pytest.raises(ValueError, match="slots"):
        ex.generate(one([], ids, 0), options=options(max_new_tokens=240))
    with pytest.raises(ValueError, match="covers 10 tokens"):
        one(prefix_of(model, ids, 10), ids, 20)
    with pytest.raises(ValueError, match="at least one"):
        one(prefix_of(model, ids, 30), ids, 30)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA model"):
            StaticExecutor(model, max_tokens=64, graphs=True)
    with pytest.raises(ValueError, match="soft-capping"):
        StaticExecutor(model_of("gemma2"), max_tokens=64, attention="split")
    with pytest.raises(ValueError, match="must be one of"):
        StaticExecutor(model, max_tokens=64, attention="flash")
    with pytest.raises(ValueError, match="power of two"):
        StaticExecutor(model, max_tokens=64, attention="split", chunks=3)


@pytest.mark.parametrize("chunks", [1, 4, 64])
def test_split_attention_in_pieces_matches_full_prefill(chunks):
    """A fixed piece count caps the split: a bucket too short for it runs in fewer pieces
    (64 pieces of 16 slots need 1024; these buckets are shorter), exact either way."""
    model = model_of("llama")
    ex = StaticExecutor(model, max_tokens=128, attention="split", chunks=chunks)
    ids = ids_of(40, seed=2)
    prefix = prefix_of(model, ids, 29)
    out = ex.forward(one(prefix, ids, 29), logits_to_keep=3)
    torch.testing.assert_close(out.logits.float(), full_logits(model, ids, 3), atol=ATOL, rtol=0)


def test_a_call_of_the_most_rows_runs():
    """64 rows (``MAX_ROWS``): the last row's owner bit is the sign bit of the int64 owners."""
    model = model_of("llama")
    ex = StaticExecutor(model, max_tokens=1024)
    ids = ids_of(5, seed=3, rows=64)
    out = ex.forward(one([], ids, 0))
    torch.testing.assert_close(out.logits[-1].float(), full_logits(model, ids[-1:], 1)[0], atol=ATOL, rtol=0)


def test_a_generation_config_that_switches_on_other_processors_is_refused():
    model = model_of("llama")
    ex = StaticExecutor(model, max_tokens=64)
    model.generation_config.no_repeat_ngram_size = 2
    try:
        assert "no_repeat_ngram_size" in ex.refuses_rows(one([], ids_of(5), 0), options=options())
    finally:
        model.generation_config.no_repeat_ngram_size = None


def test_the_model_is_left_as_it_was():
    model = model_of("llama")
    implementation, ids = model.config._attn_implementation, ids_of(20)
    before = full_logits(model, ids, 20)
    ex = StaticExecutor(model, max_tokens=64)
    ex.generate(one(prefix_of(model, ids, 10), ids, 10), options=options(max_new_tokens=2))
    assert model.config._attn_implementation == implementation
    assert torch.equal(full_logits(model, ids, 20), before)


# -- adapters -------------------------------------------------------------------------------


def adapted(tmp_path, invocation: bool):
    """(PEFT model with a random LoRA or aLoRA switched on, its invocation ids)."""
    from adapter_helpers import invocation_ids, make_adapter, peft_reference

    tokenizer = tiny_model("llama")[1]
    inv = invocation_ids(tokenizer) if invocation else None
    folder = make_adapter(tiny_model("llama")[0], tmp_path / "adapter", invocation=inv, seed=3)
    return peft_reference("llama", folder).to(DEVICE), inv


@pytest.mark.parametrize("attention", ["hf", "split"])
def test_alora_rows_match_peft_full_prefill(tmp_path, attention):
    peft_model, inv = adapted(tmp_path, invocation=True)
    model = peft_model.get_base_model()  # the adapted modules, adapter switched on
    ids = torch.cat([ids_of(25, seed=5), on_device([inv]), ids_of(4, seed=6)], dim=1)
    start, prompt = 25, ids.shape[1]
    prefix = prefix_of(model_of("llama"), ids, 20)  # base KV: it ends before the invocation
    ex = StaticExecutor(model, max_tokens=128, attention=attention)
    out = ex.forward(one(prefix, ids, 20, offset=[prompt - start]), logits_to_keep=3)
    with torch.inference_mode():
        want = peft_model(input_ids=ids).logits[:, -3:].float()  # PEFT finds the invocation itself
        base = model_of("llama")(input_ids=ids).logits[:, -3:].float()
    torch.testing.assert_close(out.logits.float(), want, atol=ATOL, rtol=0)
    assert (want - base).abs().max() > 1e-2  # the adapter matters here
    generated = ex.generate(one(prefix, ids, 20, offset=[prompt - start]), options=options(max_new_tokens=5))
    assert generated.sequences.tolist() == hf_generate(peft_model, ids, max_new_tokens=5, do_sample=False).tolist()
    # no offsets: no row is adapted (PEFT's rule), and that is another graph key
    plain = ex.forward(one(prefix, ids, 20), logits_to_keep=3)
    torch.testing.assert_close(plain.logits.float(), base, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="outside the"):
        ex.forward(one(prefix, ids, 20, offset=[prompt + 1]))


def test_alora_rows_sharing_a_base_prefix(tmp_path):
    peft_model, inv = adapted(tmp_path, invocation=True)
    model, base = peft_model.get_base_model(), model_of("llama")
    context = ids_of(20, seed=8)
    shared = prefix_of(base, context, 20)  # base KV: it ends before every row's invocation
    prompts = [torch.cat([context, ids_of(n, seed=n), on_device([inv + [40, 41]])], dim=1) for n in (2, 6)]
    offsets = [len(inv) + 2] * 2
    ex = StaticExecutor(model, max_tokens=128)
    rows = [Row(p[0], shared, 20, o) for p, o in zip(prompts, offsets)]
    out = ex.forward(rows)
    generated = ex.generate(rows, options=options(max_new_tokens=4))
    width = max(p.shape[1] for p in prompts)
    for r, p in enumerate(prompts):
        with torch.inference_mode():
            want = peft_model(input_ids=p).logits[:, -1].float()
        torch.testing.assert_close(out.logits[r].float(), want, atol=ATOL, rtol=0)
        tokens = hf_generate(peft_model, p, max_new_tokens=4, do_sample=False)[0, p.shape[1]:]
        assert generated.sequences[r, width:].tolist() == tokens.tolist()


def test_a_plain_lora_runs_and_the_adapter_state_keys_the_buckets(tmp_path):
    peft_model, _ = adapted(tmp_path, invocation=False)
    model = peft_model.get_base_model()
    ids = ids_of(30, seed=7)
    ex = StaticExecutor(model, max_tokens=128)
    on = ex.forward(one([], ids, 0))  # nothing reused: a LoRA changes every token's KV
    with torch.inference_mode():
        torch.testing.assert_close(on.logits.float(), peft_model(input_ids=ids).logits[:, -1:].float(),
                                   atol=ATOL, rtol=0)
    with peft_model.disable_adapter():
        off = ex.forward(one([], ids, 0))
    assert off.stats.builds == 1  # the same shapes, another adapter state: another bucket
    torch.testing.assert_close(off.logits.float(), full_logits(model_of("llama"), ids, 1), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="no aLoRA adapter"):
        ex.forward(one([], ids, 0, offset=[3]))


def test_a_dropped_executor_is_freed_at_once():
    # no reference cycle: its graphs go when it goes, never later inside another capture
    import gc
    import weakref

    model, ids = model_of("llama"), ids_of(20)
    ex = StaticExecutor(model, max_tokens=64)
    ex.generate(one([], ids, 0), options=options(max_new_tokens=2))
    collecting = gc.isenabled()
    gc.disable()
    try:
        dropped = weakref.ref(ex)
        del ex
        assert dropped() is None
    finally:
        if collecting:
            gc.enable()
