"""Train the ``tiny-trained`` preset: a small Llama (RoPE, GQA) on byte tokens.

    python benchmarks/train_tiny.py --out DIR --compile [--time-limit S] [--seed S]   (CUDA; ~7 min on an H200)

Data, drawn on the fly from seeded generators (``spanctx.bench.retrieval``):
- natural English: CPython's ``pydoc_data.topics`` (the language reference's topics as
  plain text, shipped with every CPython; Python Software Foundation License 2.0),
  every tenth topic held out;
- synthetic RAG episodes of the training split (``retrieval``: fresh letter-string values
  that never occur in the held-out set; the seen hand-written paraphrases, and with
  ``--paraphrases generated`` half of the time one of thousands of generated ones kept
  apart from the held-out templates, ``spanctx.bench.paraphrases``; with ``--paraphrases
  curriculum``, the default, the generated ones join after ``--curriculum-at`` of the run, once the
  model copies from the hand-written ones, four-digit codes included): a system line,
  K = 1..32 documents of facts about people (code, city, pet, manager) among filler prose,
  then several ``Q: ...\\nA: ...`` pairs, half of them two-document (manager chain)
  questions, ``CODE_QUESTIONS`` of them about codes. Answer tokens weigh ``ANSWER_WEIGHT``.
- ``PARALLEL_EPISODES`` of the episodes encode their documents as parallel spans
  (Block-Attention-style): each document attends only to the shared prefix (BOS and the
  system line) and itself, at the positions spanctx's parallel placement gives it; the
  questions attend to everything (``spanctx.bench.parallel_training`` says how, and a
  test checks it against spanctx). The model so learns to answer from documents it
  reads apart.

Each row of a batch packs episodes (each from BOS at position 0, masked from the others:
flex attention with a block mask, so a token's cost follows its episode's length) and
ends with natural text; ``NATURAL_ROWS`` of the rows are natural text only. Writes to
``DIR``: the model in bfloat16 safetensors with its config, ``training-log.txt`` and
``training.json`` (settings, versions, device, loss curve, held-out accuracy by K and
question kind: teacher-forced exact match of the frozen held-out prompts, which equals
greedy exact match). The learning rate follows a cosine over ``--steps`` or
``--time-limit``, whichever runs out first, so a slower device still ends its schedule.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.utils.data import DataLoader, IterableDataset
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spanctx.bench import paraphrases, retrieval  # noqa: E402
from spanctx.bench.parallel_training import Layout, block_mask, dense_mask, use_span_attention  # noqa: E402
from spanctx.tokenizer import byte_tokenizer  # noqa: E402

ANSWER_WEIGHT = 4.0
NATURAL_ROWS = 0.15
MAX_DOCS = 32
DOC_BYTES = 150  # a little over the mean document of a training world, for packing
PARALLEL_EPISODES = 0.35  # of the synthetic episodes: documents encoded as parallel spans
CODE_QUESTIONS = 0.4  # of the questions ask for a code (the hard copy: digit strings), the rest share the others


def model_config() -> LlamaConfig:
    tok = byte_tokenizer()
    return LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=8192,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)


class Rows(IterableDataset):
    """Endless ``(ids [T+1], weights [T+1], layout [4, T+1])`` rows; worker ``w`` draws
    from seed ``(seed, w)``; ``parallel`` of the episodes have parallel documents;
    ``mix`` as ``--paraphrases``: the generated paraphrases are in the mix never
    ("hand"), from the start ("generated"), or once ``mix_generated()`` is called
    ("curriculum"); the loader's workers see the switch through shared memory, so the
    rows they have already queued are the old mix."""

    def __init__(self, seq_len: int, seed: int, parallel: float = PARALLEL_EPISODES, mix: str = "hand") -> None:
        self.seq_len, self.seed, self.parallel = seq_len, seed, parallel
        self.mixed = multiprocessing.Value("b", mix == "generated", lock=False)
        if mix != "hand":  # built once here, before the loader's workers fork
            paraphrases.training_facts(), paraphrases.training_questions()
        tok = byte_tokenizer()
        self.ascii = tok("".join(map(chr, range(128))), add_special_tokens=False)["input_ids"]
        assert len(self.ascii) == 128
        texts = retrieval.natural_text(held_out=False)
        self.natural = tok("\n\n".join(texts.values()), add_special_tokens=False)["input_ids"]
        self.filler = retrieval.filler_sentences(texts)
        self.bos = tok.bos_token_id

    def mix_generated(self) -> None:
        self.mixed.value = 1

    @property
    def generated(self) -> bool:
        return bool(self.mixed.value)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (info.id if info else 0))
        while True:
            yield self.row(rng)

    def encode(self, text: str) -> list[int]:
        return [self.ascii[b] for b in text.encode("ascii")]

    def episode(self, rng: random.Random, row: Layout, room: int, first: bool) -> None:
        """One synthetic episode: BOS, a system line, K documents (one stream, or parallel
        members after the system line), then 6-16 questions and their answers."""
        parallel = rng.random() < self.parallel
        system = [self.bos] + self.encode(rng.choice(retrieval.SYSTEM_LINES))
        per_doc = DOC_BYTES + (len(system) if parallel else 0)
        fits = max(1, min(MAX_DOCS, (room - 500) // per_doc))
        generated = self.generated
        world = retrieval.make_world(rng, rng.randint(1, MAX_DOCS if first else fits), self.filler,
                                     generated=generated)
        row.start_episode()
        row.add(system[:1], 0.0)
        row.add(system[1:])
        if parallel:
            row.add_parallel(system, [self.encode(doc) for doc in world.documents])
        else:
            row.add(self.encode("".join(world.documents)))
        for _ in range(rng.randint(6, 16)):
            kind = "two" if rng.random() < 0.5 else "single"
            others = [a for a in retrieval.QUESTIONS[kind] if a != "code"]
            attribute = "code" if rng.random() < CODE_QUESTIONS else rng.choice(others)
            q = retrieval.ask(rng, world, kind, attribute=attribute, generated=generated) \
                or retrieval.ask(rng, world, "single", generated=generated)
            row.add(self.encode(retrieval.question_text(q.text)))
            row.add(self.encode(retrieval.answer_text(q.answer)), ANSWER_WEIGHT)

    def row(self, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        total = self.seq_len + 1
        row = Layout()
        if rng.random() >= NATURAL_ROWS:
            while total - len(row) > 600:
                self.episode(rng, row, total - len(row), first=not len(row))
        if len(row) < total:
            row.start_episode()
            row.add([self.bos], 0.0)
            start = rng.randrange(len(self.natural) - total)
            row.add(self.natural[start:start + total - len(row)])
        return row.tensors(total)


def lr_at(step: int, steps: int, peak: float, warmup: int, time_progress: float = 0.0) -> float:
    """Linear warm-up, then a cosine to a tenth of ``peak`` over the larger of the step
    progress and ``time_progress`` (elapsed over the time limit)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = max((step - warmup) / max(steps - warmup, 1), time_progress)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def heldout_accuracy(model, device, prompts=None, batch: int = 32) -> dict:
    """Teacher-forced exact match (every answer token, newline included, is the argmax) of
    the held-out prompts, by ``K/kind`` and overall; equals greedy exact match."""
    tok = byte_tokenizer()
    heldout = retrieval.load_heldout()
    prompts = heldout.prompts if prompts is None else prompts
    correct: dict[str, list[bool]] = {}
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        seqs = [[tok.bos_token_id] + tok(heldout.text(p) + retrieval.answer_text(p.answer),
                                         add_special_tokens=False)["input_ids"] for p in chunk]
        answer_lens = [len(retrieval.answer_text(p.answer).encode()) for p in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = torch.tensor(s)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=model.dtype != torch.float32):
            logits = model(input_ids=ids.to(device)).logits.float()
        predicted = logits.argmax(-1).cpu()  # [B, W]: the token after each position
        for j, (s, n, p) in enumerate(zip(seqs, answer_lens, chunk)):
            ok = bool((predicted[j, len(s) - n - 1:len(s) - 1] == torch.tensor(s[len(s) - n:])).all())
            correct.setdefault(f"K={p.k}/{p.kind}", []).append(ok)
            correct.setdefault(p.kind, []).append(ok)
            correct.setdefault(f"{p.kind}/{p.paraphrase}", []).append(ok)
            if p.k <= 16:
                correct.setdefault(f"K<=16/{p.kind}", []).append(ok)
            correct.setdefault("all", []).append(ok)
    return {key: {"correct": sum(v), "prompts": len(v), "accuracy": sum(v) / len(v)} for key, v in correct.items()}


