"""spanctx as a Mellea backend (``spanctx.integrations.mellea``), offline on tiny models.

Against stock ``LocalHFBackend`` on the same weights: the same greedy replies, turn after
turn, with only the new tokens computed after the first turn. Against PEFT's own full
prefill: an aLoRA requirement check gives PEFT's tokens, log-probabilities and Mellea's
probability computed from them, and differs from the base model's.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import logging
from typing import Literal

import pytest

pytest.importorskip("mellea")
pytest.importorskip("mellea.backends.huggingface")  # the hf extra

import pydantic
import torch
from adapter_helpers import make_adapter
from conftest import tiny_model
from mellea import MelleaSession
from mellea.backends import ModelOption
from mellea.backends.huggingface import LocalHFBackend
from mellea.core import CBlock
from mellea.formatters.granite import IntrinsicsResultProcessor
from mellea.formatters.granite.base.util import generate_with_transformers
from mellea.stdlib.context import ChatContext
from mellea.stdlib.requirements import ALoraRequirement
from peft import PeftModel
from transformers.generation.utils import GenerateDecoderOnlyOutput

import spanctx
from spanctx.integrations.mellea import LocalIntrinsicAdapter, SpanctxBackend
from spanctx.integrations.mellea.prompts import conversation_context

CPU = torch.device("cpu")
INVOCATION = "<requirements>:"
# A stand-in for the hub's requirement-check io.yaml: the instruction is the last user
# message and opens with the aLoRA's invocation; {"score": "yes"|"no"} read by likelihood.
REQUIREMENT_CHECK_IO = {
    "model": None,
    "response_format": json.dumps({"type": "object", "properties": {"score": {"type": "string", "enum": ["yes", "no"]}},
                                   "required": ["score"], "additionalProperties": False}),
    "transformations": [
        {"type": "likelihood", "categories_to_values": {"yes": 1.0, "no": 0.0}, "input_path": ["score"]},
        {"type": "nest", "input_path": [], "field_name": "requirement_check"},
    ],
    "instruction": f"{INVOCATION} {{requirement}}\nDoes the last answer meet the requirement? Answer in JSON.",
    "parameters": {"max_completion_tokens": 128},
    "sentence_boundaries": None,
}


def _no_adapter_loaded(*_, **__):
    raise ValueError("No adapter loaded. Please load an adapter first.")


def backends():
    """(stock, spanctx) backends over their own copies of the same tiny model.

    Stock Mellea asks the model for its active adapters and switches them off around every
    call, and treats transformers' "No adapter loaded" as "none". On transformers >= 5.24
    both methods first demand peft >= 0.22, which does not exist yet (0.21.2 is the
    newest), so every stock call fails there. The stock copy answers as transformers does
    for a model without adapters once that peft exists; comparisons with adapters go to
    PEFT directly (below)."""
    model, tokenizer = tiny_model("llama")
    stock_model = copy.deepcopy(model)
    stock_model.active_adapters = stock_model.set_adapter = _no_adapter_loaded
    # use_caches=False: stock's own cache bookkeeping fails on transformers >= 5.24 (it deletes
    # the output's "past_key_values" entry, which that version keeps as "cache": KeyError)
    return (LocalHFBackend("tiny-llama", custom_config=(tokenizer, stock_model, CPU), use_caches=False),
            SpanctxBackend("tiny-llama", custom_config=(tokenizer, copy.deepcopy(model), CPU)))


def chat_turns(backend, questions, **options):
    """Each turn's (reply text, usage) of one session."""
    session = MelleaSession(backend, ctx=ChatContext())
    out = []
    for question in questions:
        reply = session.chat(question, model_options={ModelOption.MAX_NEW_TOKENS: 12, **options})
        out.append((reply.content, session.ctx.last_output().generation.usage))
    return out


