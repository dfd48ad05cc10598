"""The trained preset: it loads offline with its training record, reads held-out
retrieval prompts (values and some paraphrases never seen in training), and parallel
spans with the default repair keep most of those answers at small K while naive
concatenation (Mellea's KV smashing) loses more; the fidelity scenario's rows,
pooled table, goal lines and plot.

The prompts are a fixed slice of the frozen held-out set: the 16 single-document
questions of the first ``WORLDS`` worlds with K = ``K`` documents (shuffled orders). The
thresholds come from a measured run of this slice (CPU, fp32, torch 2.14 / transformers
5.24; docs/fidelity.md), with one prompt of slack for numeric differences between
versions: full prefill answered 15, parallel spans with ``head:16`` 15 and with ``none``
15 (the preset was trained with parallel documents in part of its data), naive
concatenation 11.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

import spanctx
from spanctx import Context
from spanctx.bench import accuracy, baselines, parallel_training, retrieval
from spanctx.bench.harness import make_harness
from spanctx.bench.scenarios import parallel_fidelity as fidelity
from spanctx.bench.scenarios import run_scenario
from spanctx.presets import PRESETS

K, WORLDS = 4, 8
REPAIR = "head:16"  # the runtime's default repair
FULL_AT_LEAST = 14  # of 16 (measured: 14; the whole held-out set at K = 4: 28 of 32 on an H200)
PARALLEL_SHARE = 0.9  # of full's correct answers (measured: 15, with head:16 and with none)
NAIVE_AT_MOST = 12  # of 16 (measured: 11)


@functools.cache
def runtime() -> spanctx.Runtime:
    return spanctx.Runtime.from_pretrained("tiny-trained", device="cpu", store_bytes=256 << 20)


@functools.cache
def answers() -> dict[str, list[bool]]:
    """Per method, whether each prompt of the slice was answered exactly (greedy)."""
    rt = runtime()
    heldout = retrieval.load_heldout()
    prompts = [p for p in heldout.select([K], WORLDS) if p.kind == "single"]
    assert len(prompts) == 2 * WORLDS
    newline = rt.tokenizer("\n", add_special_tokens=False)["input_ids"][-1]

    def ids(text: str) -> tuple[int, ...]:
        return tuple(rt.tokenizer(text, add_special_tokens=False)["input_ids"])

    system = (rt.tokenizer.bos_token_id, *ids(heldout.system))
    blocks: dict[str, object] = {}  # Mellea's cache: one block per text, prefilled alone from position 0
    out: dict[str, list[bool]] = {"full": [], "parallel": [], "none": [], "naive": []}
    for p in prompts:
        docs, question = heldout.docs(p), retrieval.question_text(p.question)
        base = Context().append(heldout.system)
        full = rt.generate(base.extend(docs).append(question), 16, reuse=False, eos_token_id=[newline])
        parallel = rt.generate(base.parallel(*docs).append(question), 16, repair=REPAIR, eos_token_id=[newline])
        none = rt.generate(base.parallel(*docs).append(question), 16, repair="none", eos_token_id=[newline])
        for text in (heldout.system, *docs):
            if text not in blocks:
                blocks[text] = baselines.prefill_alone(rt.model, system if text == heldout.system else ids(text),
                                                       rt.device)
        prompt_ids = system + tuple(t for d in docs for t in ids(d)) + ids(question)
        naive = baselines.generate(rt.model, rt.tokenizer, prompt_ids, 16, rt.device, cached_tokens=len(
            prompt_ids) - len(ids(question)), make_cache=lambda d=docs: baselines.concatenate(
            [blocks[heldout.system], *(blocks[t] for t in d)]))
        out["full"].append(retrieval.answer_of(full.text) == p.answer)
        out["parallel"].append(retrieval.answer_of(parallel.text) == p.answer)
        out["none"].append(retrieval.answer_of(none.text) == p.answer)
        out["naive"].append(retrieval.answer_of(rt.tokenizer.decode(naive.new_ids, skip_special_tokens=True))
                            == p.answer)
    return out


def test_the_preset_loads_offline_with_its_weights_and_training_record():
    preset = PRESETS["tiny-trained"]
    folder = preset.weights_dir
    assert (folder / "model.safetensors").stat().st_size <= 16 * 2**20
    record = json.loads((folder / "training.json").read_text())
    # measured on the H200 (training.json): K <= 16 single 0.891, two 0.688, below the issue's
    # 0.95 / 0.70 (docs/fidelity.md says why: unseen paraphrases); the record must say so, not hide it
    accuracy = record["heldout_accuracy"]
    assert {"K<=16/single", "K<=16/two", "single/unseen", "two/seen"} <= set(accuracy)
    assert accuracy["K<=16/single"]["accuracy"] >= 0.95 and accuracy["K<=16/two"]["accuracy"] >= 0.7  # issue 22
    assert record["train_seconds"] <= 10 * 60 and len(record["phases"]) == 1
    assert record["settings"]["parallel"] > 0  # Block-Attention-style episodes in its data
    assert (folder / "training-log.txt").read_text().startswith("spanctx tiny-trained")
    rt = runtime()
    assert rt.model.dtype == torch.float32 and rt.model.config.num_key_value_heads == 2
    assert len(rt.tokenizer) == rt.model.config.vocab_size
    with pytest.raises(ValueError, match="trained weights"):
        spanctx.load_preset("tiny-trained", num_hidden_layers=2)


def test_full_prefill_answers_the_held_out_prompts():
    assert sum(answers()["full"]) >= FULL_AT_LEAST


def test_parallel_spans_with_the_default_repair_keep_most_answers_at_small_k():
    got = answers()
    assert sum(got["parallel"]) >= PARALLEL_SHARE * sum(got["full"])


def test_parallel_spans_keep_most_answers_with_no_repair_at_all():
    got = answers()  # the preset saw parallel documents in training: nothing to repair
    assert sum(got["none"]) >= PARALLEL_SHARE * sum(got["full"])


def test_naive_concatenation_answers_fewer():
    got = answers()
    assert sum(got["naive"]) <= NAIVE_AT_MOST < sum(got["full"])


def test_the_fidelity_scenario_rows_pooled_table_goal_and_plot():
    rt = runtime()
    h = make_harness(rt.model, rt.tokenizer, "tiny-trained", warmup=0, repeats=1, store_bytes=64 << 20)
    config = fidelity.Config(docs=(2,), worlds=1)
    methods = ["full", "naive-concat", "parallel:none", "parallel:head:4", "parallel:blend:0.3",
               "parallel:head:4+blend:0.1"]
    rows = [r.to_json() for r in run_scenario(h, "fidelity", config, methods)]
    assert {(r["docs"], r["question"]) for r in rows} == {(2, "single"), (2, "two")}
    by = {(r["question"], r["method"]): r for r in rows}
    for kind in ("single", "two"):
        assert by[(kind, "full")]["recomputed_fraction"] == 0 and "kl" not in by[(kind, "full")]
        assert by[(kind, "parallel:none")]["recomputed_fraction"] == 0
        assert by[(kind, "naive-concat")]["computed_tokens"] < by[(kind, "full")]["computed_tokens"]
        head = by[(kind, "parallel:head:4")]
        assert 0 < head["recomputed_fraction"] < 0.1 and head["checked_fraction"] == 0  # 4 of ~190 tokens
        blend = by[(kind, "parallel:blend:0.3")]
        checked = blend["checked_fraction"]  # the moved document's tokens (one of two documents moves)
        assert 0.1 < checked < 0.9 and 0.3 * checked <= blend["recomputed_fraction"] <= 0.3 * checked + 0.01
        assert all(0 <= by[(kind, m)]["accuracy"] <= 1 for m in ("full", "naive-concat", "parallel:none"))
        assert by[(kind, "parallel:head:4")]["kl"] >= 0 and 0 <= head["answer_agreement"] <= 1
        both = by[(kind, "parallel:head:4+blend:0.1")]  # the heads forced, a tenth of the rest chosen
        assert both["checked_fraction"] + head["recomputed_fraction"] == pytest.approx(checked)
        assert head["recomputed_fraction"] + 0.1 * both["checked_fraction"] <= both["recomputed_fraction"] \
            <= head["recomputed_fraction"] + 0.1 * both["checked_fraction"] + 0.01
    res = {"model": "tiny-trained", "device": "cpu", "rows": rows}
    pooled = {(p.method, p.kind): p for p in accuracy.pooled(res)}
    assert pooled[("full", "single")].kept == (1.0 if pooled[("full", "single")].accuracy else None)
    full_right = all(pooled[("full", kind)].accuracy for kind in ("single", "two"))  # else no share to keep
    assert len(accuracy.goal_lines(res)) == (5 if full_right else 0)
    assert len(accuracy.markdown_lines(res)) == 2 + 2 * 6
    assert accuracy.plot_accuracy(res) is not None
    assert accuracy.curves(methods) == {
        "parallel head:*": ["parallel:none", "parallel:head:4"],
        "parallel blend:*": ["parallel:none", "parallel:blend:0.3"],
        "parallel head+blend:*": ["parallel:none", "parallel:head:4+blend:0.1"]}



@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_training_layout_of_parallel_documents_is_what_spanctx_computes(attention):
    """A parallel episode as training lays it out (each member after its own copy of the
    anchor, the question after all) gives the logits spanctx gives for the same prompt with
    parallel spans and repair ``none``; a plain episode gives full prefill's."""
    rt = spanctx.Runtime.from_pretrained("tiny-llama", device="cpu")
    model = type(rt.model)(copy.deepcopy(rt.model.config)).eval()  # its own config: its own attention
    model.load_state_dict(rt.model.state_dict())
    parallel_training.use_span_attention(model)

    def ids(text: str) -> list[int]:
        return rt.tokenizer(text, add_special_tokens=False)["input_ids"]

    system, question = "Use the documents below to answer.\n", "Q: Where does Mira work?\nA:"
    docs = ["Mira works in Plessburg. Tovo has a pet mokka.\n", "The code of Tovo is 4821.\n", "Lisk works in Oslo.\n"]
    for parallel in (True, False):
        row = parallel_training.Layout()
        row.start_episode()
        anchor = [rt.tokenizer.bos_token_id, *ids(system)]
        row.add(anchor)
        if parallel:
            row.add_parallel(anchor, [ids(doc) for doc in docs])
        else:
            row.add(ids("".join(docs)))
        row.add(ids(question))
        tokens, _, layout = row.tensors(len(row))
        layout = layout[None].long()
        mask = parallel_training.block_mask(layout) if attention == "flex" else parallel_training.dense_mask(layout)
        with torch.no_grad():
            got = model(input_ids=tokens[None], position_ids=layout[:, 0], span_mask=mask).logits[0, -1]
        ctx = Context().append(system)
        ctx = (ctx.parallel(*docs) if parallel else ctx.extend(docs)).append(question)
        want = rt.next_token_logits(ctx, repair="none") if parallel else rt.next_token_logits(ctx, reuse=False)
        assert list(rt.token_ids(ctx)) == tokens[layout[0, 3] == 0].tolist()  # the prompt: all but the copies
        torch.testing.assert_close(got, want.reshape(got.shape), atol=2e-4, rtol=1e-4)
        if parallel:  # and it is not what full prefill gives: the members did not see each other
            full = rt.next_token_logits(Context().append(system).extend(docs).append(question), reuse=False)
            assert (full.reshape(got.shape) - got).abs().max() > 1e-3
