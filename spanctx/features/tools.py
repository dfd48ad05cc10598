"""Tool calling: tool schemas, tool calls parsed and validated, and an optional loop.

Tools are Python functions (their JSON schema comes from the signature and the Google-
style docstring, through transformers' ``get_json_schema``) or JSON schemas in the
OpenAI/HF shape (``{"type": "function", "function": {"name", "description",
"parameters"}}`` or the inner dict alone). They go to the chat template as ``tools=``.

A model's reply is parsed in one of two syntaxes (``style``):
- ``"tagged"`` (Hermes, Qwen2.5/Qwen3 templates): every ``<tool_call>{...}</tool_call>``
  block is one call; the text outside the blocks is the reply's content.
- ``"json"`` (Llama-3.x JSON tool calling): a reply that starts with ``{`` or ``[`` is
  a call or a list of calls and nothing else; any other reply is plain content.
A call is a JSON object with ``"name"`` and ``"arguments"`` (or ``"parameters"``): an
object, or a string holding a JSON object. Other keys are ignored. The arguments are
validated against the tool's parameter schema with ``jsonschema`` (Draft 2020-12; the
``tools`` extra), after turning OpenAPI's ``"nullable": true`` (which ``get_json_schema``
emits for ``Optional`` parameters) into a ``"null"`` type. Every failure is a
``ToolCallError`` naming what is wrong and where.

Conversations are ``Context.chat`` contexts (``chat.py``): one span per message, the
tools in the template arguments, so each round of the loop reuses every earlier round's
KV: its prompt starts with exactly the previous round's prompt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs

from ..core.spans import Context
from ..session.results import Result
from . import validation

if TYPE_CHECKING:
    from ..runtime import Runtime

Style = Literal["tagged", "json"]
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


class ToolCallError(ValueError):
    """A model reply holds a tool call that cannot be used. ``text`` is the reply."""

    def __init__(self, message: str, text: str) -> None:
        super().__init__(message)
        self.text = text


class MalformedToolCall(ToolCallError):
    """Not a call: bad JSON, an unclosed tag, no name, arguments not an object."""


class UnknownTool(ToolCallError):
    """A call names no given tool."""


class InvalidArguments(ToolCallError):
    """A call's arguments do not match the tool's parameter schema."""


class ToolLoopLimit(RuntimeError):
    """``run_tools`` still got tool calls after ``max_rounds``; ``run`` is the run so far."""

    def __init__(self, message: str, run: ToolRun) -> None:
        super().__init__(message)
        self.run = run


# -- tools -------------------------------------------------------------------------------


@attrs.frozen(eq=False)
class Tool:
    """A callable tool: name, description, JSON schema of its arguments, and optionally
    the Python function that ``run_tools`` calls."""

    name: str
    description: str
    parameters: dict = attrs.field(repr=False)
    function: Callable | None = attrs.field(default=None, repr=False)
    _validator: Any = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"a tool needs a non-empty string name, got {self.name!r}")
        try:
            checker = validation.validator(_strict_nullable(self.parameters))
        except ValueError as exc:
            raise ValueError(f"tool {self.name!r}: {exc}") from None
        object.__setattr__(self, "_validator", checker)

    @classmethod
    def from_function(cls, function: Callable) -> Tool:
        """The tool of a function with type hints and a Google-style docstring."""
        from transformers.utils import get_json_schema

        try:
            spec = get_json_schema(function)["function"]
        except Exception as exc:  # transformers raises its own parsing exceptions
            raise ValueError(f"cannot build a tool schema for {getattr(function, '__name__', function)!r}: "
                             f"{exc}") from exc
        return cls(spec["name"], spec.get("description", ""), spec.get("parameters", _NO_PARAMETERS), function)

    @classmethod
    def from_schema(cls, schema: dict, function: Callable | None = None) -> Tool:
        """The tool of ``{"type": "function", "function": {...}}`` or of the inner dict."""
        spec = schema.get("function", schema) if schema.get("type") == "function" else schema
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"a tool schema needs a 'name': {schema!r}")
        return cls(spec["name"], spec.get("description", ""), spec.get("parameters", _NO_PARAMETERS), function)

    def schema(self) -> dict:
        """The OpenAI/HF function schema that chat templates take in ``tools=``."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def argument_errors(self, arguments: dict) -> list[str]:
        """What is wrong with ``arguments`` (empty when they are valid)."""
        return validation.errors(self._validator, arguments)


