"""Benchmark harness: spanctx vs full-prefill generation (see the README, "Benchmarks").

Modules, one idea each: ``timing`` (clocks, repeats, medians), ``floor`` (weights-read
floor), ``workloads`` (seeded token ids), ``baselines`` (plain HF methods),
``adapters`` (random PEFT adapters, full-prefill checks), ``fidelity``, ``scenarios`` (prefix, rag, chat, checks, cold),
``results`` (the JSON schema), ``report`` (markdown, speedups), ``plots`` (PNGs), ``cli``.
"""
