"""Tools: schemas, tool-call parsing and validation (malformed outputs too), the loop."""

from __future__ import annotations

import json

import attrs
import jsonschema
import pytest
from conftest import tiny_model, tiny_runtime
from hypothesis import given, settings
from strategies import TOOL_FUNCTIONS, add, get_weather, noisy_replies, tagged_replies

import spanctx
from spanctx.features.tools import (
    InvalidArguments,
    MalformedToolCall,
    Tool,
    ToolCall,
    ToolCallError,
    ToolLoopLimit,
    UnknownTool,
    as_tools,
    parse_tool_calls,
    tool_chat,
)

# A Hermes/Qwen-style template for the byte tokenizer: tools in a system block, calls in
# <tool_call> tags, tool results as "tool" turns.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call><|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for call in message.get('tool_calls', []) %}<tool_call>{{ call['function'] | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tools_runtime() -> spanctx.Runtime:
    model, _ = tiny_model("llama")
    tokenizer = spanctx.byte_tokenizer()
    tokenizer.chat_template = TOOLS_TEMPLATE
    return spanctx.Runtime(model, tokenizer, store_bytes=64 << 20)


# -- schemas -------------------------------------------------------------------------------


def test_tool_from_function_reads_signature_and_docstring():
    tool = Tool.from_function(get_weather)
    assert tool.name == "get_weather" and tool.description == "Weather forecast for a city."
    assert tool.parameters["required"] == ["city"]
    assert tool.parameters["properties"]["city"] == {"type": "string", "description": "The city's name."}
    assert tool.function is get_weather
    assert tool.schema()["type"] == "function" and tool.schema()["function"]["name"] == "get_weather"


def test_tool_from_schema_accepts_both_shapes():
    parameters = {"type": "object", "properties": {"x": {"type": "integer"}}}
    inner = {"name": "f", "description": "d", "parameters": parameters}
    for schema in (inner, {"type": "function", "function": inner}):
        tool = Tool.from_schema(schema)
        assert (tool.name, tool.description, tool.parameters) == ("f", "d", inner["parameters"])
    assert Tool.from_schema({"name": "g"}).argument_errors({}) == []


def test_tool_errors_are_clear():
    def undocumented(x: int):
        return x

    with pytest.raises(ValueError, match="cannot build a tool schema for 'undocumented'"):
        Tool.from_function(undocumented)
    with pytest.raises(ValueError, match="unique.*'add'"):
        as_tools([add, Tool.from_function(add)])
    with pytest.raises(ValueError, match="needs a 'name'"):
        Tool.from_schema({"type": "function", "function": {"description": "no name"}})
    with pytest.raises(ValueError, match="tool 'bad': invalid JSON schema"):
        Tool("bad", "", {"type": "no-such-type"})


# -- parsing -------------------------------------------------------------------------------


def test_parse_tagged_calls_and_content():
    text = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": null}}'
            '</tool_call>\n<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>')
    reply = parse_tool_calls(text, TOOL_FUNCTIONS)
    assert reply.content == "Let me check."
    assert reply.tool_calls == (ToolCall("get_weather", {"city": "Paris", "days": None}),
                                ToolCall("add", {"a": 1, "b": 2}))
    assert reply.message()["tool_calls"][1] == {"type": "function", "function": {"name": "add",
                                                                                   "arguments": {"a": 1, "b": 2}}}


def test_parse_json_style():
    reply = parse_tool_calls(' [{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "now"}] ',
                             TOOL_FUNCTIONS, style="json")
    assert reply.content == "" and [c.name for c in reply.tool_calls] == ["add", "now"]
    plain = parse_tool_calls("It is sunny.", TOOL_FUNCTIONS, style="json")
    assert plain.content == "It is sunny." and plain.tool_calls == ()