_NO_PARAMETERS = {"type": "object", "properties": {}}

ToolLike = Tool | Callable | dict


def as_tools(tools: Sequence[ToolLike]) -> tuple[Tool, ...]:
    """``tools`` as ``Tool``s: functions and schemas converted, names unique."""
    out = tuple(t if isinstance(t, Tool) else Tool.from_schema(t) if isinstance(t, dict) else Tool.from_function(t)
                for t in tools)
    names = [t.name for t in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"tool names must be unique, repeated: {duplicates}")
    return out


def _strict_nullable(schema: Any) -> Any:
    """``schema`` with OpenAPI's ``"nullable": true`` turned into a ``"null"`` type."""
    if isinstance(schema, list):
        return [_strict_nullable(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict_nullable(v) for k, v in schema.items() if k != "nullable"}
    if schema.get("nullable") is True and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = types if "null" in types else [*types, "null"]
    return out


# -- parsing -----------------------------------------------------------------------------


@attrs.frozen
class ToolCall:
    """One validated call: a tool name and its arguments."""

    name: str
    arguments: dict = attrs.field(hash=False)


@attrs.frozen
class AssistantReply:
    """A parsed reply: its plain content and its tool calls (in order)."""

    content: str
    tool_calls: tuple[ToolCall, ...]

    def message(self) -> dict:
        """The reply as a chat message, in the HF ``tool_calls`` convention."""
        message: dict = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in self.tool_calls]
        return message


def parse_tool_calls(text: str, tools: Sequence[ToolLike], *, style: Style = "tagged") -> AssistantReply:
    """Parse and validate the tool calls in a model reply (see the module doc).

    Raises ``MalformedToolCall``, ``UnknownTool`` or ``InvalidArguments`` (all
    ``ToolCallError``) for the first call that cannot be used.
    """
    by_name = {t.name: t for t in as_tools(tools)}
    if style == "tagged":
        content, raw_calls = _split_tagged(text)
    elif style == "json":
        content, raw_calls = _split_json(text)
    else:
        raise ValueError(f"style must be 'tagged' or 'json', got {style!r}")
    calls = tuple(_validated_call(call, by_name, text) for call in raw_calls)
    return AssistantReply(content, calls)


