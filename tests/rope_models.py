"""Tiny fp32 models of every position-encoding kind that parallel spans treat apart.

Small max_position_embeddings are avoided on purpose: dynamic NTK only departs from the
default frequencies past it, and the tests compare against HF runs of the same model.
"""

from __future__ import annotations

import functools

import torch

import spanctx

_LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}

# kind -> (preset, config overrides, whether cached keys can move exactly)
ROPE_MODELS = {
    "default": ("tiny-llama", {}, True),
    "linear": ("tiny-llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
               True),
    "llama3": ("tiny-llama", {"rope_parameters": _LLAMA3}, True),
    "yarn": ("tiny-llama", {"rope_parameters": _YARN}, True),
    "partial": ("tiny-phi3", {}, True),
    "per-layer": ("tiny-gemma3", {}, True),  # window 64: the tests' prompts stay inside it
    "dynamic": ("tiny-llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
                False),
    "absolute": ("tiny-gpt2", {}, False),
}
MOVABLE_KINDS = [k for k, (_, _, movable) in ROPE_MODELS.items() if movable]


@functools.cache
def rope_model(kind: str):
    """(model, tokenizer) of ``kind``, built once per session (seeded random weights)."""
    preset, overrides, _ = ROPE_MODELS[kind]
    return spanctx.load_preset(preset, device="cpu", dtype=torch.float32, seed=1, **overrides)


def rope_runtime(kind: str, **kwargs) -> spanctx.Runtime:
    """A fresh runtime (empty store) over the shared model of ``kind``."""
    model, tokenizer = rope_model(kind)
    return spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, **kwargs)
