"""Chat messages as span content: immutable values that ``chat.py`` renders with the
tokenizer's chat template. No dependency on the span tree (``spans.py`` builds on them)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import attrs

from . import inputs
from .media import Image

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


def _check_content(_, __, content) -> None:
    if content is not None and not isinstance(content, str) and not (
            isinstance(content, tuple) and all(isinstance(p, (str, Image)) for p in content)):
        raise TypeError(f"message content is a str, None or a tuple of parts (str, Image), "
                        f"got {type(content).__name__}")
    for part in (content,) if isinstance(content, str) else content if isinstance(content, tuple) else ():
        if isinstance(part, str):
            inputs.text(part, "message content")


def _parts(content):
    """Message content as stored: a str, None, or (for content with images) a tuple of
    ``str`` and ``Image`` parts. A list of OpenAI/HF parts ``{"type": "text", "text": ...}``
    / ``{"type": "image", "image": path_or_pil_or_array}`` (or an ``Image``) is converted;
    audio and video parts are refused (docs/multimodal.md)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, Mapping) or not isinstance(content, Sequence):
        raise TypeError(f"message content is a str (text only) or a list of parts, got {type(content).__name__}")
    parts: list[str | Image] = []
    for part in content:
        if isinstance(part, Image):
            parts.append(part)
            continue
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            parts.append(part["text"])
        elif kind == "image" and isinstance(part.get("image"), Image):
            parts.append(part["image"])
        elif kind == "image" and part.get("image") is not None:
            parts.append(Image(part["image"]))
        elif kind in ("audio", "video", "input_audio", "video_url"):
            raise NotImplementedError(f"{kind} parts are not supported: spanctx's media spans are images "
                                      "(see docs/multimodal.md)")
        else:
            raise TypeError(f"message content is a str (text only) or a list of parts {{'type': 'text', 'text': ...}} "
                            f"/ {{'type': 'image', 'image': path_or_pil_or_array}}, got the part {part!r}")
    return tuple(parts) if any(isinstance(p, Image) for p in parts) else "".join(parts)


@attrs.frozen
class Message(ChatItem):
    """One chat message. ``extra_json`` holds the other message keys (``tool_calls``,
    ``name``, ``tool_call_id``, ...) as JSON, so that a message is an immutable value."""

    role: str = attrs.field(validator=_check_role)
    content: str | tuple[str | Image, ...] | None = attrs.field(default=None, validator=_check_content)
    extra_json: str = ""

    @classmethod
    def of(cls, role: str, content: str | None = None, **extra) -> Message:
        return cls(role, _parts(content), _dumps(extra, "message fields") if extra else "")

    @property
    def images(self) -> tuple[Image, ...]:
        return tuple(p for p in self.content if isinstance(p, Image)) if isinstance(self.content, tuple) else ()

    def as_dict(self) -> dict:
        """The message as a chat template sees it (keys whose value is None are left out)."""
        out = {"role": self.role}
        if isinstance(self.content, tuple):  # the template renders each image part as the image token
            out["content"] = [{"type": "image"} if isinstance(p, Image) else {"type": "text", "text": p}
                              for p in self.content]
        elif self.content is not None:
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