def _split_tagged(text: str) -> tuple[str, list[Any]]:
    """The text outside the ``<tool_call>`` blocks, and each block's JSON value."""
    pattern = re.compile(re.escape(TOOL_CALL_OPEN) + "(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
    blocks = [m.group(1) for m in pattern.finditer(text)]
    outside = pattern.sub("", text)
    if TOOL_CALL_OPEN in outside:
        raise MalformedToolCall(f"unclosed {TOOL_CALL_OPEN} (was the reply cut by max_new_tokens?)", text)
    if TOOL_CALL_CLOSE in outside:
        raise MalformedToolCall(f"{TOOL_CALL_CLOSE} without a matching {TOOL_CALL_OPEN}", text)
    return outside.strip(), [_loads(block.strip(), text, "a tool call") for block in blocks]


def _split_json(text: str) -> tuple[str, list[Any]]:
    """A reply that starts with ``{`` or ``[`` is calls only; anything else is content."""
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return stripped, []
    value = _loads(stripped, text, "the reply")
    return "", value if isinstance(value, list) else [value]


def _validated_call(call: Any, by_name: dict[str, Tool], text: str) -> ToolCall:
    if not isinstance(call, dict):
        raise MalformedToolCall(f"a tool call must be a JSON object, got {type(call).__name__}: {call!r}", text)
    name = call.get("name")
    if not isinstance(name, str):
        raise MalformedToolCall(f"a tool call needs a string 'name', got {call!r}", text)
    if name not in by_name:
        raise UnknownTool(f"unknown tool {name!r}; tools: {sorted(by_name)}", text)
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _loads(arguments, text, f"the arguments string of {name!r}")
    if not isinstance(arguments, dict):
        raise MalformedToolCall(f"the arguments of {name!r} must be a JSON object, got {arguments!r}", text)
    errors = by_name[name].argument_errors(arguments)
    if errors:
        raise InvalidArguments(f"invalid arguments for {name!r}: " + "; ".join(errors), text)
    return ToolCall(name, arguments)


def _loads(raw: str, text: str, what: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MalformedToolCall(f"{what} is not valid JSON ({exc.msg} at char {exc.pos}): {raw[:200]!r}",
                                text) from None


# -- chat and the loop ---------------------------------------------------------------------


def tool_chat(rt: Runtime, messages: Sequence[dict], tools: Sequence[Tool]) -> Context:
    """``messages`` as a chat context with ``tools`` passed to the template, ending with the
    generation prompt. Raises when the template ignores ``tools`` (the model would never
    see them)."""
    schemas = [t.schema() for t in tools]
    ctx = Context.chat(messages, tools=schemas or None)
    if schemas and rt.chat_rendering(ctx).text == rt.chat_rendering(Context.chat(messages)).text:
        raise ValueError("the tokenizer's chat template ignores tools=: describe the tools in a system message "
                         "or use a template that renders them")
    return ctx


@attrs.frozen
class ToolTurn:
    """One round: the generation, its parsed reply, and the conversation it ran on."""

    result: Result
    reply: AssistantReply
    context: Context  # the prompt the reply was generated after


def tool_turn(rt: Runtime, messages: Sequence[dict], tools: Sequence[ToolLike], *, style: Style = "tagged",
              max_new_tokens: int = 256, **generate_kwargs) -> ToolTurn:
    """Render ``messages`` with ``tools``, generate the assistant's reply, parse it."""
    tools = as_tools(tools)
    ctx = tool_chat(rt, messages, tools)
    result = rt.generate(ctx, max_new_tokens, **generate_kwargs)
    return ToolTurn(result, parse_tool_calls(result.text, tools, style=style), ctx)


@attrs.frozen
class ToolRun:
    """A finished loop: the whole conversation (the final reply last) and every round."""

    messages: tuple[dict, ...]
    turns: tuple[ToolTurn, ...]

    @property
    def reply(self) -> AssistantReply:
        return self.turns[-1].reply


def run_tools(rt: Runtime, messages: Sequence[dict], tools: Sequence[ToolLike], *, max_rounds: int = 8,
              style: Style = "tagged", max_new_tokens: int = 256, **generate_kwargs) -> ToolRun:
    """Generate; while the reply calls tools, call them and append each result as a
    ``{"role": "tool", "name", "content"}`` message, then generate again.

    Tool results that are not strings are JSON-encoded. Exceptions from a tool function
    propagate. Raises ``ToolLoopLimit`` when round ``max_rounds`` still calls tools.
    """
    tools = as_tools(tools)
    missing = [t.name for t in tools if t.function is None]
    if missing:
        raise ValueError(f"run_tools calls the tools' functions; these have none: {missing}")
    by_name = {t.name: t for t in tools}
    conversation, turns = list(messages), []
    for _ in range(max_rounds):
        turn = tool_turn(rt, conversation, tools, style=style, max_new_tokens=max_new_tokens, **generate_kwargs)
        turns.append(turn)
        conversation.append(turn.reply.message())
        if not turn.reply.tool_calls:
            return ToolRun(tuple(conversation), tuple(turns))
        for call in turn.reply.tool_calls:
            output = by_name[call.name].function(**call.arguments)
            content = output if isinstance(output, str) else json.dumps(output)
            conversation.append({"role": "tool", "name": call.name, "content": content})
    raise ToolLoopLimit(f"the model still called tools after {max_rounds} rounds",
                        ToolRun(tuple(conversation), tuple(turns)))
