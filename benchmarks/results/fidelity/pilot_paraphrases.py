"""CPU pilot (issue 22, session 3): does training on many generated paraphrases raise the
accuracy on held-out templates? A small model (2 layers, hidden 128) trains for a fixed
wall time on short episodes (K <= 3, rows of 640 bytes, batch 6, no parallel documents) with the hand-written
templates only or with the generated ones too, then answers fresh held-out-split worlds
(K = 2; values and the held-out templates never trained on), teacher-forced: exact
matches, answer bytes right and the answer's loss, split by whether the prompt needs a
held-out template. (A first run of 8 minutes each, ~780 steps, answered 0 of 160 either
way: too short for this model to learn to copy, so the answer's loss is the signal.)

    python benchmarks/results/fidelity/pilot_paraphrases.py --paraphrases hand --seconds 300 --out x.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_tiny  # noqa: E402

from spanctx.bench import retrieval  # noqa: E402
from spanctx.bench.parallel_training import dense_mask, use_span_attention  # noqa: E402
from spanctx.tokenizer import byte_tokenizer  # noqa: E402


def prompts(n: int, seed: int = 7) -> list[tuple[str, str, str, bool]]:
    """``n`` (prompt text, answer, kind, unseen) of held-out-split worlds with K = 2."""
    rng = random.Random(seed)
    filler = retrieval.filler_sentences(retrieval.natural_text(held_out=True))
    out = []
    while len(out) < n:
        world = retrieval.make_world(rng, 2, filler, split="heldout")
        q = retrieval.ask(rng, world, "single", split="heldout")
        out.append((retrieval.SYSTEM_LINES[0] + "".join(world.documents) + retrieval.question_text(q.text),
                    q.answer, q.kind, q.unseen))
    return out


@torch.no_grad()
def score(model, items) -> dict:
    """Per group (seen / unseen template): exact matches, the answer bytes predicted
    right (teacher-forced) and the answer's mean loss in bits per byte."""
    tok = byte_tokenizer()
    out: dict[str, dict[str, float]] = {}
    for text, answer, _, unseen in items:
        ids = [tok.bos_token_id] + tok(text + retrieval.answer_text(answer), add_special_tokens=False)["input_ids"]
        n = len(retrieval.answer_text(answer).encode())
        logits = model(input_ids=torch.tensor([ids])).logits[0, -n - 1:-1]
        target = torch.tensor(ids[-n:])
        hits = (logits.argmax(-1) == target)
        row = out.setdefault("unseen" if unseen else "seen", {"prompts": 0, "correct": 0, "bytes": 0, "bytes_right": 0,
                                                               "bits": 0.0})
        row["prompts"] += 1
        row["correct"] += int(hits.all())
        row["bytes"] += n
        row["bytes_right"] += int(hits.sum())
        row["bits"] += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item() / math.log(2)
    for row in out.values():
        row["bits_per_answer_byte"] = row.pop("bits") / row["bytes"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--paraphrases", choices=("generated", "hand"), required=True)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train_tiny.MAX_DOCS = 3
    config = train_tiny.model_config()
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 128, 384, 2
    config.num_attention_heads, config.num_key_value_heads = 4, 2
    model = LlamaForCausalLM(config)
    use_span_attention(model)
    rows = iter(train_tiny.Rows(640, 0, parallel=0.0, mix=args.paraphrases))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    started, step = time.perf_counter(), 0
    while time.perf_counter() - started < args.seconds:
        batch = [next(rows) for _ in range(6)]
        ids, weights, layout = (torch.stack(t) for t in zip(*batch))
        layout = layout[:, :, :-1]
        lr = train_tiny.lr_at(step, 10**9, 3e-3, 50, (time.perf_counter() - started) / args.seconds)
        for g in opt.param_groups:
            g["lr"] = lr
        logits = model(input_ids=ids[:, :-1], position_ids=layout[:, 0].long(), span_mask=dense_mask(layout)).logits
        per = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        w = weights[:, 1:].flatten()
        loss = (per * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.perf_counter() - started:.0f} s", flush=True)
        step += 1
    model.eval()
    result = {"paraphrases": args.paraphrases, "seconds": args.seconds, "steps": step, "final_loss": loss.item(),
              "heldout_k2_single": score(model, prompts(160))}
    print(json.dumps(result))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
