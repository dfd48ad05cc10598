"""From Mellea's conversations to spanctx contexts.

A chat call's conversation (Mellea's ``to_chat`` messages) becomes ``Context.chat``: one
span per message, the generation prompt its own span, so a session that grows by a turn
reuses every earlier turn. The ids are exactly ``apply_chat_template``'s (the path starts
with a chat span, so no BOS is added; the template writes the model's special tokens).

``CBlock(cache=True)`` blocks: where such a block's text appears in the rendering after
the first message, the message is cut around it, so the block is a span of its own and
is reused by every later prompt with the same text before it (a document followed by
another question). Span boundaries are token boundaries (spanctx's tokenization rule):
with a BPE tokenizer the ids around a cut can differ from a whole-prompt tokenization,
as they do in Mellea's own KV-block path.

Prompts that arrive as token ids (Mellea's intrinsics render their own conversation and
call ``model.generate``) get their spans from ``PromptMemory``: the longest recently
built prompt whose ids start them, followed by the rest as one span of ids. Without one,
the ids go through a pass-through chat template (``verbatim``), which adds no BOS.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Iterable, Mapping, Sequence

from mellea.core import (
    CBlock,
    Component,
    get_audio_from_component,
    get_images_from_component,
)
from mellea.core import Context as MelleaContext

from ...core.spans import Context
from ...runtime import Runtime

__all__ = ["PromptMemory", "cached_block_values", "conversation_context", "refuse_multimodal", "verbatim"]

#: cached blocks shorter than this many characters are not worth a span of their own
MIN_CACHED_BLOCK_CHARS = 32
_VERBATIM_TEMPLATE = "{{ messages[0]['content'] }}"


def conversation_context(rt: Runtime, messages: Sequence[Mapping], *, tools: list | None = None,
                         template_kwargs: Mapping | None = None, cached_blocks: Iterable[str] = ()) -> Context:
    """The context of a chat call: ``messages`` and the generation prompt, each message
    its own span, cut around the ``cached_blocks`` texts found after the first message."""
    kwargs = dict(template_kwargs or {})
    chat = Context.chat(list(messages), tools=tools or None, **kwargs)
    blocks = [b for b in cached_blocks if len(b) >= MIN_CACHED_BLOCK_CHARS]
    if not blocks:
        return chat
    rendering = rt.chat_rendering(chat)
    first_end = rendering.message_ends[0]
    if first_end is None:  # the template cannot be cut after the first message
        return chat
    text = rendering.text
    cuts = {first_end, len(text)}
    cuts.update(c for c in (*rendering.message_ends, *rendering.reply_starts) if c is not None and c > first_end)
    for block in blocks:
        start = text.find(block, first_end)
        while start != -1:
            cuts.update((start, start + len(block)))
            start = text.find(block, start + len(block))
    head = Context.chat(list(messages[:1]), tools=tools or None, add_generation_prompt=False, **kwargs)
    return head.extend(text[a:b] for a, b in itertools.pairwise(sorted(cuts)) if b > a)


def verbatim(rt: Runtime, ids: Sequence[int]) -> Context:
    """A context whose ids are exactly ``ids`` (no BOS added): their text through a
    pass-through chat template. Raises ``ValueError`` when the text does not tokenize
    back to ``ids``."""
    text = rt.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ctx = Context.chat([{"role": "user", "content": text}], chat_template=_VERBATIM_TEMPLATE,
                       add_generation_prompt=False)
    if rt.token_ids(ctx) != list(ids):
        raise ValueError("these prompt ids do not survive decoding and tokenizing again, so spanctx cannot "
                         "lay them out as spans; render the prompt through the backend's chat path")
    return ctx


class PromptMemory:
    """The last ``size`` prompts built from messages, to lay out prompts that arrive as ids.

    Thread-safe. ``context_for(ids)`` is the longest remembered prompt whose ids start
    ``ids`` followed by the rest as one span of ids (or ``verbatim(ids)``): its ids are
    ``ids`` exactly, and its first spans are those the remembered call stored.
    """

    def __init__(self, rt: Runtime, size: int = 32) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.rt = rt
        self._recent: collections.OrderedDict[tuple[int, ...], Context] = collections.OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def remember(self, ids: Sequence[int], ctx: Context) -> None:
        key = tuple(ids)
        with self._lock:
            self._recent[key] = ctx
            self._recent.move_to_end(key)
            while len(self._recent) > self._size:
                self._recent.popitem(last=False)

    def context_for(self, ids: Sequence[int]) -> Context:
        key = tuple(ids)
        with self._lock:
            recent = list(self._recent.items())
        prefixes = [(p, ctx) for p, ctx in recent if len(p) <= len(key) and key[:len(p)] == p]
        if not prefixes:
            return verbatim(self.rt, key)
        prefix, ctx = max(prefixes, key=lambda item: len(item[0]))
        rest = key[len(prefix):]
        return ctx.append(rest) if rest else ctx


def cached_block_values(spans: Iterable) -> list[str]:
    """The texts of the ``CBlock(cache=True)`` blocks in ``spans`` and their parts."""
    out: list[str] = []
    stack, seen = list(spans), set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, CBlock):
            if item.cache and item.value:
                out.append(item.value)
        elif isinstance(item, Component):
            try:
                stack.extend(item.parts())
            except NotImplementedError:
                continue
    return out


def refuse_multimodal(action, ctx: MelleaContext | None) -> None:
    """A ``ValueError`` when ``action`` or ``ctx`` carries images or audio (text only)."""
    candidates = list(ctx.view_for_generation() or []) if ctx is not None else []
    if action is not None:
        candidates.append(action)
    for component in candidates:
        if get_images_from_component(component) is not None or get_audio_from_component(component) is not None:
            raise ValueError("spanctx's Mellea backend takes text only: remove image and audio blocks")
