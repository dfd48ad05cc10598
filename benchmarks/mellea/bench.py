"""Benchmark: one Mellea program on stock ``LocalHFBackend`` and on ``SpanctxBackend``.

The program (Mellea's instruct / validate / repair pattern)::

    session.instruct("Summarise the report ...", grounding_context={"report": REPORT},
                     requirements=[five requirements],
                     strategy=MultiTurnStrategy(loop_budget=3))

generates an answer, checks the five requirements with the requirement-check aLoRA
(Mellea routes a plain requirement to it when the adapter is added), and, while one
fails, asks for a repair in the same chat, up to two repair rounds. On random weights no
requirement passes (Mellea 0.8.0 reads a rerouted plain requirement's aLoRA answer
with ``default_output_to_bool``, which never says yes to its JSON), so both backends do
the same work every run: 3 generations and 15 checks.

Both backends run on their own copy of the same random-weight preset (``--model``), with
the same random aLoRA (PEFT, rank ``--rank``) and the stand-in io.yaml below. Measured per
run: end-to-end seconds, model forward calls, and tokens through the model (prompt
tokens of prefill forwards; one per decode step), counted by a pre-hook on the model.

    python benchmarks/mellea/bench.py --model tiny-llama --device cpu --out DIR
    python benchmarks/mellea/bench.py --model llama-3.1-8b --device cuda --report-tokens 8192 --out DIR
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.metadata
import json
import pathlib
import platform
import statistics
import tempfile
import time

import torch
from mellea import MelleaSession
from mellea.backends import ModelOption
from mellea.backends.huggingface import LocalHFBackend
from mellea.stdlib.context import ChatContext
from mellea.stdlib.sampling import MultiTurnStrategy

import spanctx
from spanctx.bench.random_adapters import make_adapter
from spanctx.integrations.mellea import LocalIntrinsicAdapter, SpanctxBackend
from spanctx.tokenizer import byte_tokenizer

INVOCATION = "<requirements>:"
REQUIREMENTS = [
    "The summary is at most three sentences long.",
    "The summary names the river and the gauge.",
    "The summary gives the rise in metres.",
    "The summary does not speculate about causes.",
    "The summary is written in plain English.",
]
# Stand-in requirement-check io.yaml (no hub here): Mellea's contract
# {"requirement_check": {"score": P(yes)}} from the likelihood of a short answer, "yes" or
# "no" as a JSON string (a few byte tokens; no object whose free whitespace a random model
# would fill up to Mellea's grammar limit of 20 characters per place).
REQUIREMENT_CHECK_IO = {
    "model": None,
    "response_format": json.dumps({"type": "string", "enum": ["yes", "no"]}),
    "transformations": [
        {"type": "likelihood", "categories_to_values": {"yes": 1.0, "no": 0.0}, "input_path": []},
        {"type": "nest", "input_path": [], "field_name": "score"},
        {"type": "nest", "input_path": [], "field_name": "requirement_check"},
    ],
    "instruction": f"{INVOCATION} {{requirement}}\nDoes the last answer meet the requirement? Answer yes or no.",
    "parameters": {"max_completion_tokens": 8},
    "sentence_boundaries": None,
}
METHODS = {"stock": LocalHFBackend, "spanctx": SpanctxBackend}


class ForwardCounter:
    """Counts model forward calls and the tokens they feed (forward hooks). With ``timed``,
    also the seconds spent in prefill and decode forwards (the device synchronised
    around each forward: a breakdown, not for end-to-end timing)."""

    def __init__(self, model, timed: bool) -> None:
        self.calls = self.prefill_tokens = self.decode_steps = 0
        self.prefill_s = self.decode_s = 0.0
        self.timed = timed
        self._started: tuple[float, bool] | None = None
        self.handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                        model.register_forward_hook(self._after, with_kwargs=True)]

    def _before(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        self.calls += 1
        prefill = ids.shape[-1] > 1
        if prefill:
            self.prefill_tokens += ids.numel()
        else:
            self.decode_steps += ids.shape[0]
        if self.timed:
            _sync(ids.device)
            self._started = (time.perf_counter(), prefill)

    def _after(self, module, args, kwargs, output) -> None:
        if self._started is None:
            return
        _sync(output.logits.device)
        started, prefill = self._started
        self._started = None
        if prefill:
            self.prefill_s += time.perf_counter() - started
        else:
            self.decode_s += time.perf_counter() - started

    def snapshot(self) -> tuple:
        return self.calls, self.prefill_tokens, self.decode_steps, self.prefill_s, self.decode_s

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report_text(tokenizer, num_tokens: int, run: int) -> str:
    """Run ``run``'s readable, deterministic report of about ``num_tokens`` tokens (each
    run gets its own, so no run reuses an earlier run's KV)."""
    lines, i = [f"Report {run} of the river authority."], 0
    while len(tokenizer("\n".join(lines), add_special_tokens=False)["input_ids"]) < num_tokens:
        lines.append(f"At {i % 24:02d}:00 gauge {i % 7} on the river read {1 + (i * 37) % 300 / 100:.2f} metres; "
                     f"the crew logged note {i}.")
        i += 1
    return "\n".join(lines)


