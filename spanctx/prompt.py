"""From a ``Context`` to the token ids and span keys of one prompt.

Tokenization rule: each span is tokenized on its own, with no special tokens, and the
prompt is the concatenation of the pieces, after one BOS token when the tokenizer adds
one (as Llama's does). So ``"Hello" + " world"`` can tokenize differently from
``"Hello world"`` with a BPE tokenizer: span boundaries are token boundaries. That is
what lets a span's KV be stored once and reused.

Chat spans are first rendered by the tokenizer's chat template into text spans (see
``chat.py``); a path that starts with one gets no BOS: the template writes it.
"""

from __future__ import annotations

import functools
import itertools

import attrs

from .chat import ChatRenderer
from .keys import root_key, span_key
from .plan import PlanSegment
from .spans import Context, Span


@attrs.frozen
class ResolvedPrompt:
    """A prompt ready to plan: its ids and, per span, its key and token range."""

    token_ids: tuple[int, ...]
    segments: tuple[PlanSegment, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def span_ranges(self) -> tuple[tuple[int, int], ...]:
        out, start = [], 0
        for seg in self.segments:
            out.append((start, start + seg.num_tokens))
            start += seg.num_tokens
        return tuple(out)


class PromptResolver:
    """Tokenizes spans and chains their keys under one namespace, with memoization."""

    def __init__(self, tokenizer, namespace: bytes, vocab_size: int, cache_size: int = 1 << 16):
        self.tokenizer = tokenizer
        self.namespace = namespace
        self.vocab_size = vocab_size
        self.bos = _bos_prefix(tokenizer)
        self.chat = ChatRenderer(tokenizer)
        self._span_ids = functools.lru_cache(maxsize=cache_size)(self._tokenize)
        self._key = functools.lru_cache(maxsize=cache_size)(self._chain)

    def resolve(self, ctx: Context) -> ResolvedPrompt:
        spans = ctx.spans
        if not spans:
            raise ValueError("the context is empty: append at least one span before generating")
        if ctx.has_parallel:
            raise ValueError("the context holds a parallel group: resolve it with spanctx.parallel.resolve_layout")
        # a path that starts with a chat span gets its special tokens from the template
        pieces = [self.bos] if self.bos and not spans[0].is_chat else []
        if any(span.is_chat for span in spans):
            spans = self.chat.expand(spans)
        pieces += [self._span_ids(span) for span in spans]
        key = root_key(self.namespace)
        segments = []
        for ids in pieces:
            key = self._key(key, ids)
            segments.append(PlanSegment(key, len(ids)))
        token_ids = tuple(itertools.chain.from_iterable(pieces))
        return ResolvedPrompt(token_ids, tuple(segments))

    def span_ids(self, span: Span) -> tuple[int, ...]:
        return self._span_ids(span)

    def _tokenize(self, span: Span) -> tuple[int, ...]:
        if span.is_text:
            ids = tuple(self.tokenizer(span.content, add_special_tokens=False)["input_ids"])
            if not ids:
                raise ValueError(f"span {span.content!r} tokenizes to no tokens")
            return ids
        bad = [t for t in span.content if t >= self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the model's vocabulary of {self.vocab_size}")
        return span.content

    def _chain(self, parent_key: bytes, ids: tuple[int, ...]) -> bytes:
        return span_key(parent_key, ids, self.namespace)


def _bos_prefix(tokenizer) -> tuple[int, ...]:
    """``(bos_id,)`` when the tokenizer puts BOS in front of a plain encode, else ``()``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return ()
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return (bos,) if ids and ids[0] == bos else ()
