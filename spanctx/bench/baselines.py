"""Baselines built from plain Hugging Face primitives (no spanctx store, no planner).

- ``generate``: ordinary ``model.generate`` of the full ids, optionally after a cache
  that a ``make_cache`` callable builds INSIDE the timed call (a deepcopy for the HF
  recipe, a concatenation for naive-concat), so that building it is paid per request.
- ``prefill``: one forward that returns the cache of some ids, computed from position 0.
- ``next_token_logits``: the fidelity probe, with or without a cache.

Caches are read and built only through ``spanctx.kv`` helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..cache import kv as kvops
from ..cache.store import SpanKV
from ..hf import cache_kwargs
from .timing import FirstTokenClock, Outcome, now

# Greedy decoding whatever the model's generation_config says.
GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def pad_token_id(model, tokenizer) -> int | None:
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad


def generate(model, tokenizer, ids: Sequence[int], new_tokens: int, device: torch.device, *,
             make_cache: Callable[[], object] | None = None, cached_tokens: int = 0) -> Outcome:
    """Greedy-generate exactly ``new_tokens`` after ``ids``; time to first token included.

    ``make_cache`` (run inside the call) returns a cache covering ``ids[:cached_tokens]``;
    generate then computes only the rest of the prompt. ``model`` may be a PEFT model.
    """
    with torch.inference_mode():
        start = now(device)
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)  # [1, S]
        kwargs = {} if make_cache is None else cache_kwargs(model, make_cache())
        clock = FirstTokenClock(device)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock,
                             pad_token_id=pad_token_id(model, tokenizer), **GREEDY, **kwargs)
        new_ids = tuple(out[0, input_ids.shape[1]:].tolist())
    return Outcome(clock.first_token_at - start, new_ids, len(ids) - cached_tokens, cached_tokens)


def prefill(model, ids: Sequence[int], device: torch.device):
    """The cache of ``ids`` computed from position 0 (a fresh DynamicCache)."""
    with torch.inference_mode():
        cache = kvops.empty_cache()
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
        model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    return cache


def prefill_alone(model, ids: Sequence[int], device: torch.device) -> SpanKV:
    """The KV of ``ids`` prefilled on their own from position 0 (what Mellea caches per block)."""
    return kvops.as_slices(prefill(model, ids, device))


def concatenate(blocks: Sequence[SpanKV]):
    """A fresh cache of ``blocks`` one after the other along time, keys NOT re-positioned."""
    return kvops.assemble([kvops.KVSlice.whole(kv) for kv in blocks])


def next_token_logits(model, ids: Sequence[int], device: torch.device, *, cache=None,
                      cached_tokens: int = 0) -> torch.Tensor:
    """Logits ``[vocab]`` (float32) after ``ids``; ``cache`` covers ``ids[:cached_tokens]``."""
    with torch.inference_mode():
        input_ids = torch.tensor([list(ids[cached_tokens:])], dtype=torch.long, device=device)
        out = model(input_ids=input_ids, **cache_kwargs(model, cache if cache is not None else kvops.empty_cache()),
                    use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float()
