"""Time ``keys.model_namespace`` (which reads every weight) on a real model shape.

Builds a preset with random weights (default: the Llama-3.1-8B shape on cuda in bf16),
calls ``model_namespace`` once to warm up, then times 3 calls and prints the median:

    PYTHONPATH=. python benchmarks/fingerprint_cost.py            # fingerprint 8B: X ms
    PYTHONPATH=. python benchmarks/fingerprint_cost.py --device cpu --layers 2

With ``$OUT`` set, also writes ``$OUT/<date>-<device>-fingerprint-<preset>-<layers>layers.json``
(timings, element and byte counts, device, versions, the extra device memory the call
took, and the cost of the weight-free ``identity`` path for comparison).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
import transformers

from spanctx import load_preset
from spanctx.cache.fingerprint import model_namespace


def timed_ms(call, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` calls after one warm-up call (``call`` returns host bytes,
    so each call has finished on the device when it returns)."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=None, help="num_hidden_layers override (a smaller shape)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    model, _ = load_preset(args.preset, device=args.device, **overrides)
    tensors = [t for _, t in (*model.named_parameters(), *model.named_buffers())]
    elements = sum(t.numel() for t in tensors)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)

    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if cuda else 0
    weights_ms = timed_ms(lambda: model_namespace(model), args.repeats)
    extra_bytes = torch.cuda.max_memory_allocated() - resident if cuda else None
    identity_ms = timed_ms(lambda: model_namespace(model, identity="benchmark"), args.repeats)
    median = statistics.median(weights_ms)

    default_shape = args.preset == "llama-3.1-8b" and args.layers is None
    if default_shape:
        print(f"fingerprint 8B: {median:.1f} ms")
    else:
        print(f"fingerprint {args.preset} ({model.config.num_hidden_layers} layers, {elements / 1e9:.3f}G elements)"
              f" on {args.device}: {median:.1f} ms, {median * 1e6 / elements:.3f} ns/element")
    if out := os.environ.get("OUT"):
        device_name = torch.cuda.get_device_name(args.device) if cuda else "cpu"
        record = {
            "date": datetime.date.today().isoformat(),
            "device": device_name,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "preset": args.preset,
            "num_hidden_layers": model.config.num_hidden_layers,
            "dtype": str(model.dtype),
            "tensors": len(tensors),
            "elements": elements,
            "bytes": nbytes,
            "weights_ms": weights_ms,
            "weights_median_ms": median,
            "read_GB_per_s": nbytes / median / 1e6,
            "extra_device_bytes": extra_bytes,
            "identity_ms": identity_ms,
        }
        slug = "-".join(device_name.lower().split())
        name = f"{record['date']}-{slug}-fingerprint-{args.preset}-{record['num_hidden_layers']}layers.json"
        path = Path(out) / name
        path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
