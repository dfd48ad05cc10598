"""Full prefill against parallel documents with no repair over the whole held-out set
(run from the repository root; CPU is enough):

    python benchmarks/results/fidelity/parallel_heldout.py [--ks 2,4,8,16,32]

Each prompt is scored by teacher-forced exact match of its answer (every answer token is
the argmax; equals greedy exact match) twice: as one causal stream (``full``) and with its
documents as parallel members after the system line, laid out as
``spanctx.bench.parallel_training.Layout`` does, which gives the logits of spanctx's
``parallel`` group with repair ``none`` (``tests/test_trained.py`` checks it). Writes
``parallel-heldout.json`` here and prints a table by K and question kind.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import transformers
from transformers import LlamaForCausalLM

from spanctx.bench import retrieval
from spanctx.bench.parallel_training import Layout, dense_mask, use_span_attention
from spanctx.presets import PRESETS
from spanctx.tokenizer import byte_tokenizer

HERE = Path(__file__).parent


@torch.no_grad()
def right(model, tok, heldout: retrieval.HeldOut, prompt: retrieval.Prompt, parallel: bool) -> bool:
    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    row = Layout()
    row.start_episode()
    anchor = [tok.bos_token_id, *encode(heldout.system)]
    row.add(anchor)
    docs = [encode(d) for d in heldout.docs(prompt)]
    if parallel:
        row.add_parallel(anchor, docs)
    else:
        row.add([t for d in docs for t in d])
    row.add(encode(retrieval.question_text(prompt.question)))
    answer = encode(retrieval.answer_text(prompt.answer))
    row.add(answer)
    ids, _, layout = row.tensors(len(row))
    layout = layout[None].long()
    logits = model(input_ids=ids[None], position_ids=layout[:, 0], span_mask=dense_mask(layout)).logits[0]
    n = len(answer)
    return bool((logits[-n - 1:-1].argmax(-1) == ids[-n:]).all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="2,4,8,16,32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = LlamaForCausalLM.from_pretrained(PRESETS["tiny-trained"].weights_dir, dtype=torch.float32).eval()
    use_span_attention(model)
    tok = byte_tokenizer()
    heldout = retrieval.load_heldout()
    cells: dict[str, dict[str, int]] = {}
    for p in heldout.select([int(k) for k in args.ks.split(",")]):
        for method, parallel in (("full", False), ("parallel:none", True)):
            ok = right(model, tok, heldout, p, parallel)
            for group in (f"K={p.k}", "K<=16" if p.k <= 16 else None):
                if group:
                    c = cells.setdefault(f"{group}/{p.kind}/{method}", {"correct": 0, "prompts": 0})
                    c["correct"] += ok
                    c["prompts"] += 1
    out = {"device": f"cpu ({platform.machine()})", "torch": torch.__version__, "transformers": transformers.__version__,
           "dtype": "float32", "cells": cells}
    (HERE / "parallel-heldout.json").write_text(json.dumps(out, indent=1) + "\n")
    for key in sorted(k for k in cells if k.endswith("/full")):
        full, par = cells[key], cells[key.replace("/full", "/parallel:none")]
        kept = par["correct"] / full["correct"] if full["correct"] else float("nan")
        print(f"{key[:-5]:16s} full {full['correct']:3d}/{full['prompts']:<3d} parallel:none {par['correct']:3d}/"
              f"{par['prompts']:<3d} kept {kept:.0%}")


if __name__ == "__main__":
    main()
