"""The shape of a static call: buckets, rows and padding, and the model's KV layout.

Pure helpers of ``spanctx.static``: how many step tokens a call's bucket has (its
attention slots: ``spanctx.engine.static_warmup``), where each left-padded row starts, which prefix slices each row gets, and
what the model's cache looks like (read off a one-token forward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..cache import kv as kvops
from ..hf import cache_kwargs
from . import attention as kernels

__all__ = ["ATTENTION_MODES", "GRAPH_TOKENS", "SLOT_GRANULE", "attention_mode", "check_tail", "left_pads",
           "model_reason", "probe_layout", "rows_of", "suffix_bucket"]

SLOT_GRANULE = 256  # attention lengths are multiples of this (split pieces stay multiples of 16)
GRAPH_TOKENS = 512  # longer tails run unpadded and without a graph (they are arithmetic-bound anyway)
HOST_ROPE = {"dynamic": "dynamic NTK", "longrope": "longrope"}  # rope types that read lengths on the host


def suffix_bucket(tokens: int) -> int:
    """Padded length of a step of ``tokens`` new tokens: 1 for decode, else the next power
    of two, at least 16."""
    return 1 if tokens == 1 else max(16, 1 << (tokens - 1).bit_length())


def probe_layout(model) -> tuple[list[tuple[int, int]], torch.dtype]:
    """Per layer (H_kv, D), and the KV dtype, read off a one-token forward."""
    with torch.inference_mode():
        cache = kvops.empty_cache()
        ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        kv = kvops.as_slices(cache)
    return [(k.shape[1], k.shape[-1]) for k in kv.keys], kv.keys[0].dtype


def model_reason(text, graphs: bool) -> str | None:
    """Why this model cannot run here at all (None when it can)."""
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    kinds = {rope.get("rope_type")} if "rope_type" in rope else {p.get("rope_type") for p in rope.values()
                                                                 if isinstance(p, dict)}
    host = sorted(HOST_ROPE[k] for k in kinds if k in HOST_ROPE)
    if graphs and host:
        return f"{', '.join(host)} RoPE recomputes its frequencies from the length on the host: no CUDA graph"
    return None


def check_tail(tail_start: int, prompt: int) -> None:
    if not 0 <= tail_start < prompt:
        raise ValueError(f"tail_start must leave at least one of the {prompt} prompt tokens to run, got {tail_start}")


def left_pads(attention_mask: torch.Tensor | None, batch: int, prompt: int) -> list[int]:
    """Per row, the number of leading pad slots (the mask must be 0s then 1s)."""
    if attention_mask is None:
        return [0] * batch
    if tuple(attention_mask.shape) != (batch, prompt):
        raise ValueError(f"attention_mask must be [{batch}, {prompt}], got {list(attention_mask.shape)}")
    mask = attention_mask.to("cpu", torch.long)
    pads = (prompt - mask.sum(dim=1)).tolist()
    for row, pad in enumerate(pads):
        if pad >= prompt or mask[row, :pad].any() or not mask[row, pad:].all():
            raise ValueError(f"row {row} of attention_mask is not left padding (0s, then at least one 1)")
    return pads


def rows_of(prefix, batch: int) -> list[Sequence[kvops.KVSlice]]:
    """``prefix`` as one sequence of slices per row."""
    if not prefix or isinstance(prefix[0], kvops.KVSlice):
        return [prefix] * batch
    if len(prefix) != batch:
        raise ValueError(f"{len(prefix)} per-row prefixes for a batch of {batch}")
    return list(prefix)


ATTENTION_MODES = ("auto", "split", "hf")


def attention_mode(model, attention: str, head_dim: int, dtype: torch.dtype) -> str:
    """The static executor's attention for ``model``: ``attention`` checked, or "auto"
    resolved ("split" on CUDA for an SDPA model where its kernel runs, else "hf")."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    own, device = model.config._attn_implementation, model.device
    softcap = getattr(model.config.get_text_config(), "attn_logit_softcapping", None) is not None
    if attention == "auto":
        if device.type != "cuda" or own != "sdpa" or softcap:
            return "hf"
        return "split" if kernels.works(device, dtype, head_dim) else "hf"
    if attention == "split":
        if own not in ("sdpa", "eager") or softcap:
            raise ValueError(f"{attention} attention computes plain softmax attention; this model's is {own!r}"
                             + (" with logit soft-capping" if softcap else ""))
        if not kernels.works(device, dtype, head_dim):
            raise ValueError(f"{attention} attention does not run (or disagrees) on {device} in {dtype}")
    return attention
