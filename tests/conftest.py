"""Shared fixtures: tiny random models of several architectures, built on CPU in fp32."""

from __future__ import annotations

import functools
import os

import pytest
import torch

import spanctx

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub

# Sliding windows are shrunk so that the test prompts cross them.
ARCHS = {
    "llama": ("tiny-llama", {}),
    "qwen2": ("tiny-qwen2", {}),
    "mistral": ("tiny-mistral", {"sliding_window": 16}),
    "gemma2": ("tiny-gemma2", {"sliding_window": 16}),
    "gemma3": ("tiny-gemma3", {"sliding_window": 16}),
    "gpt2": ("tiny-gpt2", {}),
}


# Tiny models are overhead-bound: one thread is as fast, and far faster on a shared CPU.
torch.set_num_threads(1)


@functools.cache
def tiny_model(arch: str):
    """(model, tokenizer) for ``arch``, built once per test session (seeded weights)."""
    preset, overrides = ARCHS[arch]
    torch.manual_seed(0)
    return spanctx.load_preset(preset, device="cpu", dtype=torch.float32, **overrides)


def tiny_runtime(arch: str = "llama", store_bytes: int = 64 << 20, **kwargs) -> spanctx.Runtime:
    """A fresh runtime (empty store) over the shared tiny model of ``arch``."""
    model, tokenizer = tiny_model(arch)
    return spanctx.Runtime(model, tokenizer, store_bytes=store_bytes, **kwargs)


@pytest.fixture(params=list(ARCHS))
def arch(request) -> str:
    return request.param
