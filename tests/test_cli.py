"""README command 1: the demo prints its table and confirms identical outputs."""

from spanctx.cli import main


def test_demo_runs_and_outputs_match(capsys):
    assert main(["demo", "--device", "cpu", "--notes", "4", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "--model" in out
    assert "outputs identical with and without reuse: yes" in out
    assert "speedup" in out and "cached" in out
