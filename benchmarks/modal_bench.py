"""Issue 23's benchmarks: ranking candidates for one source (encoder-decoder), and ten
questions on one image (vision-language).

    python benchmarks/modal_bench.py --part seq2seq --presets tiny-t5 t5-base --out DIR
    python benchmarks/modal_bench.py --part image --presets tiny-llava --out DIR
    python benchmarks/modal_bench.py --part image --presets llava-1.5-7b llava-1.5-7b@672 --out DIR  # GPU

seq2seq: ``--candidates`` candidates (8-40 bytes) against one ``--source-tokens`` source.
Baselines: HF, one forward per candidate (the source re-encoded each time: Alfred's
loop); HF, one batched forward of all candidates (the source encoded once per row).
spanctx: ``Seq2SeqRuntime.rank`` cold (fresh store: the source encoded once, one
batched decoder pass) and warm (the source stored). Median of ``--repeats``; the
rankings must agree.

image: one image after a ``--system-tokens`` instruction, then ten different questions.
TTFT per question (call start to the first new token on the host): HF full prefill
(processor + forward with pixel values: the vision tower and the whole prompt every
time), spanctx without reuse, spanctx with reuse (question 1 computes the instruction and
the image; questions 2-10 reuse them). ``NAME@SIZE`` runs a preset at another image size
(e.g. ``llava-1.5-7b@672``: 2304 image tokens, LLaVA-NeXT's budget).

Weights are random (timing does not depend on them). Results: DIR/modal-<part>.json and
a markdown table, printed too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spanctx  # noqa: E402
from spanctx.seq2seq import Seq2SeqRuntime  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches near "
         "the old harbour and a pale moon rises above the hills ").split()


def text_of(n_bytes: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    out = ""
    while len(out) < n_bytes:
        out += WORDS[rng.integers(len(WORDS))] + " "
    return out[:n_bytes]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


# -- seq2seq --------------------------------------------------------------------------------


def bench_seq2seq(preset: str, args, device: torch.device) -> dict:
    model, tokenizer = spanctx.load_preset(preset, device=device, model_class=transformers.AutoModelForSeq2SeqLM)
    source = text_of(args.source_tokens - 1, seed=1)
    candidates = [text_of(8 + 32 * i // args.candidates, seed=100 + i) for i in range(args.candidates)]
    rt = Seq2SeqRuntime(model, tokenizer, store_bytes=1 << 30)
    src = torch.tensor([rt.source_ids(source)], device=device)
    start = rt.decoder_ids()
    rows = [list(start) + list(rt.resolver.span_ids(spanctx.Span(c))) for c in candidates]

    def logprob(logits: torch.Tensor, ids: list[int]) -> float:
        lp = torch.log_softmax(logits.float(), dim=-1)
        return sum(lp[j - 1, ids[j]].item() for j in range(1, len(ids)))

    def hf_loop() -> list[float]:
        with torch.inference_mode():
            return [logprob(model(input_ids=src, decoder_input_ids=torch.tensor([r], device=device)).logits[0], r)
                    for r in rows]

    def hf_batch() -> list[float]:
        width = max(len(r) for r in rows)
        dec = torch.tensor([r + [start[0]] * (width - len(r)) for r in rows], device=device)
        with torch.inference_mode():
            logits = model(input_ids=src.expand(len(rows), -1), decoder_input_ids=dec).logits
        return [logprob(logits[i], r) for i, r in enumerate(rows)]

    def spanctx_rank(fresh: bool) -> list[float]:
        if fresh:
            rt.store.clear()
        return [s.logprob for s in rt.score(source, candidates)]

    timings: dict[str, list[float]] = {"hf_loop": [], "hf_batch": [], "spanctx_cold": [], "spanctx_warm": []}
    results = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, fn in (("hf_loop", hf_loop), ("hf_batch", hf_batch), ("spanctx_cold", lambda: spanctx_rank(True)),
                         ("spanctx_warm", lambda: spanctx_rank(False))):
            seconds, results[name] = timed(fn, device)
            if repeat:
                timings[name].append(seconds)
    order = {name: sorted(range(len(candidates)), key=lambda i: -scores[i]) for name, scores in results.items()}
    median = {name: statistics.median(t) for name, t in timings.items()}
    return {"preset": preset, "source_tokens": src.shape[1], "candidates": len(candidates),
            "candidate_tokens": [len(r) - 1 for r in rows], "timings_s": timings, "median_s": median,
            "speedup_vs_hf_loop": {k: median["hf_loop"] / median[k] for k in ("spanctx_cold", "spanctx_warm")},
            "speedup_vs_hf_batch": {k: median["hf_batch"] / median[k] for k in ("spanctx_cold", "spanctx_warm")},
            "rankings_agree": all(o == order["hf_loop"] for o in order.values()),
            "max_logprob_diff": max(abs(a - b) for a, b in zip(results["spanctx_warm"], results["hf_loop"]))}


# -- image ----------------------------------------------------------------------------------


def load_vlm(spec: str, device: torch.device):
    from spanctx.presets import preset_config
    from spanctx.vision_presets import llava_processor

    name, _, size = spec.partition("@")
    if not size:
        return spanctx.load_preset(name, device=device)
    config = preset_config(name)
    config.vision_config.image_size = int(size)
    config.image_seq_length = (int(size) // config.vision_config.patch_size) ** 2
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=spanctx.PRESETS[name].dtype)
    return model.eval(), llava_processor(config)


def bench_image(spec: str, args, device: torch.device) -> dict:
    model, processor = load_vlm(spec, device)
    started = time.perf_counter()
    rt = spanctx.Runtime(model, processor, store_bytes=8 << 30)
    construction_s = time.perf_counter() - started  # on CUDA: the static executor's warm-up
    executors: list[str | None] = []
    picture = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    system = text_of(args.system_tokens, seed=2)
    questions = [f"\nQuestion {i}: what is in the {WORDS[i]} part of the picture? " + text_of(24, seed=i)
                 for i in range(args.questions)]
    base = spanctx.Context().append(system).append(spanctx.Image(picture))

    def hf_ttft(question: str) -> tuple[float, int]:
        def run():
            inputs = processor(text=system + "<image>" + question, images=picture, return_tensors="pt").to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                return model(**inputs, logits_to_keep=1).logits[0, -1].argmax().item(), inputs["input_ids"].shape[1]
        seconds, (token, n) = timed(run, device)
        return seconds, token, n

    def spanctx_ttft(question: str, reuse: bool):
        result = rt.generate(base.append(question), max_new_tokens=1, reuse=reuse)
        executors.append(result.stats.executor if reuse else None)
        return result.stats.ttft_s, result.token_ids[0], result.stats.cached_tokens

    hf_ttft(questions[0])  # warm-up: kernels, allocator
    spanctx_ttft(questions[0], reuse=False)
    hf, plain, reused, agree, cached = [], [], [], [], []
    for q in questions:
        seconds, token, prompt_tokens = hf_ttft(q)
        hf.append(seconds)
        plain.append(spanctx_ttft(q, reuse=False)[0])
        seconds, own, hits = spanctx_ttft(q, reuse=True)
        reused.append(seconds)
        cached.append(hits)
        agree.append(own == token)
    warm = statistics.median(reused[1:])
    return {"preset": spec, "prompt_tokens": prompt_tokens, "image_tokens": model.config.image_seq_length,
            "questions": len(questions), "ttft_s": {"hf_full_prefill": hf, "spanctx_no_reuse": plain,
                                                    "spanctx_reuse": reused},
            "median_ttft_s": {"hf_full_prefill": statistics.median(hf), "spanctx_no_reuse": statistics.median(plain),
                              "spanctx_reuse_q1": reused[0], "spanctx_reuse_q2_10": warm},
            "speedup_q2_10_vs_hf": statistics.median(hf) / warm,
            "speedup_ten_questions_total": sum(hf) / sum(reused),
            "cached_tokens": cached, "first_token_agrees_with_hf": agree,
            "executor_reuse": [e for e in executors if e is not None][-len(questions):],
            "runtime_construction_s": construction_s}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


COLUMNS = {  # part: (header, cell of a row) pairs
    "seq2seq": [("preset", lambda r: r["preset"]), ("source tokens", lambda r: r["source_tokens"]),
                ("candidates", lambda r: r["candidates"]),
                *((name, lambda r, k=key: _ms(r["median_s"][k])) for name, key in (
                    ("HF loop", "hf_loop"), ("HF batch", "hf_batch"), ("spanctx cold", "spanctx_cold"),
                    ("spanctx warm", "spanctx_warm"))),
                ("cold vs loop", lambda r: f"{r['speedup_vs_hf_loop']['spanctx_cold']:.1f}x"),
                ("warm vs loop", lambda r: f"{r['speedup_vs_hf_loop']['spanctx_warm']:.1f}x"),
                ("cold vs batch", lambda r: f"{r['speedup_vs_hf_batch']['spanctx_cold']:.1f}x"),
                ("rankings agree", lambda r: r["rankings_agree"])],
    "image": [("preset", lambda r: r["preset"]), ("prompt tokens", lambda r: r["prompt_tokens"]),
              ("image tokens", lambda r: r["image_tokens"]),
              *((name, lambda r, k=key: _ms(r["median_ttft_s"][k])) for name, key in (
                  ("HF full prefill", "hf_full_prefill"), ("spanctx no reuse", "spanctx_no_reuse"),
                  ("spanctx q1", "spanctx_reuse_q1"), ("spanctx q2-10", "spanctx_reuse_q2_10"))),
              ("q2-10 speedup", lambda r: f"{r['speedup_q2_10_vs_hf']:.1f}x"),
              ("ten questions total", lambda r: f"{r['speedup_ten_questions_total']:.1f}x"),
              ("first tokens agree", lambda r: f"{sum(r['first_token_agrees_with_hf'])}/{r['questions']}")],
}


def table(part: str, rows: list[dict]) -> str:
    columns = COLUMNS[part]
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell(r)) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["seq2seq", "image"], required=True)
    parser.add_argument("--presets", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--source-tokens", type=int, default=512)
    parser.add_argument("--system-tokens", type=int, default=256)
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default="", help="a suffix for the result file names")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    bench = bench_seq2seq if args.part == "seq2seq" else bench_image
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"date": datetime.date.today().isoformat(), "device": machine, "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(), "args": vars(args)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"modal-{args.part}{'-' + args.tag if args.tag else ''}"
    versions = f"{machine}, torch {torch.__version__}, transformers {transformers.__version__}"
    rows = []
    for preset in args.presets:  # written after each preset: a run cut short keeps what finished
        rows.append(bench(preset, args, device))
        print(json.dumps(rows[-1], default=str)[:400], flush=True)
        (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
        text = f"{versions}\n\n{table(args.part, rows)}\n"
        (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
