"""The benchmark harness on the tiny preset with tiny sizes (no speed claims here)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import tiny_model

import spanctx
from spanctx.bench import baselines, plots, report
from spanctx.bench import command as cli
from spanctx.bench import records as results
from spanctx.bench.floor import Floor
from spanctx.bench.harness import make_harness
from spanctx.bench.random_adapters import INVOCATION_TEXT, AnswerTokens, check_probability, make_adapter, peft_loaded
from spanctx.bench.scenarios import chat, cold, prefix, rag, run_scenario
from spanctx.bench.scenarios import requirement_checks as checks
from spanctx.bench.timing import Outcome, Sample, percentile, summarize
from spanctx.bench.workloads import TokenSource, draw_documents

PREFIX = prefix.Config(contexts=(48, 96), question_tokens=8, new_tokens=4)
COLD = cold.Config(contexts=(48,), question_tokens=8, new_tokens=4)
CHAT = chat.Config(turns=3, system_tokens=24, user_tokens=6, reply_tokens=5, new_tokens=3)
RAG = rag.Config(docs=(2, 3), doc_tokens=12, pool=5, system_tokens=6, question_tokens=5, new_tokens=4,
                 fidelity_prompts=3)
CHECKS = checks.Config(context_tokens=40, checks=3, rank=4)


def harness():
    model, tokenizer = tiny_model("llama")
    return make_harness(model, tokenizer, "tiny-llama", seed=0, warmup=0, repeats=2, store_bytes=64 << 20)


@pytest.fixture(scope="module")
def rows():
    """Rows of every scenario whose methods need no missing feature, run once."""
    h = harness()
    out = []
    out += run_scenario(h, "prefix", PREFIX)
    out += run_scenario(h, "cold", COLD)
    out += run_scenario(h, "chat", CHAT)
    out += run_scenario(h, "rag", RAG, ["full", "spanctx-exact", "naive-concat"])
    out += run_scenario(h, "checks", CHECKS, ["full", "lora-full"])
    return [row.to_json() for row in out]


def pick(rows, scenario, method):
    return [r for r in rows if r["scenario"] == scenario and r["method"] == method]


def test_rows_have_the_schema_fields(rows):
    for row in rows:
        assert all(key in row for key in results.REQUIRED_ROW_KEYS), row
        assert row["ttft_ms"] > 0 and row["total_ms"] >= row["ttft_ms"] * 0.5
        assert row["repeats"] == 2 and row["peak_mem_mb"] is None  # CPU
    counts = {(s, m): len(pick(rows, s, m)) for s, m in
              [("prefix", "full"), ("prefix", "hf-deepcopy"), ("prefix", "spanctx"), ("cold", "spanctx"),
               ("chat", "spanctx"), ("rag", "naive-concat"), ("checks", "full"), ("checks", "lora-full")]}
    assert counts == {("prefix", "full"): 2, ("prefix", "hf-deepcopy"): 2, ("prefix", "spanctx"): 2,
                      ("cold", "spanctx"): 1, ("chat", "spanctx"): 3, ("rag", "naive-concat"): 2,
                      ("checks", "full"): 1, ("checks", "lora-full"): 1}


def test_reuse_methods_generate_the_same_tokens_as_full(rows):
    for scenario, method in [("prefix", "hf-deepcopy"), ("prefix", "spanctx"), ("cold", "spanctx"),
                             ("chat", "spanctx"), ("rag", "spanctx-exact")]:
        for row in pick(rows, scenario, method):
            assert row["greedy_match"] == 1.0, (scenario, method, row)
    assert all("greedy_match" not in r for r in rows if r["method"] == "full")


def test_token_accounting(rows):
    for row in pick(rows, "prefix", "spanctx") + pick(rows, "prefix", "hf-deepcopy"):
        assert (row["computed_tokens"], row["cached_tokens"]) == (8, row["context_tokens"] + 1)  # + BOS
    for row in pick(rows, "cold", "spanctx") + pick(rows, "cold", "full"):
        assert row["computed_tokens"] + row["cached_tokens"] == row["context_tokens"] + 8 + 1
        assert row["cached_tokens"] <= 1  # at most the shared BOS span
    later_turns = [r for r in pick(rows, "chat", "spanctx") if r["turn"] > 1]
    assert [r["computed_tokens"] for r in later_turns] == [5 + 6, 5 + 6]  # last reply + new user turn
    for row in pick(rows, "rag", "naive-concat"):
        assert row["computed_tokens"] == 5 and row["context_tokens"] == 6 + 12 * row["docs"]
    for row in pick(rows, "checks", "full"):
        assert row["cached_tokens"] == 0 and row["checks"] == 3 and row["computed_tokens"] > 3 * 40


def test_rag_fidelity(rows):
    for row in pick(rows, "rag", "spanctx-exact"):
        assert row["top1_agreement"] == 1.0 and row["kl"] < 1e-6
    # naive concatenation leaves every document at positions 0..n-1: not the same model input
    for row in pick(rows, "rag", "naive-concat"):
        assert row["kl"] > 1e-6


def test_naive_concat_of_one_block_at_position_zero_is_exact():
    h = harness()
    model = h.model
    system, question = h.source.block(10, "t-sys"), h.source.block(4, "t-q")
    ids = h.prompt_ids(system, question)
    assert list(ids) == h.runtime.token_ids(spanctx.Context().append(system).append(question))
    cache = baselines.concatenate([baselines.prefill_alone(model, h.prompt_ids(system), h.device)])
    got = baselines.next_token_logits(model, ids, h.device, cache=cache, cached_tokens=len(ids) - 4)
    want = baselines.next_token_logits(model, ids, h.device)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_adapters_change_outputs_and_leave_the_model_unchanged(tmp_path):
    h = harness()
    invocation = tuple(h.tokenizer(INVOCATION_TEXT, add_special_tokens=False)["input_ids"])
    ids = h.prompt_ids(h.source.block(20, "t-ctx"), invocation)
    before = baselines.next_token_logits(h.model, ids, h.device)
    alora = make_adapter(h.model, tmp_path / "alora", rank=4, invocation_ids=invocation, seed=1)
    lora = make_adapter(h.model, tmp_path / "lora", rank=4, invocation_ids=None, seed=2)
    config = json.loads((alora / "adapter_config.json").read_text())
    assert config["alora_invocation_tokens"] == list(invocation) and config["task_type"] == "CAUSAL_LM"
    torch.testing.assert_close(baselines.next_token_logits(h.model, ids, h.device), before, atol=0, rtol=0)
    answers = AnswerTokens.for_tokenizer(h.tokenizer)
    base_p = before[[answers.yes, answers.no]].softmax(-1)[0].item()
    for path in (alora, lora):
        with peft_loaded(h.model, path) as peft_model:
            p = check_probability(peft_model, h.tokenizer, ids, answers, h.device).probability
        assert abs(p - base_p) > 1e-6, path  # the adapter is active on the invocation
    torch.testing.assert_close(baselines.next_token_logits(h.model, ids, h.device), before, atol=0, rtol=0)


def fake_results(rows):
    h = harness()
    return results.new_results(h, Floor(1000, 1.0, 0.05), {"note": "test"}) | {"rows": rows}


def test_results_json_markdown_and_plots(rows, tmp_path):
    res = fake_results(rows)
    stem = results.results_stem(tmp_path, res)
    assert stem.name.endswith("-cpu-tiny-llama")
    path = results.write_json(res, stem.parent / f"{stem.name}.json")
    loaded = results.load_results(path)
    assert all(k in loaded for k in results.REQUIRED_KEYS) and loaded["rows"] == rows
    text = report.markdown(loaded)
    for scenario in ("prefix", "rag", "chat", "checks", "cold"):
        assert f"## {scenario}" in text
    assert "| 48 | `spanctx` |" in text and "TTFT speedup" in text and "Floor" in text
    written = [report.write_markdown(loaded, stem), *plots.write_plots(loaded, stem)]
    names = sorted(p.name for p in written)
    assert names == sorted([f"{stem.name}.md", f"{stem.name}-ttft.png", f"{stem.name}-speedup.png",
                            f"{stem.name}-fidelity.png"])
    assert all(p.stat().st_size > 1000 for p in written)
    with pytest.raises(ValueError, match="lacks"):
        results.validate(res | {"rows": [{"scenario": "prefix"}]})


def test_speedup_is_against_full_of_the_same_case():
    rows = [{"scenario": "prefix", "method": "full", "context_tokens": 8, "ttft_ms": 10.0},
            {"scenario": "prefix", "method": "full", "context_tokens": 16, "ttft_ms": 40.0},
            {"scenario": "prefix", "method": "spanctx", "context_tokens": 16, "ttft_ms": 4.0},
            {"scenario": "cold", "method": "spanctx", "context_tokens": 16, "ttft_ms": 4.0}]
    assert report.speedup(rows, rows[2], "ttft_ms") == 10.0
    assert report.speedup(rows, rows[3], "ttft_ms") is None


def test_cli_writes_everything(tmp_path, capsys):
    code = cli.main(["prefix", "rag", "--model", "tiny-llama", "--device", "cpu", "--out", str(tmp_path),
                     "--contexts", "32", "--question-tokens", "4", "--new-tokens", "2", "--repeats", "1",
                     "--warmup", "0", "--rag-docs", "2", "--rag-doc-tokens", "8", "--rag-pool", "3",
                     "--rag-fidelity-prompts", "1", "--no-progress"])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith("-cpu-tiny-llama.json") for f in files) and any(f.endswith(".md") for f in files)
    assert any(f.endswith("-ttft.png") for f in files)
    saved = results.load_results(next(tmp_path.glob("*.json")))
    assert {r["method"] for r in saved["rows"] if r["scenario"] == "prefix"} == {"full", "hf-deepcopy", "spanctx"}
    assert "speedup" in capsys.readouterr().out
    assert code == 0 and not saved["skipped"]
    assert {r["method"] for r in saved["rows"] if r["scenario"] == "rag"} >= {"full", "spanctx-parallel:none"}


def test_per_scenario_arguments():
    assert cli._per_scenario("5") == (5, {})
    assert cli._per_scenario("5,rag=3,cold=2") == (5, {"rag": 3, "cold": 2})
    for bad in ("rag=3", "0", "5,nope=2", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli._per_scenario(bad)


def test_summary_statistics():
    samples = [Sample(Outcome(t / 1e3, (), 1, 0), t / 1e3 * 2, None) for t in (5.0, 1.0, 3.0, 2.0, 4.0)]
    s = summarize(samples)
    assert (s.ttft_ms, s.total_ms) == pytest.approx((3.0, 6.0))
    assert s.ttft_p90_ms == pytest.approx(4.6) and percentile([1.0], 90) == 1.0


def test_workloads_are_deterministic_and_avoid_special_tokens():
    model, tokenizer = tiny_model("llama")
    a = TokenSource.for_tokenizer(tokenizer, model.config.vocab_size, seed=0)
    b = TokenSource.for_tokenizer(tokenizer, model.config.vocab_size, seed=0)
    assert a.block(100, "doc", 3) == b.block(100, "doc", 3) != a.block(100, "doc", 4)
    assert a.block(100, "doc", 3) != TokenSource.for_tokenizer(tokenizer, 261, seed=1).block(100, "doc", 3)
    assert not set(a.block(2000, "x")) & set(tokenizer.all_special_ids)
    order = draw_documents(a, 10, 4, "k")
    assert len(set(order)) == 4 and order == draw_documents(b, 10, 4, "k")


# -- the rag and checks spanctx paths, on the real parallel-span and adapter features ------


def test_rag_parallel_methods_report_fidelity_and_reuse():
    rows = [r.to_json() for r in run_scenario(harness(), "rag", RAG)]
    for repair in ("none", "head:16", "blend:0.15"):
        for row in pick(rows, "rag", f"spanctx-parallel:{repair}"):
            assert 0.0 <= row["top1_agreement"] <= 1.0 and row["kl"] >= 0.0
            assert row["cached_tokens"] > 0  # the pool's documents are reused in new orders
    # naive concatenation keeps every document at position 0: worse than re-positioned spans
    for k in RAG.docs:
        naive = pick(rows, "rag", "naive-concat")
        parallel = pick(rows, "rag", "spanctx-parallel:none")
        assert [r["kl"] for r in naive if r["context_tokens"] == parallel[0]["context_tokens"]]


def test_checks_spanctx_method_agrees_with_full_aLoRA_prefill():
    rows = [r.to_json() for r in run_scenario(harness(), "checks", CHECKS)]
    (row,) = pick(rows, "checks", "spanctx")
    (full,) = pick(rows, "checks", "full")
    assert row["verdict_agreement"] == 1.0 and row["checks"] == 3
    # the same check prompts; the context comes from the store instead of a prefill per check
    assert row["computed_tokens"] + row["cached_tokens"] == full["computed_tokens"]
    assert row["cached_tokens"] >= CHECKS.checks * CHECKS.context_tokens

