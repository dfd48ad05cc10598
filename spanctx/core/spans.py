"""Immutable span trees.

A ``Context`` is a node in a tree: its path from the root is a prompt, one span per
node. Appending never changes a context; it returns a new child, so two appends to the
same context are siblings that share everything above them (and so their KV).

A node can also be a ``ParallelGroup`` (``Context.parallel``): several spans laid out
one after the other that do not attend to each other, each attending only to its
anchor (a prefix of the path). What follows the group attends to everything.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import attrs

from . import inputs
from .media import Image
from .messages import ChatItem, GenerationPrompt, Message, as_message, template_args

SpanContent = str | tuple[int, ...] | ChatItem | Image


def _freeze_content(content: str | Sequence[int] | ChatItem | Image) -> SpanContent:
    return content if isinstance(content, (ChatItem, Image)) else inputs.span_content(content)


@attrs.frozen
class Span:
    """One piece of a prompt: text, tokenized on its own, token ids as given, a chat
    item rendered by the tokenizer's chat template, or an ``Image`` (its placeholder
    tokens, expanded by the model's processor in the resolver)."""

    content: SpanContent = attrs.field(converter=_freeze_content)

    @property
    def is_text(self) -> bool:
        return isinstance(self.content, str)

    @property
    def is_chat(self) -> bool:
        return isinstance(self.content, ChatItem)

    @property
    def is_image(self) -> bool:
        return isinstance(self.content, Image)


def _check_parent(parent: object) -> None:
    if parent is not None and not isinstance(parent, Context):
        raise TypeError(f"Context() takes no text: a prompt starts at the empty root, Context(), and grows "
                        f"with append: Context().append({parent!r:.40})" if isinstance(parent, (str, list, tuple))
                        else f"a Context's parent is a Context, got {type(parent).__name__}")


def as_context(value: Context | str, call: str) -> Context:
    """What every runtime call takes as its prompt: a ``Context``, or a str (one text span
    after the root: a raw completion, no chat template)."""
    if isinstance(value, Context):
        return value
    if isinstance(value, str):
        return Context().append(value)
    hint = ""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        hint = "; for chat messages use Context.chat(messages)"
    elif isinstance(value, (list, tuple)):
        hint = "; for token ids use Context().append(ids), for several prompts generate_batch"
    raise TypeError(f"{call} takes a Context (or a str), got {type(value).__name__}{hint}")


class _OnRootOrSelf:
    """A method that runs on the instance, or on a new empty root when called on the
    class: ``Context.chat(msgs)`` is ``Context().chat(msgs)``."""

    def __init__(self, func: Callable) -> None:
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj, cls):
        return functools.partial(self.func, obj if obj is not None else cls())


@attrs.frozen
class ParallelGroup:
    """Sibling spans that each attend to the first ``anchor_depth`` nodes of the path only.

    ``anchor_depth`` counts path nodes (0 = the root: only the BOS token, if any).
    """

    members: tuple[Span, ...]
    anchor_depth: int

    def __attrs_post_init__(self) -> None:
        if not self.members:
            raise ValueError("a parallel group needs at least one span")
        if self.anchor_depth < 0:
            raise ValueError("anchor_depth must be >= 0")


