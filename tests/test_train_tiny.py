"""The training script's data (``benchmarks/train_tiny.py``), without training: the
paraphrase curriculum's switch reaches the data loader's worker processes."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from test_retrieval import _pattern  # noqa: E402

from spanctx.bench import retrieval  # noqa: E402
from spanctx.tokenizer import byte_tokenizer  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_tiny.py"


def _train_tiny():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HAND_QUESTIONS = [_pattern(t) for kind in retrieval.QUESTIONS.values() for ts in kind.values() for t in ts[:-1]]


def _questions(ids: torch.Tensor) -> list[str]:
    text = byte_tokenizer().decode(ids.tolist(), skip_special_tokens=True)
    return re.findall(r"^Q: (.*)\nA:", text, flags=re.M)  # a question cut at the row's end is left out


def _hand_share(batches) -> tuple[int, int]:
    questions = [q for ids, _, _ in batches for row in ids for q in _questions(row)]
    return sum(any(p.match(q) for p in HAND_QUESTIONS) for q in questions), len(questions)


def test_the_curriculum_switch_reaches_the_loader_workers():
    train_tiny = _train_tiny()
    rows = train_tiny.Rows(2048, seed=1, mix="curriculum")
    loader = iter(torch.utils.data.DataLoader(rows, batch_size=4, num_workers=2, prefetch_factor=1))
    before = [next(loader) for _ in range(3)]
    hand, total = _hand_share(before)
    assert total > 20 and hand == total  # hand-written questions only, before the switch
    rows.mix_generated()
    for _ in range(4):  # rows the workers queued before the switch
        next(loader)
    hand, total = _hand_share([next(loader) for _ in range(4)])
    assert total > 20 and 0.25 * total < hand < 0.8 * total  # about half generated after it