@pytest.mark.parametrize(("text", "error", "match"), [
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', MalformedToolCall, "unclosed"),
    ('done</tool_call>', MalformedToolCall, "without a matching"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>', MalformedToolCall, "not valid JSON"),
    ('<tool_call>["add"]</tool_call>', MalformedToolCall, "must be a JSON object"),
    ('<tool_call>{"arguments": {}}</tool_call>', MalformedToolCall, "string 'name'"),
    ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', MalformedToolCall, "must be a JSON object"),
    ('<tool_call>{"name": "add", "arguments": "{oops"}</tool_call>', MalformedToolCall, "arguments string"),
    ('<tool_call>{"name": "sub", "arguments": {}}</tool_call>', UnknownTool, "unknown tool 'sub'"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', InvalidArguments, "'b' is a required"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": "2"}}</tool_call>', InvalidArguments,
     "b: '2' is not of type 'integer'"),
    ('<tool_call>{"name": "add", "arguments": {"a": true, "b": 2}}</tool_call>', InvalidArguments, "a: True"),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": null}}</tool_call>', InvalidArguments, "city"),
])
def test_malformed_tool_calls_raise_clear_errors(text, error, match):
    with pytest.raises(error, match=match) as info:
        parse_tool_calls(text, TOOL_FUNCTIONS)
    assert info.value.text == text


def test_json_style_malformed():
    with pytest.raises(MalformedToolCall, match="the reply is not valid JSON"):
        parse_tool_calls('{"name": "add"} and more', TOOL_FUNCTIONS, style="json")


@settings(max_examples=60, deadline=None)
@given(tagged_replies())
def test_valid_tagged_replies_round_trip(reply):
    text, content, calls = reply
    parsed = parse_tool_calls(text, TOOL_FUNCTIONS)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls


@settings(max_examples=150, deadline=None)
@given(noisy_replies)
def test_noisy_replies_parse_to_valid_calls_or_raise_tool_call_errors(text):
    tools = as_tools(TOOL_FUNCTIONS)
    for style in ("tagged", "json"):
        try:
            reply = parse_tool_calls(text, tools, style=style)
        except ToolCallError as exc:
            assert exc.text == text
            continue
        by_name = {t.name: t for t in tools}
        for call in reply.tool_calls:  # everything returned is valid, checked independently
            jsonschema.validate(call.arguments, by_name[call.name].parameters)


# -- rendering and the loop ------------------------------------------------------------------


def test_tool_chat_passes_tools_to_the_template():
    rt = tools_runtime()
    ctx = tool_chat(rt, [{"role": "user", "content": "2+3?"}], as_tools([add]))
    text = rt.chat_rendering(ctx).text
    assert json.dumps(Tool.from_function(add).schema()) in text
    assert text.endswith("<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n")
    plain = tiny_runtime("llama")  # the byte tokenizer's ChatML template has no tools block
    with pytest.raises(ValueError, match="ignores tools="):
        tool_chat(plain, [{"role": "user", "content": "hi"}], as_tools([add]))


def scripted(rt, monkeypatch, replies):
    """Make ``rt.generate`` return ``replies`` in turn, after running the real prompt path
    (1 new token) so that store reuse is real. Returns the list of (ctx, stats) seen."""
    real, replies, seen = rt.generate, iter(replies), []

    def generate(ctx, max_new_tokens=32, **kwargs):
        result = real(ctx, 1)
        seen.append((ctx, result.stats))
        return attrs.evolve(result, text=next(replies))

    monkeypatch.setattr(rt, "generate", generate)
    return seen


def test_run_tools_calls_functions_and_appends_results(monkeypatch):
    rt = tools_runtime()
    calls = []

    def add_logged(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first term.
            b: The second term.
        """
        calls.append((a, b))
        return a + b

    seen = scripted(rt, monkeypatch, ['<tool_call>{"name": "add_logged", "arguments": {"a": 2, "b": 3}}</tool_call>',
                                      "The sum is 5."])
    run = rt.run_tools([{"role": "user", "content": "2+3?"}], [add_logged, get_weather])
    assert calls == [(2, 3)]
    assert [m["role"] for m in run.messages] == ["user", "assistant", "tool", "assistant"]
    assert run.messages[2] == {"role": "tool", "name": "add_logged", "content": "5"}
    assert run.reply.content == "The sum is 5." and run.reply.tool_calls == ()
    # round 2's prompt starts with exactly round 1's prompt, which comes from the store
    first_ctx, second_ctx = seen[0][0], seen[1][0]
    first_ids, second_ids = rt.token_ids(first_ctx), rt.token_ids(second_ctx)
    assert second_ids[:len(first_ids)] == first_ids
    assert "<|im_start|>tool\n5<|im_end|>" in rt.chat_rendering(second_ctx).text
    assert seen[1][1].cached_tokens == len(first_ids)


def test_run_tools_stops_after_max_rounds(monkeypatch):
    rt = tools_runtime()
    scripted(rt, monkeypatch, ['<tool_call>{"name": "now"}</tool_call>'] * 3)
    with pytest.raises(ToolLoopLimit, match="after 2 rounds") as info:
        rt.run_tools([{"role": "user", "content": "time?"}], TOOL_FUNCTIONS, max_rounds=2)
    assert len(info.value.run.turns) == 2
    assert [m["role"] for m in info.value.run.messages] == ["user", "assistant", "tool", "assistant", "tool"]


def test_run_tools_needs_functions():
    with pytest.raises(ValueError, match="have none: \\['f'\\]"):
        tools_runtime().run_tools([{"role": "user", "content": "x"}], [{"name": "f"}])


def test_tool_turn_on_a_real_model_generates_and_parses():
    rt = tools_runtime()
    turn = rt.tool_turn([{"role": "user", "content": "What time is it?"}], TOOL_FUNCTIONS, max_new_tokens=8)
    assert len(turn.result.token_ids) <= 8
    # random weights: the reply is noise without tool calls, and it is the content
    assert turn.reply.tool_calls == () and turn.reply.content == turn.result.text.strip()
    text = rt.chat_rendering(turn.context).text
    assert rt.token_ids(turn.context) == list(rt.tokenizer(text, add_special_tokens=False)["input_ids"])