def test_multi_turn_session_matches_stock_and_computes_only_new_tokens():
    stock, ours = backends()
    questions = ["What is 1+1?", "And 2+2?", "Thanks. One more: 3+3?", "Now in words, please."]
    expected, got = chat_turns(stock, questions), chat_turns(ours, questions)
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [u["prompt_tokens"] for _, u in got] == [u["prompt_tokens"] for _, u in expected]
    assert got[0][1]["prompt_tokens_details"]["cached_tokens"] == 0
    for (_, before), (_, usage) in itertools.pairwise(got):
        # everything of the previous turn's prompt is reused; computed: reply + question + generation prompt
        assert usage["prompt_tokens_details"]["cached_tokens"] == before["prompt_tokens"]
    counts = ours.token_counts()
    assert counts.calls == len(questions)
    assert counts.computed_tokens == got[-1][1]["prompt_tokens"]  # every prompt token computed once in the session


def test_default_length_and_seeded_sampling_are_mellea_s():
    stock, ours = backends()
    session_options = {ModelOption.SEED: 7, ModelOption.TEMPERATURE: 0.9}
    expected = chat_turns(stock, ["Tell me a story."], **session_options)
    got = chat_turns(ours, ["Tell me a story."], **session_options)
    assert got[0][0] == expected[0][0]  # the same draws as Mellea's global set_seed
    # no MAX_NEW_TOKENS: Hugging Face's default of 20 new tokens, as stock
    stock_session, our_session = MelleaSession(stock, ctx=ChatContext()), MelleaSession(ours, ctx=ChatContext())
    stock_session.chat("Count to fifty.")
    our_session.chat("Count to fifty.")
    assert (our_session.ctx.last_output().generation.usage["completion_tokens"]
            == stock_session.ctx.last_output().generation.usage["completion_tokens"])


class _Recording(SpanctxBackend):
    """Keeps the prompt ids, adapter and output of every call that arrives as ids."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.id_calls = []

    def _generate_ids(self, input_ids, adapter, hf_kwargs):
        output = super()._generate_ids(input_ids, adapter, hf_kwargs)
        self.id_calls.append((input_ids[0].tolist(), adapter, output))
        return output


def _teacher_forced_scores(model, ids: list[int], new: list[int], allowed: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` logits of a full prefill of ``ids + new`` at the new positions, with the
    grammar's mask ``allowed`` applied, as ``generate`` would have scored them."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids + new])).logits[0, len(ids) - 1: len(ids) - 1 + len(new)].float()
    return logits.masked_fill(~allowed, float("-inf"))


def _mellea_probability(tokenizer, ids: list[int], new: list[int], scores: torch.Tensor) -> float:
    """Mellea's requirement-check probability from these per-token scores (its own code)."""

    class _Scored:
        device = CPU

        def generate(self, input_ids, **kwargs):
            return GenerateDecoderOnlyOutput(sequences=torch.tensor([ids + new]), scores=tuple(s[None] for s in scores))

    response = generate_with_transformers(tokenizer, _Scored(), {"input_tokens": torch.tensor([ids])},
                                          {"top_logprobs": 10})
    processed = IntrinsicsResultProcessor(config_dict=REQUIREMENT_CHECK_IO).transform(response)
    return json.loads(processed.choices[0].message.content)["requirement_check"]["score"]


