"""Chat messages as span content: immutable values that ``chat.py`` renders with the
tokenizer's chat template. No dependency on the span tree (``spans.py`` builds on them)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import attrs

__all__ = ["ChatItem", "GenerationPrompt", "Message", "TemplateArgs", "as_message", "template_args"]

# apply_chat_template arguments that spanctx sets itself
_RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "add_generation_prompt", "continue_final_message",
                                       "tokenize", "return_dict", "return_tensors", "tokenizer_kwargs"})


class ChatItem:
    """Span content that the runtime renders with the tokenizer's chat template before
    tokenizing: a message, a generation prompt or template arguments (see ``chat.py``)."""

    __slots__ = ()



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
