"""Generation options: the runtime's defaults merged with one call's kwargs, and seeding.

Merge rule, per key, lowest layer first:

1. the model's ``generation_config`` (``generate`` applies it under everything else);
2. ``Runtime.generation_defaults``;
3. the call's kwargs. A call kwarg overrides the default of the same name; a call kwarg
   of ``None`` removes that default (so the model's own value applies again).

Beam search (``num_beams`` > 1) and ``num_return_sequences`` > 1 are refused: a call
returns one sequence per context (for N samples, batch the context N times).

Sampling is decided per layer, the call first: a layer that sets ``do_sample`` decides;
a layer that sets a sampling parameter (``temperature``, ``top_p``, ``top_k``, ``min_p``,
``typical_p``) without ``do_sample`` asks for sampling; with no decision anywhere, decoding
is greedy. Greedy decoding clears the sampling parameters.

``max_new_tokens`` and ``seed`` follow the same rule (``max_new_tokens`` falls back to
32). With a seed, the call samples from a freshly seeded RNG, so the same seed, prompt
and options give the same tokens; the global RNG state is restored afterwards. Every
other kwarg passes through to Hugging Face ``generate`` as is.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from ..hf import CACHE_NAMES

SAMPLING_KWARGS = ("temperature", "top_p", "top_k", "min_p", "typical_p")
DEFAULT_MAX_NEW_TOKENS = 32
# generate arguments that spanctx sets itself for every call
RESERVED_KWARGS = frozenset({"input_ids", "inputs", "attention_mask", "streamer", "position_ids",
                             "cache_position", "use_cache", *CACHE_NAMES})


@attrs.frozen
class CallOptions:
    """The effective options of one call, after the merge."""

    max_new_tokens: int
    seed: int | None
    do_sample: bool
    generate_kwargs: Mapping[str, object]  # the other HF generate kwargs, sampling ones cleared if greedy

    def hf_kwargs(self, pad_token_id: int | None) -> dict:
        """Keyword arguments for ``model.generate`` (besides inputs, cache and streamer)."""
        kwargs = dict(self.generate_kwargs)
        kwargs.setdefault("pad_token_id", pad_token_id)
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, **kwargs}


def merge_options(defaults: Mapping[str, object], call: Mapping[str, object]) -> CallOptions:
    """The options of a call: ``call`` over ``defaults`` (see the module's merge rule)."""
    for layer, name in ((defaults, "generation_defaults"), (call, "call")):
        reserved = RESERVED_KWARGS & set(layer)
        if reserved:
            raise ValueError(f"{sorted(reserved)} in the {name} options: spanctx sets these itself")
    merged = {**defaults, **call}
    merged = {k: v for k, v in merged.items() if v is not None}
    do_sample = _sampling_decision(call)
    if do_sample is None:  # the defaults decide, without the keys the call overrides
        do_sample = _sampling_decision({k: v for k, v in defaults.items() if k not in call})
    do_sample = bool(do_sample)
    merged.pop("do_sample", None)
    if not do_sample:
        for key in SAMPLING_KWARGS:
            merged[key] = None  # None, not absent: the model's generation_config may set them
    _refuse_search(merged)
    max_new_tokens = merged.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    seed = merged.pop("seed", None)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return CallOptions(max_new_tokens, seed, do_sample, merged)


def _refuse_search(merged: Mapping[str, object]) -> None:
    """Beam search and several sequences per call are refused: every path of a call
    (reused cache or not, single or batch) returns one sequence per context."""
    if merged.get("num_beams", 1) != 1:
        raise ValueError(f"num_beams={merged['num_beams']}: spanctx does not run beam search (its caches hold "
                         "one sequence per context); use greedy or sampled decoding")
    if merged.get("num_return_sequences", 1) != 1:
        raise ValueError(f"num_return_sequences={merged['num_return_sequences']}: a call returns one sequence; "
                         "for N samples of one context use rt.generate_batch([ctx] * N, do_sample=True), "
                         "whose rows share the context's stored KV")


def _sampling_decision(layer: Mapping[str, object]) -> bool | None:
    if layer.get("do_sample") is not None:
        return bool(layer["do_sample"])
    if any(layer.get(k) is not None for k in SAMPLING_KWARGS):
        return True
    return None