def test_requirement_check_runs_the_alora_on_the_reused_cache_and_matches_peft(tmp_path):
    model, tokenizer = tiny_model("llama")
    invocation = tokenizer(INVOCATION, add_special_tokens=False)["input_ids"]
    folder = make_adapter(model, tmp_path / "requirement-check", invocation=invocation, seed=3)
    backend = _Recording("tiny-llama", custom_config=(tokenizer, copy.deepcopy(model), CPU))
    backend.add_adapter(LocalIntrinsicAdapter("requirement-check", folder, REQUIREMENT_CHECK_IO))
    session = MelleaSession(backend, ctx=ChatContext())
    session.chat("Describe the river in one line.", model_options={ModelOption.MAX_NEW_TOKENS: 12})
    chat_prompt = backend.token_counts().prompt_tokens

    [verdict] = session.validate(ALoraRequirement("The answer is short."))
    probability = json.loads(verdict.reason)["requirement_check"]["score"]
    ids, adapter, output = backend.id_calls[-1]
    assert adapter == "requirement-check_alora"
    start = max(i for i in range(len(ids)) if ids[i:i + len(invocation)] == invocation)
    assert start + len(invocation) < len(ids) - 10  # inside the last message, not at the prompt's end
    counts = backend.token_counts()
    assert counts.cached_tokens == chat_prompt  # the conversation's KV came from the chat call

    new = output.sequences[0, len(ids):].tolist()
    scores = torch.stack([s[0] for s in output.scores])  # [N, V] after the grammar mask
    allowed = torch.isfinite(scores)
    peft = PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
    reference = _teacher_forced_scores(peft, ids, new, allowed)
    assert reference.argmax(-1).tolist() == new  # PEFT's full prefill picks the same tokens
    torch.testing.assert_close(scores.log_softmax(-1), reference.log_softmax(-1), atol=1e-4, rtol=0)
    expected = _mellea_probability(tokenizer, ids, new, reference)
    assert probability == pytest.approx(expected, abs=1e-4)
    assert bool(verdict) == (expected > 0.5)
    base = _mellea_probability(tokenizer, ids, new, _teacher_forced_scores(model, ids, new, allowed))
    assert abs(probability - base) > 1e-3  # the adapter ran: the base model scores it otherwise


async def _streamed_and_plain(backend, prompt: str) -> tuple[list[str], str, str]:
    options = {ModelOption.MAX_NEW_TOKENS: 16}
    streamed, _ = await backend.generate_from_context(CBlock(prompt), ChatContext(),
                                                      model_options={**options, ModelOption.STREAM: True})
    pieces = []
    while not streamed.is_computed():
        pieces.append(await streamed.astream())
    plain, _ = await backend.generate_from_context(CBlock(prompt), ChatContext(), model_options=options)
    return pieces, await streamed.avalue(), await plain.avalue()


def test_streaming_gives_the_plain_call_s_text():
    _, ours = backends()
    pieces, streamed, plain = asyncio.run(_streamed_and_plain(ours, "Say hello."))
    assert streamed == plain == "".join(pieces)
    assert len(pieces) >= 1


def test_generate_from_raw_is_one_batch_with_each_row_exact():
    _, ours = backends()
    prompts = ["what is 1+1?", "what is 2+2? Please answer", "3+3"]
    results = asyncio.run(ours.generate_from_raw([CBlock(p) for p in prompts], ChatContext(),
                                                 model_options={ModelOption.MAX_NEW_TOKENS: 6}))
    assert ours.token_counts().calls == len(prompts)
    for prompt, mot in zip(prompts, results):
        alone = ours.runtime.generate(spanctx.Context().append(prompt), 6, reuse=False)
        assert mot.value == alone.text
        assert mot.generation.usage["prompt_tokens"] == alone.stats.prompt_tokens


class Verdict(pydantic.BaseModel):
    label: Literal["ok", "bad"]
    level: Literal[1, 2, 3]


def test_format_gives_json_of_the_schema():
    _, ours = backends()
    session = MelleaSession(ours, ctx=ChatContext())
    out = session.instruct("Judge the weather.", format=Verdict, model_options={ModelOption.MAX_NEW_TOKENS: 64})
    Verdict.model_validate_json(out.value)


def test_logits_option_gives_each_new_token_s_scores():
    _, ours = backends()
    session = MelleaSession(ours, ctx=ChatContext())
    session.chat("Hello there.", model_options={ModelOption.MAX_NEW_TOKENS: 5, ModelOption.LOGITS: True})
    mot = session.ctx.last_output()
    new = mot.raw.response.sequences[0, mot.generation.usage["prompt_tokens"]:].tolist()
    assert len(mot.generation.logits) == len(new)
    assert [int(s.argmax()) for s in mot.generation.logits] == new  # greedy: each token is its step's argmax


