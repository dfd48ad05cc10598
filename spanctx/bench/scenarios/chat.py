"""``chat``: a conversation growing turn by turn; TTFT per turn.

Turn ``t`` sends ``BOS + system + (user_0 + reply_0) + ... + user_t`` and generates
``new_tokens``. The replies appended to the conversation are fixed blocks of the
workload (not the generated tokens), so every method sees exactly the same prompts.
A pass runs the whole conversation; passes repeat it from an empty store, and each
turn's row is the median over the timed passes.

Methods: ``full`` (HF ``generate`` of the whole conversation every turn) and
``spanctx`` (each turn reuses everything the earlier turns stored; it computes the
last reply and the new user message).
"""

from __future__ import annotations

import functools

import attrs

from ...core.spans import Context
from .. import baselines
from ..harness import Harness
from ..records import Row
from ..timing import Measured, timed
from .common import greedy_match, spanctx_generate

NAME = "chat"
METHODS = ("full", "spanctx")


@attrs.frozen
class Config:
    turns: int = 20
    system_tokens: int = 1024
    user_tokens: int = 64
    reply_tokens: int = 64
    new_tokens: int = 8


def conversation(h: Harness, config: Config) -> list[list[tuple[int, ...]]]:
    """Per turn, the blocks of its prompt: system, user_0, reply_0, ..., user_t."""
    system = h.source.block(config.system_tokens, "chat-system")
    turns, blocks = [], [system]
    for t in range(config.turns):
        blocks = blocks + [h.source.block(config.user_tokens, "chat-user", t)]
        turns.append(blocks)
        blocks = blocks + [h.source.block(config.reply_tokens, "chat-reply", t)]
    return turns


def run(h: Harness, config: Config, methods: tuple[str, ...]) -> list[Row]:
    repeats = h.repeats_for(NAME)
    turns = conversation(h, config)
    prompts = [h.prompt_ids(*blocks) for blocks in turns]
    contexts = [Context().extend(blocks) for blocks in turns]
    bar = h.bar(len(methods), NAME)
    per_method: dict[str, list[Measured]] = {}
    for method in methods:
        bar.set_postfix_str(method)
        request = _request(h, method, prompts, contexts, config.new_tokens)
        passes = []
        for _ in range(h.warmup + repeats):
            h.runtime.store.clear()
            passes.append([timed(functools.partial(request, t), h.device) for t in range(config.turns)])
        timed_passes = passes[h.warmup:]
        per_method[method] = [Measured(tuple(p[t] for p in timed_passes)) for t in range(config.turns)]
        bar.update()
    bar.close()
    h.runtime.store.clear()

    rows = []
    for t, blocks in enumerate(turns):
        context_tokens = sum(len(b) for b in blocks[:-1])
        reference = per_method["full"][t] if "full" in per_method else None
        for method in methods:
            measured = per_method[method][t]
            rows.append(Row.measured(NAME, method, context_tokens, config.new_tokens, measured, turn=t + 1,
                                     greedy_match=greedy_match(reference, measured)))
    return rows


def _request(h: Harness, method: str, prompts, contexts, new_tokens: int):
    """The per-turn callable of ``method``."""
    if method == "full":
        return lambda t: baselines.generate(h.model, h.tokenizer, prompts[t], new_tokens, h.device)
    if method == "spanctx":
        return lambda t: spanctx_generate(h.runtime, contexts[t], new_tokens)
    raise ValueError(f"unknown {NAME} method {method!r}")
