"""Encoder-decoder models (T5 and BART shapes): every reuse path against HF's own
``generate`` and full forward of the same source and decoder ids."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import spanctx
from spanctx.seq2seq import Seq2SeqRuntime

SOURCE = "translate English to German: the cat sat on the mat, and the dog watched it."
OTHER = "summarize: a much longer text about something else entirely."
CANDIDATES = ["die Katze", "der Hund sah zu", "x", [65, 66, 67], "eine Katze sass auf der Matte"]


@pytest.fixture(params=["tiny-t5", "tiny-bart"])
def preset(request):
    return request.param


@functools.cache
def _model(preset: str):
    return spanctx.load_preset(preset, model_class=__import__("transformers").AutoModelForSeq2SeqLM)


def runtime(preset: str, **kwargs) -> Seq2SeqRuntime:
    """A fresh runtime (empty store) over the shared tiny model of ``preset``."""
    model, tokenizer = _model(preset)
    return Seq2SeqRuntime(model, tokenizer, kwargs.pop("store_bytes", 64 << 20), **kwargs)


def decoder_ctx() -> spanctx.Context:
    return spanctx.Context().append("Die").append(" Katze")


def hf_logits(rt: Seq2SeqRuntime, source, decoder_ids) -> torch.Tensor:
    """``[S_dec, V]`` logits of one full HF forward (encoder and decoder from scratch)."""
    src = torch.tensor([rt.source_ids(source)])
    with torch.no_grad():
        return rt.model(input_ids=src, decoder_input_ids=torch.tensor([list(decoder_ids)])).logits[0]


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # fp32; random T5 logits reach ~70, so the bound scales with them (HF's own cached
    # decoding differs from its full forward by the same order)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * max(1.0, expected.abs().max().item()))


@contextlib.contextmanager
def counting(module: torch.nn.Module):
    """The yielded list gets the batch shape of each forward of ``module``."""
    calls: list[tuple[int, ...]] = []
    hook = module.register_forward_hook(lambda m, args, kwargs, out: calls.append(
        tuple((kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[:2])
        if kwargs else ()), with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()


@pytest.mark.parametrize("ctx", [None, "decoder prefix"])
def test_greedy_tokens_equal_hf_generate(preset, ctx):
    rt = runtime(preset)
    ctx = decoder_ctx() if ctx else None
    dec = rt.decoder_ids(ctx)
    src = torch.tensor([rt.source_ids(SOURCE)])
    with torch.no_grad():
        ref = rt.model.generate(input_ids=src, attention_mask=torch.ones_like(src),
                                decoder_input_ids=torch.tensor([list(dec)]), max_new_tokens=12, do_sample=False,
                                pad_token_id=rt.tokenizer.pad_token_id)[0, len(dec):].tolist()
    first = rt.generate(SOURCE, ctx, max_new_tokens=12)
    with counting(rt.model.get_encoder()) as encoder_calls, counting(rt.model.get_decoder()) as decoder_calls:
        second = rt.generate(SOURCE, ctx, max_new_tokens=12)
    assert encoder_calls == [] and decoder_calls[0] == (1, 1)  # the stored prompt is not fed again
    plain = rt.generate(SOURCE, ctx, max_new_tokens=12, reuse=False)
    assert list(first.token_ids) == list(second.token_ids) == list(plain.token_ids) == ref
    assert first.stats.cached_tokens == 0
    assert second.stats.cached_tokens == second.stats.prompt_tokens == src.shape[1] + len(dec)


def test_logits_equal_a_full_forward(preset):
    rt = runtime(preset)
    ctx = decoder_ctx()
    expected = hf_logits(rt, SOURCE, rt.decoder_ids(ctx))[-1]
    assert_logits_close(rt.next_token_logits(SOURCE, ctx), expected)  # computes and stores
    assert_logits_close(rt.next_token_logits(SOURCE, ctx), expected)  # all from the store
    assert_logits_close(rt.next_token_logits(SOURCE, ctx.append(" sass")),  # a shared decoder prefix
                        hf_logits(rt, SOURCE, rt.decoder_ids(ctx.append(" sass")))[-1])
    assert_logits_close(rt.next_token_logits(SOURCE), hf_logits(rt, SOURCE, rt.decoder_ids())[-1])
    assert_logits_close(rt.next_token_logits(OTHER, ctx), hf_logits(rt, OTHER, rt.decoder_ids(ctx))[-1])


def test_scores_equal_full_forwards_and_the_source_is_encoded_once(preset):
    rt = runtime(preset)
    ctx = decoder_ctx()
    dec = rt.decoder_ids(ctx)
    rt.generate(SOURCE, max_new_tokens=2)  # encodes the source
    with counting(rt.model.get_encoder()) as encoder_calls, counting(rt.model.get_decoder()) as decoder_calls:
        scores = rt.score(SOURCE, CANDIDATES, ctx)
    assert encoder_calls == []
    # one forward for the decoder prompt's missing spans, ONE over all candidates
    assert decoder_calls == [(1, len(dec) - 1), (len(CANDIDATES), max(len(s.token_ids) for s in scores))]
    for candidate, score in zip(CANDIDATES, scores):
        ids = rt.resolver.span_ids(spanctx.Span(candidate))
        assert score.token_ids == ids
        ref = torch.log_softmax(hf_logits(rt, SOURCE, dec + ids), dim=-1)
        expected = torch.tensor([ref[len(dec) - 1 + j, t] for j, t in enumerate(ids)])
        torch.testing.assert_close(torch.tensor(score.token_logprobs), expected, atol=1e-4, rtol=0)
    ranked = rt.rank(SOURCE, CANDIDATES, ctx, batch_size=2)
    assert [r.index for r in ranked] == sorted(range(len(scores)), key=lambda i: -scores[i].logprob)


def test_hidden_states_reduce_the_encoder_output(preset):
    rt = runtime(preset)
    with torch.no_grad():
        states = rt.model.get_encoder()(input_ids=torch.tensor([rt.source_ids(SOURCE)])).last_hidden_state[0]
    for reduction, expected in [("mean", states.mean(0)), ("sum", states.sum(0)), ("first", states[0]),
                                ("last", states[-1])]:
        torch.testing.assert_close(rt.hidden_states(SOURCE, reduction), expected, atol=1e-5, rtol=1e-5)
    with counting(rt.model.get_encoder()) as encoder_calls:
        rt.hidden_states(SOURCE, "mean")
    assert encoder_calls == []
    with pytest.raises(ValueError, match="reduction"):
        rt.hidden_states(SOURCE, "max")


def test_the_store_is_shared_bounded_and_namespaced(preset):
    rt = runtime(preset)
    rt.generate(SOURCE, max_new_tokens=1)
    assert rt.generate(SOURCE, max_new_tokens=1, salt="tenant-b").stats.cached_tokens == 0
    other = Seq2SeqRuntime(rt.model, rt.tokenizer, store=rt.store)  # same weights: shares the entries
    assert other.generate(SOURCE, max_new_tokens=1).stats.cached_tokens > 0
    small = runtime(preset, store_bytes=1024)  # nothing fits: every call computes, answers unchanged
    assert small.generate(SOURCE, max_new_tokens=6).token_ids == rt.generate(SOURCE, max_new_tokens=6).token_ids
    assert small.store.stats.entries == 0 and small.store.stats.rejected > 0


def test_unsupported_inputs_are_refused_with_the_reason(preset):
    rt = runtime(preset)
    with pytest.raises(ValueError, match="parallel groups are not supported"):
        rt.generate(SOURCE, spanctx.Context().parallel("a", "b"))
    with pytest.raises(ValueError, match="chat spans are not supported"):
        rt.generate(SOURCE, spanctx.Context.chat([{"role": "user", "content": "hi"}]))
    with pytest.raises(TypeError, match="bidirectional"):
        rt.generate(spanctx.Context().append(SOURCE))
    with pytest.raises(ValueError, match="num_beams"):
        rt.generate(SOURCE, num_beams=2)
    with pytest.raises(NotImplementedError, match="aLoRA"):
        rt.add_adapter("a", "/nowhere")
    with pytest.raises(ValueError, match="Seq2SeqRuntime"):
        spanctx.Runtime.from_pretrained(preset, device="cpu")
