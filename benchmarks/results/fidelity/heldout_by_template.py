"""Full prefill on the held-out set by the held-out template a prompt needs (run from the
repository root; CPU is enough):

    python benchmarks/results/fidelity/heldout_by_template.py [--ks 2,4,8,16] [--out FILE]

Each prompt (K in ``--ks``) is scored by teacher-forced exact match, as the training
record scores it, and filed under every held-out template it needs: its question's, and
the template of each fact it reads (a single-document question reads the asked fact, a
two-document one the manager fact and the manager's asked fact). For each held-out
template: the prompts that need it, how many are right, and the nearest training
template (hand-written or generated) with its word edits (``spanctx.bench.paraphrases``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from spanctx.bench import paraphrases, retrieval
from spanctx.presets import PRESETS
from spanctx.tokenizer import byte_tokenizer


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{name\}", r"(\S+)").replace(r"\{value\}", r"(\S+?)") + "$")


def needs(heldout: retrieval.HeldOut, prompt: retrieval.Prompt) -> list[str]:
    """The held-out templates ``prompt`` needs (none: it reads seen templates only)."""
    out = [t for t in paraphrases.held_out_templates() if "{value}" not in t and _pattern(t).match(prompt.question)]
    name = re.findall(r"[A-Z][a-z]+", prompt.question)[-1]
    values = prompt.answer.split(", ")
    wanted = {(name, values[0])} if prompt.kind == "single" else {(name, values[0]), (values[0], values[1])}
    sentences = [s for d in heldout.docs(prompt) for s in re.split(r"(?<=\.) ", d.strip())]
    for facts in paraphrases.FACTS.values():
        m = [_pattern(facts[-1]).match(s) for s in sentences]
        if any(x and (x.group(1), x.group(2)) in wanted for x in m):
            out.append(facts[-1])
    return out


@torch.no_grad()
def right(model, tok, heldout, prompt) -> tuple[bool, str]:
    """Whether every answer byte is the argmax, and the argmax bytes (teacher-forced)."""
    answer = retrieval.answer_text(prompt.answer)
    ids = [tok.bos_token_id] + tok(heldout.text(prompt) + answer, add_special_tokens=False)["input_ids"]
    n = len(answer.encode())
    predicted = model(input_ids=torch.tensor([ids])).logits[0, -n - 1:-1].argmax(-1)
    return bool((predicted == torch.tensor(ids[-n:])).all()), tok.decode(predicted.tolist()).strip()


def nearest(template: str) -> tuple[str, int]:
    training = [t for ts in paraphrases.FACTS.values() for t in ts[:-1]] \
        + [t for d in paraphrases.QUESTIONS.values() for ts in d.values() for t in ts[:-1]] \
        + [t for ts in paraphrases.training_facts().values() for t in ts] \
        + [t for d in paraphrases.training_questions().values() for ts in d.values() for t in ts]
    mine = paraphrases.words(template)
    return min((paraphrases.edits(paraphrases.words(t), mine), t) for t in training)[::-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="2,4,8,16")
    parser.add_argument("--weights", default=str(PRESETS["tiny-trained"].weights_dir), help="a tiny-trained folder")
    parser.add_argument("--out", default=str(Path(__file__).parent / "heldout-by-template.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = LlamaForCausalLM.from_pretrained(args.weights, dtype=torch.float32).eval()
    tok = byte_tokenizer()
    heldout = retrieval.load_heldout()
    rows: dict[str, dict] = {}
    wrong = []
    for p in heldout.select([int(k) for k in args.ks.split(",")]):
        ok, said = right(model, tok, heldout, p)
        if not ok:
            wrong.append({"k": p.k, "kind": p.kind, "question": p.question, "answer": p.answer, "argmax": said,
                          "needs": needs(heldout, p)})
        for key in needs(heldout, p) or ["(seen templates only)"]:
            row = rows.setdefault(key, {"single": [0, 0], "two": [0, 0]})
            row[p.kind][0] += ok
            row[p.kind][1] += 1
    for key, row in rows.items():
        if key.startswith("("):
            continue
        row["nearest_training"], row["edits"] = nearest(key)
    print(f"{'held-out template':45s} {'single':>8s} {'two':>8s}  nearest training template (word edits)")
    for key, row in sorted(rows.items()):
        cells = [f"{r[0]}/{r[1]}" for r in (row["single"], row["two"])]
        print(f"{key:45s} {cells[0]:>8s} {cells[1]:>8s}  {row.get('nearest_training', '')} ({row.get('edits', '')})")
    record = {"weights": args.weights, "ks": args.ks, "by_template": rows, "wrong": wrong}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