@torch.no_grad()
def natural_bits_per_byte(model, device, windows: int = 16, seq_len: int = 1024) -> float:
    """Mean loss on held-out pydoc topics, in bits per byte (windows from a fixed seed)."""
    tok = byte_tokenizer()
    ids = tok("\n\n".join(retrieval.natural_text(held_out=True).values()), add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    starts = [rng.randrange(len(ids) - seq_len - 1) for _ in range(windows)]
    x = torch.tensor([ids[s:s + seq_len + 1] for s in starts], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(input_ids=x[:, :-1]).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    return loss.item() / math.log(2)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--parallel", type=float, default=PARALLEL_EPISODES,
                        help="fraction of the synthetic episodes whose documents are parallel spans")
    parser.add_argument("--paraphrases", choices=("hand", "generated", "curriculum"), default="curriculum",
                        help="training templates: the hand-written ones only; or half of the time a generated "
                             "one (spanctx.bench.paraphrases); or hand-written first, generated ones mixed in "
                             "after --curriculum-at of the run")
    parser.add_argument("--curriculum-at", type=float, default=0.45,
                        help="with --paraphrases curriculum: the fraction of the run (of --steps or "
                             "--time-limit, whichever is further along) after which generated paraphrases join")
    parser.add_argument("--attention", choices=("flex", "sdpa"), default="flex",
                        help="flex: block-sparse masks (GPU); sdpa: dense masks (any device, slow)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--time-limit", type=float, default=510.0, help="stop training after this many seconds")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--init", help="continue from this tiny-trained folder (weights and training.json)")
    parser.add_argument("--heldout-worlds", type=int, default=None,
                        help="final evaluation on the first N held-out worlds of each K (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    log_lines: list[str] = []  # earlier phases' lines are prepended at the end

    def log(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)

    config = model_config()
    if args.init:  # continue a run: its weights, a fresh optimizer and schedule, its record kept
        model = LlamaForCausalLM.from_pretrained(args.init, dtype=torch.float32).to(device)
        earlier = json.loads((Path(args.init) / "training.json").read_text())
        earlier_log = (Path(args.init) / "training-log.txt").read_text().splitlines()
    else:
        model = LlamaForCausalLM(config).to(device)
        earlier, earlier_log = None, []
    use_span_attention(model)
    params = sum(p.numel() for p in model.parameters())
    log(f"spanctx tiny-trained: {params / 1e6:.2f} M parameters, {config.num_hidden_layers} layers, hidden "
        f"{config.hidden_size}, heads {config.num_attention_heads}/{config.num_key_value_heads}, vocab "
        f"{config.vocab_size}; {device_name(device)}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}")
    log(f"natural text: pydoc_data.topics of Python {platform.python_version()} (PSF License 2.0), "
        f"{len(retrieval.natural_text())} topics for training, {len(retrieval.natural_text(True))} held out")
    log(f"settings: {json.dumps(vars(args))}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    forward = torch.compile(model) if args.compile else model
    rows = Rows(args.seq_len, args.seed, args.parallel, args.paraphrases)
    loader = DataLoader(rows, batch_size=args.batch,
                        num_workers=args.workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if args.workers else None)
    make_mask = block_mask if args.attention == "flex" else dense_mask
    probe = retrieval.load_heldout().select(worlds=4)
    curve, evals = [], []
    generated_from = {"step": 0, "seconds": 0.0} if args.paraphrases == "generated" else None
    started = time.perf_counter()
    tokens = 0
    step = 0
    mark = (started, 0)  # (time, tokens) at the last log line
    for step, (ids, weights, layout) in enumerate(loader):
        if step >= args.steps or time.perf_counter() - started > args.time_limit:
            break
        elapsed = time.perf_counter() - started
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup, elapsed / args.time_limit)
        if (args.paraphrases == "curriculum" and not rows.generated
                and max(step / args.steps, elapsed / args.time_limit) >= args.curriculum_at):
            rows.mix_generated()
            log(f"step {step}: generated paraphrases join the mix ({elapsed:.1f} s)")
            generated_from = {"step": step, "seconds": round(elapsed, 1)}
        ids, weights = ids.to(device, non_blocking=True), weights.to(device, non_blocking=True)
        layout = layout[:, :, :-1].to(device, non_blocking=True)

        def weighted_loss() -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = forward(input_ids=ids[:, :-1], position_ids=layout[:, 0].long(),
                                 span_mask=make_mask(layout)).logits
            per_token = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(),
                                                          reduction="none")
            w = weights[:, 1:].flatten()
            return (per_token * w).sum() / w.sum()

        opt.zero_grad(set_to_none=True)
        if step == 0 and make_mask is block_mask:
            try:
                loss = weighted_loss()
                loss.backward()
            except Exception as exc:  # noqa: BLE001 (a device or version without flex attention: the slow path)
                log(f"flex attention failed ({type(exc).__name__}: {str(exc)[:200]}); dense masks with sdpa")
                make_mask, forward = dense_mask, model
                opt.zero_grad(set_to_none=True)
                loss = weighted_loss()
                loss.backward()
        else:
            loss = weighted_loss()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += ids[:, :-1].numel()
        if step % 50 == 0:
            now = time.perf_counter()
            curve.append({"step": step, "loss": loss.item(), "seconds": round(now - started, 1)})
            log(f"step {step:5d}  loss {loss.item():.4f}  lr {group['lr']:.2e}  {now - started:6.1f} s  "
                f"{(tokens - mark[1]) / (now - mark[0]) / 1e6:.2f} M tok/s")
            mark = (now, tokens)
        if step % args.eval_every == 0 and step > 0:
            model.eval()
            acc = heldout_accuracy(model, device, probe)
            model.train()
            evals.append({"step": step, "seconds": round(time.perf_counter() - started, 1),
                          "single": acc["single"]["accuracy"], "two": acc["two"]["accuracy"]})
            log(f"  held-out probe ({len(probe)} prompts): single {acc['single']['accuracy']:.3f}, "
                f"two {acc['two']['accuracy']:.3f}")
    train_seconds = time.perf_counter() - started
    log(f"trained {step} steps, {tokens / 1e6:.1f} M tokens in {train_seconds:.1f} s")

    model.eval()
    weights_dir = out / "tiny-trained"
    model.set_attn_implementation("sdpa")  # what the saved model loads with
    model.to(torch.bfloat16).save_pretrained(weights_dir, safe_serialization=True)
    shipped = LlamaForCausalLM.from_pretrained(weights_dir, dtype=torch.float32).to(device).eval()
    accuracy = heldout_accuracy(shipped, device, retrieval.load_heldout().select(worlds=args.heldout_worlds))
    bpb = natural_bits_per_byte(shipped, device)
    for key, v in sorted(accuracy.items()):
        log(f"held-out {key:14s} {v['correct']:4d}/{v['prompts']:<4d} = {v['accuracy']:.3f}")
    log(f"held-out natural text: {bpb:.3f} bits per byte")
    summary = {"parameters": params, "device": device_name(device), "torch": torch.__version__,
               "transformers": transformers.__version__, "python": platform.python_version(),
               "natural_text": "pydoc_data.topics (CPython, PSF License 2.0)", "settings": vars(args),
               "steps": step, "tokens": tokens, "train_seconds": round(train_seconds, 1),
               "final_loss": curve[-1]["loss"] if curve else None, "loss_curve": curve, "probe_evals": evals,
               "generated_paraphrases_from": generated_from,
               "heldout_accuracy": accuracy, "heldout_natural_bits_per_byte": bpb,
               "weights_bytes": (weights_dir / "model.safetensors").stat().st_size}
    keys = ("device", "settings", "steps", "tokens", "train_seconds", "final_loss", "probe_evals",
            "generated_paraphrases_from", "heldout_accuracy")
    phases = earlier.get("phases", [earlier]) if earlier else []
    summary["phases"] = [{k: ph.get(k) for k in keys} for ph in phases] + [{k: summary[k] for k in keys}]
    for key in ("steps", "tokens", "train_seconds"):
        summary[key] = sum(ph[key] for ph in summary["phases"])
    if earlier:
        log_lines[:0] = earlier_log + [f"-- continued from {args.init} --"]
        summary["loss_curve"] = earlier["loss_curve"] + [
            {**c, "step": c["step"] + earlier["steps"], "seconds": round(c["seconds"] + earlier["train_seconds"], 1)}
            for c in curve]
    (weights_dir / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    (weights_dir / "training-log.txt").write_text("\n".join(log_lines) + "\n")
    (weights_dir / "generation_config.json").unlink(missing_ok=True)
    print(f"wrote {weights_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
