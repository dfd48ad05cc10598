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
import json
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs
from jinja2 import TemplateError

from .spans import ChatItem, Context, Span

# apply_chat_template arguments that spanctx sets itself
_RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "add_generation_prompt", "continue_final_message",
                                       "tokenize", "return_dict", "return_tensors", "tokenizer_kwargs"})


class ChatSplitWarning(UserWarning):
    """The chat template could not be cut at some message boundaries (see ``chat.py``)."""


def _check_role(_, __, role: str) -> None:
    if not isinstance(role, str) or not role:
        raise TypeError(f"a message role is a non-empty str, got {role!r}")


def _check_content(_, __, content: str | None) -> None:
    if content is not None and not isinstance(content, str):
        raise TypeError(f"message content is a str or None (text only), got {type(content).__name__}")


@attrs.frozen
class Message(ChatItem):
    """One chat message. ``extra_json`` holds the other message keys (``tool_calls``,
    ``name``, ``tool_call_id``, ...) as JSON, so that a message is an immutable value."""

    role: str = attrs.field(validator=_check_role)
    content: str | None = attrs.field(default=None, validator=_check_content)
    extra_json: str = ""

    @classmethod
    def of(cls, role: str, content: str | None = None, **extra) -> Message:
        return cls(role, content, _dumps(extra, "message fields") if extra else "")

    def as_dict(self) -> dict:
        """The message as a chat template sees it (keys whose value is None are left out)."""
        out = {"role": self.role}
        if self.content is not None:
            out["content"] = self.content
        if self.extra_json:
            out.update(json.loads(self.extra_json))
        return {k: v for k, v in out.items() if v is not None}


@attrs.frozen
class GenerationPrompt(ChatItem):
    """The template's generation prompt after the last message (``add_generation_prompt``)."""


@attrs.frozen
class TemplateArgs(ChatItem):
    """Keyword arguments of ``apply_chat_template`` for the conversation after it, as JSON:
    ``tools`` (JSON schemas), ``chat_template`` (a template override) and any other."""

    kwargs_json: str

    def as_kwargs(self) -> dict:
        return json.loads(self.kwargs_json)


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

    def rendering(self, spans: Sequence[Span]) -> ChatRendering:
        """The rendering of the conversation in ``spans`` (a path's spans)."""
        args, messages, add_generation_prompt = _conversation(spans)
        return self._rendering(args, messages, add_generation_prompt)

    def expand(self, spans: Sequence[Span]) -> tuple[Span, ...]:
        """``spans`` with the chat spans replaced by text spans cut from the rendering.

        Plain spans keep their place; one may sit between two messages only where the
        template can be cut there.
        """
        rendering = self.rendering(spans)
        text = rendering.text
        out: list[Span] = []
        pos, k = 0, 0
        cut_pending = False  # the last message had no cut: its text goes with the next span

        def emit(end: int) -> None:
            nonlocal pos
            if end > pos:
                out.append(Span(text[pos:end]))
            pos = end

        for span in spans:
            item = span.content
            if not span.is_chat:
                if cut_pending:
                    raise ValueError(
                        f"a plain span follows message {k - 1}, but the chat template cannot be cut there "
                        f"(it renders earlier messages differently once later ones exist)")
                out.append(span)
            elif isinstance(item, Message):
                for offset in (rendering.reply_starts[k], rendering.message_ends[k]):
                    if offset is not None:
                        emit(offset)
                cut_pending = rendering.message_ends[k] is None
                k += 1
            elif isinstance(item, GenerationPrompt):
                emit(len(text))
                cut_pending = False
        assert not cut_pending and pos == len(text), "the last chat span always ends the rendering"
        return tuple(out)

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
        item = span.content
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


def append_messages(ctx: Context, messages: Iterable[Mapping | Message], *, system: str | None = None,
                    tools: Sequence | None = None, add_generation_prompt: bool = False,
                    chat_template: str | None = None, template_kwargs: Mapping | None = None) -> Context:
    """``ctx`` followed by chat spans; see ``Context.chat`` and ``Context.message``."""
    if not ctx.is_root and isinstance(ctx.span.content, GenerationPrompt):
        ctx = ctx.parent  # the generation prompt was a placeholder for the next message
    args = template_args(tools, chat_template, template_kwargs or {})
    if args is not None:
        if any(span.is_chat for span in ctx.spans):
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
        if not any(isinstance(span.content, Message) for span in ctx.spans):
            raise ValueError("a generation prompt needs at least one message before it")
        ctx = ctx.append(GenerationPrompt())
    elif not new:
        raise ValueError("no messages given")
    return ctx


def as_message(message: Mapping | Message) -> Message:
    """A ``Message`` from a dict with ``role``, ``content`` and other message keys."""
    if isinstance(message, Message):
        return message
    if not isinstance(message, Mapping):
        raise TypeError(f"a message is a dict or a Message, got {type(message).__name__}")
    if "role" not in message:
        raise ValueError(f"a message needs a 'role': {dict(message)!r}")
    fields = dict(message)
    return Message.of(fields.pop("role"), fields.pop("content", None), **fields)


def template_args(tools: Sequence | None, chat_template: str | None, kwargs: Mapping) -> TemplateArgs | None:
    """The ``TemplateArgs`` span for these arguments, or None when there are none.
    Tools are JSON schemas or Python functions (schema from signature and docstring)."""
    reserved = _RESERVED_TEMPLATE_KWARGS & set(kwargs)
    if reserved:
        raise ValueError(f"spanctx sets {sorted(reserved)} itself; they cannot be template kwargs")
    out = dict(kwargs)
    if tools is not None:
        out["tools"] = [_tool_schema(tool) for tool in tools]
    if chat_template is not None:
        out["chat_template"] = chat_template
    return TemplateArgs(_dumps(out, "template arguments")) if out else None


def _tool_schema(tool) -> dict:
    if isinstance(tool, Mapping):
        return dict(tool)
    if callable(tool):
        from transformers.utils import get_json_schema

        return get_json_schema(tool)
    raise TypeError(f"a tool is a JSON schema (dict) or a function, got {type(tool).__name__}")


def _dumps(value, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError as exc:
        raise TypeError(f"{what} must be JSON-serializable: {exc}") from None
