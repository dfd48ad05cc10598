"""The static executor against HF eager and HF's own static-cache compiled generate.

    python benchmarks/static_bench.py --out DIR [--preset llama-3.1-8b] [--prefix 8192]

One model with a cached prefix (built by a plain HF forward); for every method: TTFT of
a ``--suffix``-token question over the prefix (first token on the host), decode ms per
token at that length, a ``--new``-token answer end to end, the max logit difference
against HF eager, and greedy agreement with HF eager. Static executor variants also
report capture/compile seconds per bucket and buffer memory. Micro-benchmarks split one
decode step into attention and matrix-vector time. Results go to DIR/static-bench.json
(rewritten after each section, so a run cut short keeps what finished) and a short
table is printed last. Sections run most important first and stop starting new ones
after ``--budget-s`` seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spanctx  # noqa: E402
from spanctx.bench.floor import measure_floor  # noqa: E402
from spanctx.bench.timing import now  # noqa: E402
from spanctx.cache import kv as kvops  # noqa: E402
from spanctx.cache.span_kv import SpanKV  # noqa: E402
from spanctx.core.options import merge_options  # noqa: E402
from spanctx.engine.slots import split_attention  # noqa: E402
from spanctx.engine.static import Row, StaticExecutor  # noqa: E402
from spanctx.hf import cache_kwargs  # noqa: E402

VARIANTS = {  # name: StaticExecutor kwargs, most important first
    "static graph split compiled": dict(attention="split", compile=True),
    "static graph split": dict(attention="split"),
    "static graph split 1 piece": dict(attention="split", chunks=1),
    "static graph hf-sdpa": dict(attention="hf"),
}


def median_ms(fn, repeats: int, device) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = now(device)
        fn()
        times.append((now(device) - start) * 1e3)
    return statistics.median(times), times


def agreement(tokens: list[int], reference: list[int]) -> str:
    """How many leading greedy tokens equal the reference's."""
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(tokens))
    return f"{same}/{len(tokens)}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prefix", type=int, default=8192)
    parser.add_argument("--suffix", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=420)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--hf-static", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"env": {
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if device.type == "cuda"
        else "cpu", "torch": torch.__version__, "transformers": transformers.__version__, "preset": args.preset,
        "prefix": args.prefix, "suffix": args.suffix, "new": args.new}, "methods": {}, "micro": {}}

    def save() -> None:
        (args.out / "static-bench.json").write_text(json.dumps(results, indent=1))

    def time_left() -> bool:
        return time.perf_counter() - started < args.budget_s

    model, _ = spanctx.load_preset(args.preset, device=device, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None  # random weights: never stop before --new tokens
    floor = measure_floor(model, device)
    results["floor"] = {"weight_gb": floor.weight_bytes / 1e9, "copy_gbps": floor.bandwidth_gbps,
                        "floor_ms": floor.floor_ms}
    print(f"floor {floor.floor_ms:.2f} ms ({floor.weight_bytes / 1e9:.2f} GB at {floor.bandwidth_gbps:.0f} GB/s)")
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(min(300, vocab // 2), vocab, (1, args.prefix + args.suffix), generator=gen).to(device)
    total = args.prefix + args.suffix
    with torch.inference_mode():
        cache = kvops.empty_cache()
        model(input_ids=ids[:, :args.prefix], use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        span = kvops.as_slices(cache)
        del cache
        full_ms, _ = median_ms(lambda: model(input_ids=ids, logits_to_keep=1), 3, device)
        full_logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
    results["full_prefill_ms"] = full_ms
    print(f"full prefill of {total}: {full_ms:.1f} ms")

    def fresh_prefix() -> list[kvops.KVSlice]:  # a new SpanKV object: the executor must copy it
        return [kvops.KVSlice.whole(SpanKV(span.keys, span.values))]

    eager = eager_baseline(model, ids, span, args, device)
    results["methods"]["hf eager (DynamicCache)"] = {k: v for k, v in eager.items() if k != "logits"}
    save()
    print(f"hf eager: ttft {eager['ttft_ms']:.1f} decode {eager['decode_ms']:.2f} e2e {eager['e2e_ms']:.1f} ms")
    results["micro"] = micro(model, args.prefix + args.suffix + args.new, device)
    save()

    for name in args.variants.split(","):
        if not time_left():
            results["methods"][name] = {"skipped": "time budget"}
            continue
        try:
            results["methods"][name] = static_variant(model, ids, span, fresh_prefix, VARIANTS[name], args,
                                                      device, eager, full_logits)
        except Exception as exc:  # one variant's failure must not lose the others
            results["methods"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        torch.cuda.empty_cache() if device.type == "cuda" else None
        save()
        print(name, results["methods"][name])

    if args.hf_static and device.type == "cuda":
        if time_left():
            try:
                results["methods"]["hf static cache compiled (full prefill)"] = hf_static(model, ids, args, device)
            except Exception as exc:
                results["methods"]["hf static cache compiled (full prefill)"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        else:
            results["methods"]["hf static cache compiled (full prefill)"] = {"skipped": "time budget"}
    results["elapsed_s"] = time.perf_counter() - started
    save()
    table(results)


def eager_baseline(model, ids, span, args, device) -> dict:
    """spanctx's eager executor today: assemble a DynamicCache (one copy), HF forward/generate."""
    suffix = ids[:, args.prefix:]
    kwargs = lambda cache: cache_kwargs(model, cache)  # noqa: E731
    with torch.inference_mode():
        def ttft():
            cache = kvops.assemble([kvops.KVSlice.whole(span)])
            return model(input_ids=suffix, use_cache=True, logits_to_keep=1, **kwargs(cache)).logits[0, -1].argmax().item()

        ttft()
        ttft_ms, _ = median_ms(ttft, args.repeats, device)
        cache = kvops.assemble([kvops.KVSlice.whole(span)])
        logits = model(input_ids=suffix, use_cache=True, logits_to_keep=1, **kwargs(cache)).logits[0, -1].float()

        def generate(n):
            cache = kvops.assemble([kvops.KVSlice.whole(span)])
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  do_sample=False, **kwargs(cache))

        tokens = generate(args.new)[0, ids.shape[1]:]
        one, _ = median_ms(lambda: generate(1), 3, device)
        many, _ = median_ms(lambda: generate(args.new + 1), 3, device)
        e2e_ms, _ = median_ms(lambda: generate(args.new), 3, device)
        # the bf16 noise floor on random weights: full prefill against reuse, both HF eager
        full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                              do_sample=False)[0, ids.shape[1]:]
        full_logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
    return {"ttft_ms": ttft_ms, "decode_ms": (many - one) / args.new, "e2e_ms": e2e_ms, "tokens": tokens.tolist(),
            "logits": logits, "max_abs_logit": logits.abs().max().item(),
            "max_logit_diff_vs_full_prefill": (logits - full_logits).abs().max().item(),
            "rel_l2_vs_full_prefill": ((logits - full_logits).norm() / full_logits.norm()).item(),
            "greedy_agreement_vs_full_prefill": agreement(tokens.tolist(), full.tolist()), "full_tokens": full.tolist()}


def static_variant(model, ids, span, fresh_prefix, kwargs, args, device, eager, full_logits) -> dict:
    total = ids.shape[1]
    ex = StaticExecutor(model, max_tokens=total + args.new, **kwargs)
    out: dict = {"memory_gb": ex.memory_bytes / 1e9, "attention": ex.attention}
    greedy = lambda n: merge_options({}, {"max_new_tokens": n})  # noqa: E731
    first = ex.forward([Row(ids[0], fresh_prefix(), args.prefix)])
    out["capture_tail_s"] = first.stats.build_s
    logits = first.logits[0, -1].float()
    out["max_logit_diff_vs_eager"] = (logits - eager["logits"]).abs().max().item()
    out["max_logit_diff_vs_full_prefill"] = (logits - full_logits).abs().max().item()
    out["rel_l2_vs_full_prefill"] = ((logits - full_logits).norm() / full_logits.norm()).item()
    out["stats"] = str(first.stats)
    resident = fresh_prefix()
    out["ttft_cold_ms"], _ = median_ms(lambda: ex.forward([Row(ids[0], fresh_prefix(), args.prefix)]).logits[0, -1].argmax()
                                       .item(), args.repeats, device)
    out["ttft_resident_ms"], _ = median_ms(lambda: ex.forward([Row(ids[0], resident, args.prefix)]).logits[0, -1].argmax()
                                           .item(), args.repeats, device)
    warm = ex.generate([Row(ids[0], fresh_prefix(), args.prefix)], options=greedy(args.new))
    out["capture_decode_s"] = warm.stats.build_s
    tokens = warm.sequences[0, total:].tolist()
    out["greedy_agreement"] = agreement(tokens, eager["tokens"])
    out["greedy_agreement_vs_full_prefill"] = agreement(tokens, eager["full_tokens"])
    one, _ = median_ms(lambda: ex.generate([Row(ids[0], resident, args.prefix)], options=greedy(1)), 5, device)
    many, _ = median_ms(lambda: ex.generate([Row(ids[0], resident, args.prefix)], options=greedy(args.new + 1)), 3, device)
    out["decode_ms"] = (many - one) / args.new
    out["e2e_cold_ms"], _ = median_ms(lambda: ex.generate([Row(ids[0], fresh_prefix(), args.prefix)], options=greedy(args.new)),
                                      3, device)
    out["e2e_resident_ms"], _ = median_ms(lambda: ex.generate([Row(ids[0], resident, args.prefix)], options=greedy(args.new)),
                                          3, device)
    sampled = [ex.generate([Row(ids[0], resident, args.prefix)], options=merge_options({}, {"max_new_tokens": 8, "seed": 7,
                                                                                  "do_sample": True}))
               .sequences[0, total:].tolist() for _ in range(2)]
    out["sampling_reproducible"] = sampled[0] == sampled[1]
    # a shorter cached context: another attention bucket, built on its first call
    half = args.prefix // 2
    short_ids, short_prefix = ids[:, :half + args.suffix], [kvops.KVSlice(span, 0, half)]
    first_short = ex.forward([Row(short_ids[0], short_prefix, half)])
    out["new_cache_bucket"] = {"prefix": half, "cache_bucket": first_short.stats.cache_bucket,
                               "build_s": first_short.stats.build_s}
    out["new_cache_bucket"]["ttft_resident_ms"], _ = median_ms(
        lambda: ex.forward([Row(short_ids[0], short_prefix, half)]).logits[0, -1].argmax().item(), args.repeats, device)
    out["builds"] = ex.build_stats.builds
    out["build_s"] = ex.build_stats.seconds
    return out


def hf_static(model, ids, args, device) -> dict:
    """HF generate with cache_implementation="static": compiled decode, full prefill each call."""
    from transformers import CompileConfig

    def run(n):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              cache_implementation="static", compile_config=CompileConfig())

    with torch.inference_mode():
        start = now(device)
        run(args.new)
        first_s = now(device) - start
        one, _ = median_ms(lambda: run(1), 3, device)
        many, _ = median_ms(lambda: run(args.new + 1), 3, device)
        e2e, _ = median_ms(lambda: run(args.new), 3, device)
    return {"first_call_s": first_s, "ttft_ms": one, "decode_ms": (many - one) / args.new, "e2e_ms": e2e}


def micro(model, length: int, device) -> dict:
    """One decode step's parts over ``length`` slots, x layers, each in a CUDA graph: split
    attention by piece count (one query, and a 64-token suffix), SDPA over the exact
    length (flash, no mask: the kernel floor), HF's masked SDPA, and the layers'
    matrix-vector products (+ lm_head). Every layer reads its own keys and values, as
    in the model (one shared set would sit in L2 and flatter the kernels)."""
    if device.type != "cuda":
        return {}
    text = model.config.get_text_config()
    layers, heads, kv_heads = text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads
    dim, group = text.hidden_size // heads, heads // kv_heads
    L = -(-length // 256) * 256
    dtype = model.dtype
    kv = [tuple(torch.randn(1, kv_heads, L, dim, device=device, dtype=dtype) for _ in range(2)) for _ in range(layers)]
    mask = torch.zeros(1, 1, 1, L, device=device, dtype=dtype)
    mask[..., length:] = torch.finfo(dtype).min
    f = torch.nn.functional.scaled_dot_product_attention
    cases = {}
    for tokens in (1, 64):
        qf = torch.randn(1, kv_heads, group * tokens, dim, device=device, dtype=dtype)
        maskf = mask.expand(1, 1, group * tokens, L).contiguous()
        for chunks in (1, 4, 8, 16, 32):
            cases[f"split T={tokens} chunks={chunks}"] = (
                lambda qf=qf, maskf=maskf, c=chunks: [split_attention(qf, k, v, maskf, None, c) for k, v in kv])
        qt = torch.randn(1, heads, tokens, dim, device=device, dtype=dtype)
        cases[f"sdpa exact length T={tokens} (floor)"] = (
            lambda qt=qt, t=tokens: [f(qt, k[:, :, :length], v[:, :, :length], enable_gqa=True, is_causal=t > 1)
                                     for k, v in kv])
    qh = torch.randn(1, heads, 1, dim, device=device, dtype=dtype)
    cases["sdpa masked + repeat_kv (HF) T=1"] = lambda: [
        f(qh, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask) for k, v in kv]
    x = torch.randn(1, 1, text.hidden_size, device=device, dtype=dtype)
    hidden = torch.randn(1, 1, text.intermediate_size, device=device, dtype=dtype)

    def matvecs():  # every layer's weights are read: the model's own layers
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
                lin(x)
            layer.mlp.down_proj(hidden)
        model.lm_head(x)

    cases["matvec x layers + lm_head"] = matvecs
    out = {}
    with torch.inference_mode():
        for name, body in cases.items():
            try:
                body()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    body()
                out[name + " (ms/step)"], _ = median_ms(graph.replay, 20, device)
            except Exception as exc:
                out[name] = f"error: {type(exc).__name__}: {exc}"[:300]
    del kv
    print("micro", out)
    return out


def table(results: dict) -> None:
    print(f"\n{results['env']}  floor {results['floor']['floor_ms']:.2f} ms  full prefill "
          f"{results['full_prefill_ms']:.1f} ms")
    print(f"{'method':44} {'TTFT ms':>9} {'TTFT res':>9} {'dec ms/t':>9} {'e2e ms':>8} {'e2e res':>8} {'capture s':>10}"
          f" {'dlogit':>7} {'agree':>6}")
    for name, m in results["methods"].items():
        if "error" in m or "skipped" in m:
            print(f"{name:44} {m.get('error', m.get('skipped'))[:120]}")
            continue
        cap = m.get("capture_tail_s", m.get("first_call_s", 0)) + m.get("capture_decode_s", 0)
        cells = [m.get("ttft_cold_ms", m.get("ttft_ms")), m.get("ttft_resident_ms"), m.get("decode_ms"),
                 m.get("e2e_cold_ms", m.get("e2e_ms")), m.get("e2e_resident_ms"), cap,
                 m.get("max_logit_diff_vs_eager")]
        text = " ".join(f"{c:>9.2f}" if isinstance(c, float) else f"{'-':>9}" for c in cells)
        print(f"{name:44} {text} {m.get('greedy_agreement', '-'):>6}")


if __name__ == "__main__":
    main()
