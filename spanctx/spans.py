"""Immutable span trees.

A ``Context`` is a node in a tree: its path from the root is a prompt, one span per
node. Appending never changes a context; it returns a new child, so two appends to the
same context are siblings that share everything above them (and so their KV).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

SpanContent = str | tuple[int, ...]


def _freeze_content(content: str | Sequence[int]) -> SpanContent:
    if isinstance(content, str):
        if content == "":
            raise ValueError("a span cannot be empty text")
        return content
    if isinstance(content, (bytes, bytearray)):
        raise TypeError("a span is text (str) or token ids (a sequence of int), not bytes")
    ids = tuple(content)
    if not ids:
        raise ValueError("a span cannot be an empty list of token ids")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise TypeError(f"token ids must be non-negative ints, got {t!r}")
    return ids


@attrs.frozen
class Span:
    """One piece of a prompt: text, tokenized on its own, or token ids as given."""

    content: SpanContent = attrs.field(converter=_freeze_content)

    @property
    def is_text(self) -> bool:
        return isinstance(self.content, str)


@attrs.frozen(eq=False, repr=False)
class Context:
    """A prompt as a path of spans. ``Context()`` is the empty root.

    Contexts compare by identity of their path content: two contexts built from the same
    spans in the same order are equal and hash alike.
    """

    parent: Context | None = None
    span: Span | None = None

    def append(self, content: str | Sequence[int] | Span) -> Context:
        """A new context: this one followed by ``content``. ``self`` is unchanged."""
        span = content if isinstance(content, Span) else Span(content)
        return Context(parent=self, span=span)

    def extend(self, contents: Iterable[str | Sequence[int] | Span]) -> Context:
        """Append several spans in order; returns the last new context."""
        ctx = self
        for content in contents:
            ctx = ctx.append(content)
        return ctx

    @property
    def spans(self) -> tuple[Span, ...]:
        """The spans from the root to this node, in prompt order."""
        out: list[Span] = []
        node: Context | None = self
        while node is not None and node.span is not None:
            out.append(node.span)
            node = node.parent
        return tuple(reversed(out))

    @property
    def is_root(self) -> bool:
        return self.span is None

    def __len__(self) -> int:
        return len(self.spans)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Context) and self.spans == other.spans

    def __hash__(self) -> int:
        return hash(self.spans)

    def __repr__(self) -> str:
        shown = [s.content if s.is_text else f"<{len(s.content)} ids>" for s in self.spans]
        return f"Context({shown!r})"
