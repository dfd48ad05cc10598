"""``cold``: nothing cached: what spanctx costs on misses.

Request ``i`` is ``BOS + context_i + question_i`` with a context never seen before, so
spanctx must compute everything, and also hashes, plans and stores the spans. The store
is emptied before each row.

Methods: ``full`` (HF ``generate`` from scratch) and ``spanctx``.
"""

from __future__ import annotations

from ...core.spans import Context
from .. import baselines
from ..harness import Harness
from ..records import Row
from .common import measure_methods, spanctx_generate
from .prefix import Config  # the same sizes: a context + a question, new tokens

NAME = "cold"
METHODS = ("full", "spanctx")


def run(h: Harness, config: Config, methods: tuple[str, ...]) -> list[Row]:
    rows: list[Row] = []
    repeats = h.repeats_for(NAME)
    bar = h.bar(len(config.contexts) * len(methods), NAME)
    for n in config.contexts:
        requests = [(h.source.block(n, "cold-context", n, i),
                     h.source.block(config.question_tokens, "cold-question", n, i))
                    for i in range(h.warmup + repeats)]
        prompts = [h.prompt_ids(context, question) for context, question in requests]
        rows += measure_methods(h, NAME, methods, n, config.new_tokens,
                                lambda method: _request(h, method, requests, prompts, config.new_tokens), bar,
                                before_each=h.runtime.store.clear)
    h.runtime.store.clear()
    bar.close()
    return rows


def _request(h: Harness, method: str, requests, prompts, new_tokens: int):
    """The per-request callable of ``method``."""
    if method == "full":
        return lambda i: baselines.generate(h.model, h.tokenizer, prompts[i], new_tokens, h.device)
    if method == "spanctx":
        return lambda i: spanctx_generate(h.runtime, Context().append(requests[i][0]).append(requests[i][1]),
                                          new_tokens)
    raise ValueError(f"unknown {NAME} method {method!r}")
