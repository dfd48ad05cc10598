"""README command 1: ``spanctx demo`` answers for real, with and without reuse; the CLI
needs nothing the package does not install."""

import subprocess
import sys

import pytest

import spanctx
from spanctx import demo
from spanctx.cli import main


def test_demo_answers_on_the_trained_preset_by_default(capsys):
    assert main(["demo", "--device", "cpu", "--docs", "4", "--questions", "3", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "preset 'tiny-trained'" in out and "RANDOM" not in out
    assert "right answers: 3/3" in out
    assert "outputs identical with and without reuse: yes" in out
    assert "mean TTFT speedup" in out and "Runtime(model='tiny-trained'" in out


def test_demo_on_a_random_preset_says_its_answers_are_noise(capsys):
    assert main(["demo", "--model", "tiny-llama", "--device", "cpu", "--docs", "2", "--questions", "2",
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "--model" in out
    assert "outputs identical with and without reuse: yes" in out


def test_the_demo_context_is_cut_to_the_model_positions():
    model, tokenizer = spanctx.load_preset("tiny-llama", max_position_embeddings=700)
    rt = spanctx.Runtime(model, tokenizer, store_bytes=16 << 20)
    w = demo.fitted_workload(rt, num_docs=16, num_questions=3, max_new_tokens=10)
    assert 1 <= w.num_docs < 16
    assert all(len(rt.token_ids(w.prompt(q))) + 10 <= 700 for q in w.questions)
    with pytest.raises(ValueError, match="exceed the model's 700 positions"):
        demo.fitted_workload(rt, num_docs=2, num_questions=1, max_new_tokens=690)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"spanctx {spanctx.__version__}"
    assert spanctx.__version__.count(".") == 2


BLOCK_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # as if not installed: importing it raises ModuleNotFoundError
from spanctx.cli import main
code = main(sys.argv[1:])
assert sys.modules["matplotlib"] is None
sys.exit(code)
"""


def test_the_cli_works_without_matplotlib_and_bench_says_what_it_needs():
    """Command 1 installs no plotting library: ``demo`` and ``--help`` must not need one."""
    run = [sys.executable, "-c", BLOCK_MATPLOTLIB]
    demo_run = subprocess.run([*run, "demo", "--device", "cpu", "--docs", "2", "--questions", "1",
                               "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert demo_run.returncode == 0, demo_run.stderr
    bench = subprocess.run([*run, "bench", "prefix"], capture_output=True, text=True, timeout=300)
    assert bench.returncode == 2 and "pip install 'spanctx[plots]'" in bench.stderr
