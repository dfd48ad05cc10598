"""README command 1: ``spanctx demo`` answers for real, with and without reuse; the CLI
needs nothing the package does not install."""

import io
import shutil
import subprocess
import sys

import pytest

import spanctx
from spanctx import demo
from spanctx.cache import fingerprint
from spanctx.cli import main
from spanctx.features.tools import parse_tool_calls
from spanctx.presets import PRESETS, preset_config
from spanctx.tokenizer import TURN_END, byte_tokenizer


def test_demo_answers_on_the_trained_preset_by_default(capsys):
    assert main(["demo", "--device", "cpu", "--docs", "4", "--questions", "3"]) == 0
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


def _text_chat_preset(name: str) -> bool:
    """A decoder-only text preset (seq2seq and vision presets have no chat turn of this kind)."""
    config = preset_config(name)
    return not getattr(config, "is_encoder_decoder", False) and getattr(config, "vision_config", None) is None


@pytest.mark.parametrize("name", [name for name in PRESETS if name.startswith("tiny") and _text_chat_preset(name)])
def test_tiny_presets_stop_where_their_chat_template_ends_a_turn(name):
    """EOS and the template's turn end agree: a reply stops at the first of them, and its
    text is what came before (never silently empty behind dropped special tokens)."""
    model, tokenizer = spanctx.load_preset(name)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered.endswith(TURN_END + "\n")
    stops = set(model.generation_config.eos_token_id)
    assert stops == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(TURN_END)}
    rt = spanctx.Runtime(model, tokenizer, store_bytes=16 << 20)
    result = rt.generate(spanctx.Context.chat([{"role": "user", "content": "Say hi."}]), max_new_tokens=24)
    assert not stops & set(result.token_ids[:-1])
    body = result.token_ids[:-1] if result.token_ids[-1] in stops else result.token_ids
    assert result.text == tokenizer.decode(body, skip_special_tokens=True)


def test_the_presets_chat_template_renders_tools():
    def add(a: int, b: int) -> int:
        """Add two numbers.

        Args:
            a: the first
            b: the second
        """
        return a + b

    rt = spanctx.Runtime.from_pretrained("tiny-qwen2", device="cpu", store_bytes=16 << 20)
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    ctx = spanctx.Context.chat([{"role": "user", "content": "2+3?"},
                                {"role": "assistant", "content": None, "tool_calls": [call]},
                                {"role": "tool", "content": "5"}], system="Be brief.", tools=[add])
    text = rt.chat_rendering(ctx).text
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou may call these tools:\n<tools>\n")
    assert '"name": "add", "description": "Add two numbers."' in text
    assert '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>' in text
    assert text.endswith("<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n")
    reply = parse_tool_calls(text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0], [add])
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("add", {"a": 2, "b": 3})]
    turn = rt.tool_turn([{"role": "user", "content": "2+3?"}], [add], max_new_tokens=4)
    assert turn.result.stats.new_tokens >= 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _model_folder(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(PRESETS["tiny-trained"].weights_dir, folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_while_loading_and_fingerprinting_only_on_a_terminal(tmp_path, monkeypatch, terminal):
    """Loading a folder shows transformers' bar and fingerprinting a large model spanctx's
    own, both on stderr when it is a terminal; on a pipe or a log, nothing."""
    monkeypatch.setattr(fingerprint, "PROGRESS_BYTES", 0)  # every model counts as large here
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    model, tokenizer = spanctx.load_model(_model_folder(tmp_path), device="cpu")
    spanctx.Runtime(model, tokenizer, store_bytes=1 << 20)
    shown = stderr.getvalue()
    assert ("fingerprinting weights" in shown and "Loading weights" in shown) == terminal
    assert shown == "" or terminal
