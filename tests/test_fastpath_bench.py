"""benchmarks/fastpath_bench.py's fresh-process chat pass: one row per turn, built from
what the runtime reports (no timing asserted: speed claims live in benchmarks/)."""

import importlib.util
import itertools
import json
import pathlib

import pytest

from spanctx.bench.harness import load_bench_model, make_harness
from spanctx.bench.scenarios import chat_turns

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness():
    model, tokenizer = load_bench_model("tiny-llama", "cpu", None, 0, "sdpa")
    return make_harness(model, tokenizer, "tiny-llama", warmup=0, repeats=1)


def test_a_chat_pass_has_a_row_per_turn_and_reuses_the_earlier_turns(harness):
    bench = _module("fastpath_bench")
    config = chat_turns.Config(turns=3, system_tokens=16, user_tokens=5, reply_tokens=4, new_tokens=3)
    turns = chat_turns.conversation(harness, config)
    result = bench.chat_pass(harness, turns, config.new_tokens)
    rows = result["turns"]
    assert [r["turn"] for r in rows] == [1, 2, 3]
    assert [r["prompt_tokens"] for r in rows] == [len(harness.prompt_ids(*blocks)) for blocks in turns]
    assert all(r["new_tokens"] == 3 and r["executor"] == "eager" for r in rows)  # auto is eager on CPU
    assert rows[0]["cached_tokens"] == 0
    # each later turn reuses at least the previous turn's prompt (its reply block is new)
    assert all(r["cached_tokens"] >= prev["prompt_tokens"] for prev, r in itertools.pairwise(rows))
    later = {r["turn"]: r["ttft_ms"] for r in rows[1:]}
    assert result["worst_ttft_ms"] == max(later.values()) == later[result["worst_turn"]]
    assert result["worst_over_median"] == pytest.approx(result["worst_ttft_ms"] / result["median_ttft_ms"])


def test_the_report_turns_sections_into_target_rows(tmp_path):
    report = _module("fastpath_report")
    chat = {"passes": {"fresh": {"turns": [{"executor": "static", "executor_fallback": None},
                                           {"executor": "eager", "executor_fallback": "no graph for 40K"}],
                                 "worst_turn": 2, "worst_ttft_ms": 30.0, "median_ttft_ms": 15.0,
                                 "worst_over_median": 2.0}}}
    (tmp_path / "sections").mkdir()
    (tmp_path / "sections" / "chat.json").write_text(json.dumps(chat))
    record = report.build(tmp_path, [], smoke=False)
    [row] = record["targets"]
    assert row["met"] is False and row["executor"] == "static; eager"
    assert record["fallbacks"] == ["no graph for 40K"]
    assert "| **no** |" in report.markdown(record)
