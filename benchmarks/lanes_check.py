"""Lanes against alone, per static-executor configuration (attention x CUDA graphs), in fp32:
the largest logit difference of any lane's step and how many replies have identical tokens.

    python benchmarks/lanes_check.py --out $OUT/lanes_check.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from spanctx import Context, Runtime
from spanctx.engine.calls import FinalCall
from spanctx.engine.static import StaticExecutor
from spanctx.presets import load_preset

SYSTEM = "Rule 1: answer with care, cite the manual, and keep replies short and exact. " * 6


def contexts(n: int) -> list[Context]:
    return [Context.chat([{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": f"Session {s}: what does rule {7 * s} say?"}]) for s in range(n)]


def one(model, tokenizer, attention: str, graphs: bool, stored: bool, n: int, new: int,
        chunks: int | None = None) -> dict:
    """Lanes and alone on a static executor of this configuration, each against an eager
    full prefill of the same ids (``reuse=False``): the largest logit difference over the
    steps where the tokens still agree, and the replies with identical tokens."""
    rt = Runtime(model, tokenizer, store_bytes=1 << 30, executor="static", warm_up=False)
    rt.engine.static = StaticExecutor(model, max_tokens=8192, attention=attention, graphs=graphs, chunks=chunks)
    eager = Runtime(model, tokenizer, store_bytes=1 << 30, executor="eager")
    ctxs = contexts(n)
    if stored:
        rt.generate(ctxs[0], 1)  # the system span stored: lanes share it
    made, logits = [], {}
    with rt.holding(), rt.engine.lanes(n) as lanes:
        for ctx in ctxs:
            with rt.prepared(ctx, max_new_tokens=new) as prepared:
                made.append(lanes.admit(FinalCall.tails([prepared.assembly], decode=rt.options(new))))
        while len(lanes):
            for e in lanes.step(logits_for=frozenset(lanes.lanes)):
                logits.setdefault(e.lane.index, []).append(e.logits)
    out = {"attention": attention, "graphs": graphs, "chunks": chunks, "stored": stored}
    for name in ("lanes", "alone"):
        diffs, same = [], 0
        for lane, ctx in zip(made, ctxs):
            want = eager.generate(ctx, new, reuse=False, output_logits=True)
            if name == "lanes":
                tokens, steps = tuple(lane.tokens), logits[lane.index]
            else:
                alone = rt.generate(ctx, new, output_logits=True)
                tokens, steps = alone.token_ids, [x.reshape(-1).float() for x in alone.logits]
            same += tokens == want.token_ids
            for i, (got, expected) in enumerate(zip(steps, want.logits)):
                diffs.append(float((got - expected.reshape(-1).float()).abs().max()))
                if tokens[:i + 1] != want.token_ids[:i + 1]:
                    break
        out[name] = {"identical": same, "of": n, "max_logit_diff": max(diffs)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-trained")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--split-only", action="store_true", help="only split attention with graphs")
    parser.add_argument("--pieces", default=None,
                        help="comma-separated piece counts: only split attention in that many pieces, with and "
                             "without CUDA graphs (the merge of several pieces)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, tokenizer = load_preset(args.model, device=args.device, dtype=torch.float32)
    rows = []
    configs = ([("hf", True, None), ("split", True, None), ("split", True, 1), ("split", False, 4)]
               if args.device == "cuda" else [("hf", False, None), ("split", False, 4)])
    if args.split_only:
        configs = [("split", True, None)]
    if args.pieces:
        configs = [("split", graphs, int(n)) for n in args.pieces.split(",") for graphs in (True, False)]
    for attention, graphs, chunks in configs:
        for stored in (False, True):
            started = time.perf_counter()
            try:
                rows.append(one(model, tokenizer, attention, graphs, stored, 8, 16, chunks))
            except Exception as exc:  # noqa: BLE001 - one failing configuration must not lose the others
                rows.append({"attention": attention, "graphs": graphs, "chunks": chunks, "stored": stored,
                             "error": repr(exc)})
            print(rows[-1], f"{time.perf_counter() - started:.1f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "rows": rows, "torch": torch.__version__,
                       "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}, f, indent=1)


if __name__ == "__main__":
    main()