def test_an_error_in_a_call_surfaces_and_the_next_call_runs():
    _, ours = backends()
    session = MelleaSession(ours, ctx=ChatContext())
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        session.chat("Hello.", model_options={ModelOption.MAX_NEW_TOKENS: 0})
    assert session.chat("Hello.", model_options={ModelOption.MAX_NEW_TOKENS: 3}).content is not None


def test_adapters_load_unload_list(tmp_path):
    model, tokenizer = tiny_model("llama")
    folder = make_adapter(model, tmp_path / "rc", invocation=tokenizer(INVOCATION, add_special_tokens=False)["input_ids"])
    _, ours = backends()
    ours.add_adapter(LocalIntrinsicAdapter("requirement-check", folder, REQUIREMENT_CHECK_IO))
    name = "requirement-check_alora"
    assert ours.list_adapters() == [name]
    ours.load_peft_adapter(name)
    ours.load_peft_adapter(name)  # loading twice is fine
    assert name in ours._loaded_adapters and ours.runtime.list_adapters()[name].alora_start == "in_prompt"
    ours.unload_peft_adapter(name)
    ours.unload_peft_adapter(name)  # a no-op, logged
    assert name not in ours._loaded_adapters and name not in ours.runtime.list_adapters()


def test_cached_block_is_a_span_reused_after_the_same_text():
    model, tokenizer = tiny_model("llama")
    rt = spanctx.Runtime(model, tokenizer, store_bytes=64 << 20)
    doc = "The river rose two metres overnight after the storm; the north gauge was cleaned. " * 2

    def prompt(question: str) -> spanctx.Context:
        messages = [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": f"Read this document.\n{doc}\nQuestion: {question}"}]
        return conversation_context(rt, messages, cached_blocks=[doc])

    first, second = prompt("How far did it rise?"), prompt("Which gauge was cleaned?")
    plain = spanctx.Context.chat([{"role": "system", "content": "You are terse."},
                                  {"role": "user", "content": f"Read this document.\n{doc}\nQuestion: x"}])
    assert rt.token_ids(first)[:20] == rt.token_ids(plain)[:20]
    assert any(span.content == doc for span in second.spans)  # the block is a span of its own
    rt.generate(first, 2)
    before_question = len(rt.token_ids(second)) - len(tokenizer("\nQuestion: Which gauge was cleaned?<|im_end|>\n"
                                                                "<|im_start|>assistant\n",
                                                                add_special_tokens=False)["input_ids"])
    assert rt.generate(second, 2).stats.cached_tokens == before_question  # system, text and block reused


def test_no_transformers_deprecation_is_logged_by_a_call(monkeypatch):
    """Mellea's post-processing reads the output's cache under its old name; the backend's
    output answers it without transformers' rename warning (a log record, not a Python
    warning, and logged once per process: recorded here without the once-cache)."""
    logged = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, *args, **kwargs: logged.append(args[0]))
    model, tokenizer = tiny_model("llama")
    for use_caches in (True, False):
        backend = SpanctxBackend("tiny-llama", custom_config=(tokenizer, model, CPU), use_caches=use_caches)
        session = MelleaSession(backend, ctx=ChatContext())
        session.chat("What is 1+1?", model_options={ModelOption.MAX_NEW_TOKENS: 3, ModelOption.LOGITS: True})
        session.chat("And 2+2?", model_options={ModelOption.MAX_NEW_TOKENS: 3})
        asyncio.run(backend.generate_from_raw([CBlock("1, 2, 3,")], ChatContext(),
                                              model_options={ModelOption.MAX_NEW_TOKENS: 2}))
    assert not [message for message in logged if "deprecated" in message]