def program(backend, report: str, new_tokens: int) -> dict:
    """The Mellea program; what it did."""
    session = MelleaSession(backend, ctx=ChatContext())
    result = session.instruct(
        "Summarise the report for the river authority.", grounding_context={"report": report},
        requirements=REQUIREMENTS, strategy=MultiTurnStrategy(loop_budget=3),
        model_options={ModelOption.MAX_NEW_TOKENS: new_tokens}, return_sampling_results=True)
    return {"rounds": len(result.sample_generations), "passed": bool(result.success)}


def run_method(name: str, model, tokenizer, device, adapter: pathlib.Path, reports: list[str], new_tokens: int,
               time_forwards: bool) -> dict:
    backend = METHODS[name](f"random-{name}", custom_config=(tokenizer, model, device))
    backend.add_adapter(LocalIntrinsicAdapter("requirement-check", adapter, REQUIREMENT_CHECK_IO))
    counter = ForwardCounter(model, time_forwards)
    runs = []
    for i, report in enumerate(reports):  # the first run warms up (kernels, llguidance tables); not timed
        _sync(device)
        before, started = counter.snapshot(), time.perf_counter()
        done = program(backend, report, new_tokens)
        _sync(device)
        seconds = time.perf_counter() - started
        calls, prefill, decode, prefill_s, decode_s = (a - b for a, b in zip(counter.snapshot(), before))
        run = {"seconds": seconds, "forward_calls": calls, "prefill_tokens": prefill, "decode_steps": decode, **done}
        timing = ""
        if time_forwards:
            run |= {"prefill_forward_s": prefill_s, "decode_forward_s": decode_s}
            timing = f" (prefill forwards {prefill_s:.2f} s, decode forwards {decode_s:.2f} s)"
        print(f"  {name:8s} run {i}{' (warm-up)' if i == 0 else ''}: {seconds:7.2f} s{timing}, {calls} forwards, "
              f"{prefill} prefill tokens, {decode} decode steps, {done['rounds']} rounds", flush=True)
        if i:
            runs.append(run)
    counter.remove()
    out = {"runs": runs, "median_seconds": statistics.median(r["seconds"] for r in runs)}
    if isinstance(backend, SpanctxBackend):
        out["store"] = {k: getattr(backend.runtime.store.stats, k) for k in ("hits", "misses", "hit_tokens")}
        out["runtime"] = repr(backend.runtime)  # names the executor
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--report-tokens", type=int, default=1024, help="length of the report in the instruction")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16, help="the aLoRA's rank")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--time-forwards", action="store_true",
                        help="also time prefill and decode forwards (synchronises around each: a breakdown)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma separated, of: " + ", ".join(METHODS))
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()
    methods = [m for m in METHODS if m in args.methods.split(",")]

    device = torch.device(args.device)
    # Mellea asserts that the model's vocabulary is the tokenizer's: the presets' byte
    # tokenizer has 261 tokens, so the LM head is 261 rows (the 8B shapes' is 128K)
    vocab_size = len(byte_tokenizer())
    base, tokenizer = spanctx.load_preset(args.model, device=device, vocab_size=vocab_size)
    reports = [report_text(tokenizer, args.report_tokens, run) for run in range(args.repeats + 1)]
    invocation = tokenizer(INVOCATION, add_special_tokens=False)["input_ids"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="mellea-bench-") as tmp:
        adapter = make_adapter(base, pathlib.Path(tmp) / "requirement-check", rank=args.rank,
                               invocation_ids=invocation, seed=1)
        for name in methods:  # each on its own copy: PEFT changes the model in place
            model = copy.deepcopy(base)
            results[name] = run_method(name, model, tokenizer, device, adapter, reports, args.new_tokens,
                                       args.time_forwards)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or 'x86-64'})"
    record = {
        "scenario": "mellea: instruct + 5 aLoRA requirement checks + up to 2 repair rounds (MultiTurnStrategy)",
        "date": datetime.date.today().isoformat(), "device": device_name, "model": args.model,
        "dtype": str(next(base.parameters()).dtype), "vocab_size": vocab_size, "report_tokens": args.report_tokens,
        "new_tokens": args.new_tokens, "adapter_rank": args.rank, "repeats": args.repeats,
        "time_forwards": args.time_forwards,
        "versions": {name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft", "mellea")}
        | {"python": platform.python_version()},
        "results": results,
        "speedup": (results["stock"]["median_seconds"] / results["spanctx"]["median_seconds"]
                    if len(results) == 2 else None),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{record['date']}-mellea-{args.device}-{args.model}{'-forwards' if args.time_forwards else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({k: record[k] for k in ("device", "model", "versions", "speedup")}, indent=2))


if __name__ == "__main__":
    main()
