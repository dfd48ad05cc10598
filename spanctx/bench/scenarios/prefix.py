"""``prefix``: one shared context of N tokens, then a new question per request.

Request ``i`` is ``BOS + context + question_i`` (a fresh question each time, so only the
context can be reused); exactly ``new_tokens`` greedy tokens are generated.

Methods:
- ``full``: HF ``generate`` of the whole prompt from scratch.
- ``hf-deepcopy``: transformers' documented recipe: the context is prefilled once
  (untimed); each request deep-copies that cache and generates after it.
- ``spanctx``: the runtime with the context already in its store (warmed untimed).
"""

from __future__ import annotations

import copy

import attrs

from ...core.spans import Context
from .. import baselines
from ..harness import Harness
from ..records import Row
from ..timing import Outcome
from .common import measure_methods, spanctx_generate

NAME = "prefix"
METHODS = ("full", "hf-deepcopy", "spanctx")


@attrs.frozen
class Config:
    contexts: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    question_tokens: int = 64
    new_tokens: int = 32


def run(h: Harness, config: Config, methods: tuple[str, ...]) -> list[Row]:
    rows: list[Row] = []
    repeats = h.repeats_for(NAME)
    bar = h.bar(len(config.contexts) * len(methods), NAME)
    for n in config.contexts:
        context = h.source.block(n, "prefix-context", n)
        questions = [h.source.block(config.question_tokens, "prefix-question", n, i)
                     for i in range(h.warmup + repeats)]
        rows += measure_methods(h, NAME, methods, n, config.new_tokens,
                                lambda method: _request(h, method, context, questions, config.new_tokens), bar)
        h.runtime.store.clear()
    bar.close()
    return rows


def _request(h: Harness, method: str, context, questions, new_tokens: int):
    """The per-request callable of ``method`` (its untimed setup done here)."""
    prompts = [h.prompt_ids(context, q) for q in questions]
    if method == "full":
        return lambda i: baselines.generate(h.model, h.tokenizer, prompts[i], new_tokens, h.device)
    if method == "hf-deepcopy":
        prefix = h.prompt_ids(context)
        prefix_cache = baselines.prefill(h.model, prefix, h.device)

        def deepcopy_request(i: int) -> Outcome:
            return baselines.generate(h.model, h.tokenizer, prompts[i], new_tokens, h.device,
                                      make_cache=lambda: copy.deepcopy(prefix_cache), cached_tokens=len(prefix))
        return deepcopy_request
    if method == "spanctx":
        base = Context().append(context)
        h.runtime.next_token_logits(base)  # store warm: BOS and context
        return lambda i: spanctx_generate(h.runtime, base.append(questions[i]), new_tokens)
    raise ValueError(f"unknown {NAME} method {method!r}")