@attrs.frozen(eq=False, repr=False)
class Context:
    """A prompt as a path of spans. ``Context()`` is the empty root.

    Contexts compare by identity of their path content: two contexts built from the same
    spans in the same order are equal and hash alike.
    """

    parent: Context | None = attrs.field(default=None, validator=lambda _, __, parent: _check_parent(parent))
    span: Span | ParallelGroup | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of((Span, ParallelGroup))))

    def append(self, content: str | Sequence[int] | Image | Span) -> Context:
        """A new context: this one followed by ``content``. ``self`` is unchanged."""
        span = content if isinstance(content, Span) else Span(content)
        return Context(parent=self, span=span)

    def parallel(self, *contents: str | Sequence[int] | Span, anchor: str | Context = "path") -> Context:
        """A new context: this one followed by a group of spans that do not attend to each other.

        Each span attends to its anchor only: ``anchor="path"`` (default) is this context's
        whole path; ``anchor="root"`` is the root alone (position-independent: a span's KV
        is shared across everything that may precede it); a ``Context`` that is a prefix of
        this one anchors there. What is appended after the group attends to everything.
        """
        if len(contents) == 1 and isinstance(contents[0], (list, tuple)) and \
                any(isinstance(c, (str, Span)) for c in contents[0]):
            raise TypeError("parallel takes the spans as separate arguments: ctx.parallel(*docs), "
                            "not ctx.parallel(docs)")
        members = tuple(c if isinstance(c, Span) else Span(c) for c in contents)
        return Context(parent=self, span=ParallelGroup(members, self._anchor_depth(anchor)))

    def _anchor_depth(self, anchor: str | Context) -> int:
        if isinstance(anchor, Context):
            depth = len(anchor)
            if self.spans[:depth] != anchor.spans:
                raise ValueError(f"anchor {anchor!r} is not a prefix of {self!r}")
            return depth
        if anchor == "path":
            return len(self)
        if anchor == "root":
            return 0
        raise ValueError(f"anchor must be 'path', 'root' or a Context, got {anchor!r}")

    def extend(self, contents: Iterable[str | Sequence[int] | Span]) -> Context:
        """Append several spans in order; returns the last new context."""
        ctx = self
        for content in inputs.not_one_string(contents, "extend"):
            ctx = ctx.append(content)
        return ctx

    # -- chat (chat.py renders these spans with the tokenizer's chat template) ----------

    @_OnRootOrSelf
    def message(self, role: str, content: str | None = None, *, add_generation_prompt: bool = False,
                **fields) -> Context:
        """This context followed by one chat message (``fields``: extra message keys such as
        ``tool_calls``, ``name``, ``tool_call_id``). A generation prompt at the end of ``self``
        is a placeholder for the reply: the message replaces it."""
        return _append_messages(self, [{"role": role, "content": content, **fields}],
                               add_generation_prompt=add_generation_prompt)

    @_OnRootOrSelf
    def chat(self, messages: Iterable, *, system: str | None = None, tools: Sequence | None = None,
             add_generation_prompt: bool = True, chat_template: str | None = None, **template_kwargs) -> Context:
        """This context followed by ``messages`` (dicts with ``role`` and ``content``, or
        ``Message``s), each its own span, then a generation prompt unless told otherwise.

        ``system`` prepends a system message. ``tools``, ``chat_template`` and other template
        kwargs are passed to the template; they can only be set where a conversation starts.
        Works on the class too: ``Context.chat(msgs)`` starts from an empty root.
        """
        return _append_messages(self, messages, system=system, tools=tools,
                               add_generation_prompt=add_generation_prompt, chat_template=chat_template,
                               template_kwargs=template_kwargs)

    @property
    def spans(self) -> tuple[Span | ParallelGroup, ...]:
        """The nodes from the root to this one, in prompt order (spans or parallel groups)."""
        out: list[Span | ParallelGroup] = []
        node: Context | None = self
        while node is not None and node.span is not None:
            out.append(node.span)
            node = node.parent
        return tuple(reversed(out))

    @property
    def has_parallel(self) -> bool:
        """Whether the path holds a parallel group."""
        return any(isinstance(node, ParallelGroup) for node in self.spans)

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
        return f"Context([{', '.join(_show(node) for node in self.spans)}])"


def _show(node: Span | ParallelGroup) -> str:
    if isinstance(node, ParallelGroup):
        return f"parallel({', '.join(_show(m) for m in node.members)}; anchor={node.anchor_depth})"
    return repr(node.content) if node.is_text or node.is_chat or node.is_image else f"<{len(node.content)} ids>"


def _leaves(ctx: Context) -> Iterator[Span]:
    """The spans of ``ctx``'s path, a parallel group's members in its place."""
    for node in ctx.spans:
        yield from node.members if isinstance(node, ParallelGroup) else (node,)


def _append_messages(ctx: Context, messages: Iterable[Mapping | Message], *, system: str | None = None,
                    tools: Sequence | None = None, add_generation_prompt: bool = False,
                    chat_template: str | None = None, template_kwargs: Mapping | None = None) -> Context:
    """``ctx`` followed by chat spans; see ``Context.chat`` and ``Context.message``."""
    if isinstance(ctx.span, Span) and isinstance(ctx.span.content, GenerationPrompt):
        ctx = ctx.parent  # the generation prompt was a placeholder for the next message
    args = template_args(tools, chat_template, template_kwargs or {})
    if args is not None:
        if any(span.is_chat for span in _leaves(ctx)):
            raise ValueError("tools, chat_template and template kwargs are set where a conversation starts; "
                             "this context already holds chat spans")
        ctx = ctx.append(args)
    new = [as_message(m) for m in messages]
    if system is not None:
        if new and new[0].role == "system":
            raise ValueError("system= given and the messages start with a system message too")
        new.insert(0, Message("system", system))
    ctx = ctx.extend(new)
    if add_generation_prompt:
        if not any(isinstance(span.content, Message) for span in _leaves(ctx)):
            raise ValueError("a generation prompt needs at least one message before it")
        ctx = ctx.append(GenerationPrompt())
    elif not new:
        raise ValueError("no messages given")
    return ctx
