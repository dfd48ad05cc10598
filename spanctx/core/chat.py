"""Chat messages as spans, rendered with the tokenizer's chat template.

A conversation is a path of chat spans: optional template arguments (``TemplateArgs``:
tools, a template override, other template kwargs), then ``Message``s, then optionally a
``GenerationPrompt``. Each message is its own span, so a conversation that grows by a
turn reuses the KV of every earlier turn.

Splitting. A template renders a whole conversation; it has no notion of "the text of
message k". The renderer asks it for the rendering of every prefix ``messages[:k]`` and
cuts the full rendering where a prefix rendering is a prefix of it. The pieces are
slices of the full rendering, so they always join to it exactly. Where a template is not
prefix-stable (it writes something about later messages into earlier text), there is no
cut: the message shares a span with the next one, ``ChatRendering.split`` is False, and a
``ChatSplitWarning`` says so. With no cut at all the conversation is one span.

Generation prompt. ``render(messages, add_generation_prompt=True)`` minus
``render(messages)`` is the generation prompt's own span. An assistant message is cut in
two where ``render(messages[:k], add_generation_prompt=True)`` ends, so the next turn's
prompt (earlier messages + generation prompt + reply + new message + generation prompt)
starts with exactly the previous turn's prompt and reuses all of it.

Special tokens. A path that starts with a chat span gets no automatic BOS: the template
writes the model's special tokens itself, as ``apply_chat_template`` does.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import attrs
from jinja2 import TemplateError

from .messages import ChatItem, GenerationPrompt, Message, TemplateArgs
from .spans import ParallelGroup, Span


class ChatSplitWarning(UserWarning):
    """The chat template could not be cut at some message boundaries (see ``chat.py``)."""


@attrs.frozen
class ChatRendering:
    """The template's rendering of one conversation and where it can be cut.

    Offsets are into ``text``. ``message_ends[k]`` is where message ``k`` ends, or None
    where the template cannot be cut after it; ``reply_starts[k]`` is where an assistant
    message's own text starts after its generation prompt (None otherwise).
    """

    text: str
    message_ends: tuple[int | None, ...]
    reply_starts: tuple[int | None, ...]

    @property
    def split(self) -> bool:
        """Whether every message ends at a cut (each message is its own span)."""
        return all(end is not None for end in self.message_ends)

    @property
    def unsplit(self) -> tuple[int, ...]:
        """Indices of the messages after which the template cannot be cut."""
        return tuple(k for k, end in enumerate(self.message_ends) if end is None)

    @property
    def pieces(self) -> tuple[str, ...]:
        """The text of each span the conversation becomes; they join to ``text``."""
        cuts = sorted({0, len(self.text), *(c for c in (*self.message_ends, *self.reply_starts) if c is not None)})
        return tuple(self.text[a:b] for a, b in zip(cuts, cuts[1:]) if b > a)


RenderFn = Callable[[tuple[Message, ...], bool], str]


def render_conversation(render: RenderFn, messages: tuple[Message, ...], add_generation_prompt: bool) -> ChatRendering:
    """Render ``messages`` whole and find its cuts from the renderings of its prefixes.

    ``render(messages, add_generation_prompt)`` is the template; it may raise
    ``jinja2.TemplateError`` for a prefix it refuses (that prefix then gives no cut).
    """
    text = render(messages, add_generation_prompt)
    last = 0  # the latest valid cut: cuts must not go backwards

    def cut(prefix: tuple[Message, ...], with_generation_prompt: bool) -> int | None:
        nonlocal last
        if not prefix:
            return None  # templates refuse empty conversations
        try:
            rendered = render(prefix, with_generation_prompt)
        except TemplateError:
            return None
        if not text.startswith(rendered) or len(rendered) < last:
            return None
        last = len(rendered)
        return last

    ends: list[int | None] = []
    starts: list[int | None] = []
    for k, message in enumerate(messages):
        starts.append(cut(messages[:k], True) if message.role == "assistant" else None)
        ends.append(cut(messages[: k + 1], False))
    return ChatRendering(text, tuple(ends), tuple(starts))


class ChatRenderer:
    """Renders the chat spans of a path with one tokenizer's template, memoized."""

    def __init__(self, tokenizer, cache_size: int = 1 << 12) -> None:
        self.tokenizer = tokenizer
        self._render = functools.lru_cache(maxsize=cache_size)(self._render_uncached)
        self._rendering = functools.lru_cache(maxsize=cache_size)(self._rendering_uncached)

    def rendering(self, spans: Sequence[Span | ParallelGroup]) -> ChatRendering:
        """The rendering of the conversation in ``spans`` (a path's spans)."""
        args, messages, add_generation_prompt = _conversation(spans)
        return self._rendering(args, messages, add_generation_prompt)

    def expand(self, nodes: Sequence[Span | ParallelGroup]) -> tuple[tuple[Span | ParallelGroup, ...],
                                                                 tuple[int | None, ...]]:
        """``nodes`` (a path's) with the chat spans replaced by text spans cut from the
        rendering, and for each input node the number of output nodes once it is whole
        (None where its text runs on into the next output span: no cut after it).

        Plain spans and parallel groups keep their place; one may sit between two
        messages only where the template can be cut there.
        """
        rendering = self.rendering(nodes)
        text = rendering.text
        out: list[Span | ParallelGroup] = []
        ends: list[int | None] = []
        pos, k = 0, 0
        cut_pending = False  # the last message had no cut: its text goes with the next span

        def emit(end: int) -> None:
            nonlocal pos
            if end > pos:
                out.append(Span(text[pos:end]))
            pos = end

        for node in nodes:
            item = node.content if isinstance(node, Span) else None
            if not isinstance(item, ChatItem):
                if cut_pending:
                    raise ValueError(
                        f"a plain span follows message {k - 1}, but the chat template cannot be cut there "
                        f"(it renders earlier messages differently once later ones exist)")
                out.append(node)
            elif isinstance(item, Message):
                for offset in (rendering.reply_starts[k], rendering.message_ends[k]):
                    if offset is not None:
                        emit(offset)
                cut_pending = rendering.message_ends[k] is None
                k += 1
            elif isinstance(item, GenerationPrompt):
                emit(len(text))
                cut_pending = False
            ends.append(None if cut_pending else len(out))
        assert not cut_pending and pos == len(text), "the last chat span always ends the rendering"
        return tuple(out), tuple(ends)

    def _render_uncached(self, args: TemplateArgs | None, messages: tuple[Message, ...],
                         add_generation_prompt: bool) -> str:
        kwargs = args.as_kwargs() if args is not None else {}
        if kwargs.get("chat_template") is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template: pass chat_template=... where the "
                             "conversation starts (Context.chat(..., chat_template=...))")
        return self.tokenizer.apply_chat_template(
            [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)

    def _rendering_uncached(self, args: TemplateArgs | None, messages: tuple[Message, ...],
                            add_generation_prompt: bool) -> ChatRendering:
        rendering = render_conversation(
            lambda prefix, gen: self._render(args, prefix, gen), messages, add_generation_prompt)
        if not rendering.split:
            unsplit = rendering.unsplit
            warnings.warn(
                f"the chat template cannot be cut after message(s) {list(unsplit)} of {len(messages)}: "
                f"each shares a span with the next message, so no KV is reused past message {unsplit[0]} "
                f"when the conversation grows (rt.chat_rendering(ctx).split is False)",
                ChatSplitWarning, stacklevel=2)
        return rendering


def _conversation(spans: Sequence[Span]) -> tuple[TemplateArgs | None, tuple[Message, ...], bool]:
    """The template arguments, messages and generation-prompt flag of a path; checks the
    order: arguments before the first message, the generation prompt after the last."""
    args: TemplateArgs | None = None
    messages: list[Message] = []
    add_generation_prompt = False
    for span in spans:
        item = span.content if isinstance(span, Span) else None  # parallel groups hold no chat
        if isinstance(item, TemplateArgs):
            if args is not None or messages:
                raise ValueError("template arguments (tools, chat_template, ...) come once, before the first message")
            args = item
        elif isinstance(item, Message):
            if add_generation_prompt:
                raise ValueError("a message follows the generation prompt; append messages to the context "
                                 "that ends with the generation prompt (it is replaced), not after it")
            messages.append(item)
        elif isinstance(item, GenerationPrompt):
            if add_generation_prompt or not messages:
                raise ValueError("a generation prompt follows the messages of a conversation, once")
            add_generation_prompt = True
    if not messages:
        raise ValueError("template arguments without messages: a conversation needs at least one message")
    return args, tuple(messages), add_generation_prompt


# -- building contexts (Context.chat / Context.message) ----------------------------------


