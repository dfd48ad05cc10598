"""Greedy agreement of the static executor with the eager one on the trained preset.

Runs the held-out retrieval prompts (``spanctx.bench.retrieval``) of ``tiny-trained``
through two runtimes over one model, ``executor="eager"`` and ``executor="static"``
(CUDA graphs on a GPU), sequential layout and parallel documents (``none``), and prints how
many greedy answers are token-identical and how many are right for each:

    PYTHONPATH=. python benchmarks/static_agreement.py [--device cuda] [--dtype bfloat16]

With ``$OUT`` set, also writes ``$OUT/static_agreement-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import spanctx
from spanctx import Context
from spanctx.bench.retrieval import answer_of, load_heldout, question_text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--worlds", type=int, default=8, help="held-out worlds per K (4 prompts each)")
    args = parser.parse_args()
    model, tokenizer = spanctx.load_preset("tiny-trained", device=args.device, dtype=getattr(torch, args.dtype))
    runtimes = {name: spanctx.Runtime(model, tokenizer, store_bytes=1 << 30, executor=name, repair="none")
                for name in ("eager", "static")}
    heldout = load_heldout()
    stop = [tokenizer("\n", add_special_tokens=False)["input_ids"][-1], tokenizer.eos_token_id]
    counts = {layout: {"prompts": 0, "identical": 0, "right_eager": 0, "right_static": 0, "static_ran": 0}
              for layout in ("sequential", "parallel")}
    for prompt in heldout.select(None, args.worlds):
        root = Context().append(heldout.system)
        docs = heldout.docs(prompt)
        contexts = {"sequential": root.extend(docs), "parallel": root.parallel(*docs)}
        for layout, ctx in contexts.items():
            ctx = ctx.append(question_text(prompt.question))
            results = {name: rt.generate(ctx, 24, do_sample=False, eos_token_id=stop) for name, rt in runtimes.items()}
            row = counts[layout]
            row["prompts"] += 1
            row["identical"] += results["eager"].token_ids == results["static"].token_ids
            row["static_ran"] += results["static"].stats.executor == "static"
            for name, result in results.items():
                row[f"right_{name}"] += answer_of(result.text) == prompt.answer
    info = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "dtype": args.dtype,
            "torch": torch.__version__, "counts": counts}
    for layout, row in counts.items():
        print(f"{layout:10s} {row['identical']}/{row['prompts']} token-identical, right: eager {row['right_eager']}, "
              f"static {row['right_static']} (static ran {row['static_ran']})")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"static_agreement-{args.device}.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
