"""Chat: messages are spans cut from the template's rendering; turns reuse earlier turns."""

import warnings

import pytest
import torch
from conftest import tiny_model, tiny_runtime
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2 import TemplateError
from strategies import chat_messages

import spanctx
from spanctx import ChatSplitWarning, Context
from spanctx.core.messages import GenerationPrompt

ATOL = 1e-4

# The message count comes first: a conversation's rendering changes when it grows, so
# no prefix rendering is a prefix of the full one and there is nothing to cut.
COUNTING_TEMPLATE = (
    "{{ messages | length }} messages\n"
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
# Mistral-style: the system prompt is written into the LAST user message, so it moves
# when a user message is added; the other cuts hold.
SYSTEM_LAST_TEMPLATE = (
    "{% set sys = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | join('') %}"
    "{% set last_user = namespace(i=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set last_user.i = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "<{{ m['role'] }}>{% if loop.index0 == last_user.i and sys %}{{ sys }}\n\n{% endif %}{{ m['content'] }}</>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
# Refuses conversations that end with an assistant message (a prefix it will not render)
REFUSING_TEMPLATE = (
    "{% if messages[-1]['role'] == 'assistant' and not add_generation_prompt %}"
    "{{ raise_exception('the last message must not be the assistant') }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Renders the tools into the system block, like Qwen's and Llama's templates
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m.tool_calls %}<call>{{ m.tool_calls | tojson }}</call>{% endif %}"
    "{% if m.name %} (from {{ m.name }}){% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def apply_template(rt, messages, tokenize, **kwargs):
    out = rt.tokenizer.apply_chat_template(messages, tokenize=tokenize, **kwargs)
    return out["input_ids"] if tokenize else out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=chat_messages(), add_generation_prompt=st.booleans(),
       template=st.sampled_from([None, COUNTING_TEMPLATE, SYSTEM_LAST_TEMPLATE, REFUSING_TEMPLATE]))
def test_pieces_join_to_the_template_rendering_and_ids_match_apply_chat_template(
        messages, add_generation_prompt, template):
    rt = tiny_runtime("llama")
    ctx = Context.chat(messages, add_generation_prompt=add_generation_prompt, chat_template=template)
    kwargs = {"add_generation_prompt": add_generation_prompt, "chat_template": template}
    try:
        expected_text = apply_template(rt, messages, False, **kwargs)
    except TemplateError:  # the template refuses the whole conversation: so does spanctx
        with pytest.raises(TemplateError):
            rt.token_ids(ctx)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChatSplitWarning)
        rendering = rt.chat_rendering(ctx)
        ids = rt.token_ids(ctx)
    assert rendering.text == expected_text
    assert "".join(rendering.pieces) == rendering.text
    # the byte tokenizer tokenizes piecewise exactly as whole: the prompt is the template's
    assert ids == apply_template(rt, messages, True, **kwargs)
    if template is None:  # ChatML is prefix-stable: every message is its own span
        assert rendering.split
    if template == COUNTING_TEMPLATE and len(messages) > 1:
        assert rendering.unsplit == tuple(range(len(messages) - 1))


def test_each_turn_reuses_every_earlier_turn():
    rt, fresh = tiny_runtime("llama"), tiny_runtime("llama")
    ctx = Context.chat([{"role": "user", "content": "Hello there, who are you?"}], system="You are terse.")
    previous = []
    for question in ["And the weather?", "Thanks, bye.", None]:
        result = rt.generate(ctx, max_new_tokens=6)
        ids = rt.token_ids(ctx)
        assert ids[: len(previous)] == previous  # this prompt extends the previous one
        assert result.stats.cached_tokens == len(previous)  # ... and reuses all of it
        assert result.stats.computed_tokens == len(ids) - len(previous)
        assert result.token_ids == fresh.generate(ctx, max_new_tokens=6, reuse=False).token_ids
        torch.testing.assert_close(rt.next_token_logits(ctx), fresh.next_token_logits(ctx, reuse=False),
                                   atol=ATOL, rtol=0)
        previous = ids
        if question is not None:  # the reply replaces the generation prompt, then the next question
            ctx = ctx.message("assistant", result.text).chat([{"role": "user", "content": question}])


def test_turn_reuse_on_a_sliding_window_model():
    rt = tiny_runtime("mistral")
    first = Context.chat([{"role": "user", "content": "a question that crosses the window of sixteen"}])
    reply = rt.generate(first, max_new_tokens=4)
    second = first.message("assistant", reply.text).message("user", "again?", add_generation_prompt=True)
    result = rt.generate(second, max_new_tokens=4)
    assert result.stats.cached_tokens == len(rt.token_ids(first))
    assert result.token_ids == rt.generate(second, max_new_tokens=4, reuse=False).token_ids


def test_tools_and_system_are_passed_to_the_template():
    def get_weather(city: str) -> str:
        """Weather of a city.

        Args:
            city: the city's name
        """
        return "sunny"

    schema = {"type": "function", "function": {"name": "lookup", "description": "Look up a word.",
                                               "parameters": {"type": "object", "properties": {}}}}
    rt = tiny_runtime("llama")
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    ctx = Context.chat(messages, system="Use tools.", tools=[get_weather, schema], chat_template=TOOLS_TEMPLATE)
    text = rt.chat_rendering(ctx).text
    assert "get_weather" in text and "lookup" in text and "Use tools." in text
    expected = apply_template(rt, [{"role": "system", "content": "Use tools."}, *messages], True,
                              tools=[get_weather, schema], chat_template=TOOLS_TEMPLATE,
                              add_generation_prompt=True)
    assert rt.token_ids(ctx) == expected
    # tool messages and tool calls: extra message keys reach the template
    later = ctx.message("assistant", "", tool_calls=[{"type": "function",
                                                      "function": {"name": "get_weather",
                                                                   "arguments": {"city": "Paris"}}}])
    later = later.message("tool", "sunny", name="get_weather")
    assert '"city": "Paris"' in rt.chat_rendering(later).text
    assert "(from get_weather)" in rt.chat_rendering(later).text
    assert rt.chat_rendering(later).split
    assert rt.token_ids(later)[: len(rt.token_ids(ctx))] == rt.token_ids(ctx)


def test_an_unsplittable_template_falls_back_to_one_span_and_says_so():
    rt = tiny_runtime("llama")
    first = Context.chat([{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}],
                         chat_template=COUNTING_TEMPLATE)
    with pytest.warns(ChatSplitWarning, match="cannot be cut"):
        result = rt.generate(first, max_new_tokens=4)
    rendering = rt.chat_rendering(first)
    assert not rendering.split and rendering.unsplit == (0,)  # both messages in one span
    assert rendering.pieces == (rendering.text[: -len("[assistant] ")], "[assistant] ")
    assert result.token_ids == rt.generate(first, max_new_tokens=4, reuse=False).token_ids
    second = first.message("assistant", result.text).message("user", "more", add_generation_prompt=True)
    with pytest.warns(ChatSplitWarning):
        again = rt.generate(second, max_new_tokens=4)
    assert again.stats.cached_tokens == 0  # the whole conversation changed: nothing to reuse
    assert again.token_ids == rt.generate(second, max_new_tokens=4, reuse=False).token_ids


def test_a_partly_splittable_template_keeps_the_cuts_that_hold():
    rt = tiny_runtime("llama")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    ctx = Context.chat(messages, chat_template=SYSTEM_LAST_TEMPLATE)
    with pytest.warns(ChatSplitWarning):
        rendering = rt.chat_rendering(ctx)
    # the system text moves to the last user message: no cut between it and the first user
    # message holds (the system message itself renders to nothing, so it ends at 0)
    assert rendering.message_ends[0] == 0
    assert rendering.unsplit == (1, 2)
    assert rendering.message_ends[3] == len(rendering.text) - len("<assistant>")


def test_plain_spans_between_messages():
    rt = tiny_runtime("llama")
    ctx = Context.chat([{"role": "user", "content": "hi"}], add_generation_prompt=False).append("[note]")
    ctx = ctx.message("user", "again")
    rendered = apply_template(rt, [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}], False)
    cut = rendered.index("<|im_start|>user\nagain")
    assert rt.tokenizer.decode(rt.token_ids(ctx)) == rendered[:cut] + "[note]" + rendered[cut:]
    # where the template cannot be cut, a plain span has no place
    counted = Context.chat([{"role": "user", "content": "hi"}], add_generation_prompt=False,
                           chat_template=COUNTING_TEMPLATE).append("[note]").message("user", "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChatSplitWarning)
        with pytest.raises(ValueError, match="cannot be cut"):
            rt.token_ids(counted)


def test_a_chat_path_gets_no_automatic_bos_and_plain_paths_keep_it():
    rt = tiny_runtime("llama")
    bos = rt.tokenizer.bos_token_id
    assert rt.token_ids(Context().append("hi"))[0] == bos
    assert rt.token_ids(Context.message("user", "hi"))[0] != bos


def test_building_conversations():
    user = {"role": "user", "content": "hi"}
    assert Context.chat([user]) == Context().chat([user])
    assert Context.message("user", "hi") == Context.chat([user], add_generation_prompt=False)
    with_prompt = Context.chat([user])
    assert isinstance(with_prompt.span.content, GenerationPrompt)
    # a message replaces the trailing generation prompt
    assert with_prompt.message("assistant", "yo").spans[:-1] == with_prompt.spans[:-1]
    assert with_prompt.message("assistant", "yo").span.content == spanctx.Message("assistant", "yo")
    # plain text after the generation prompt (an assistant prefix) is kept after it
    assert with_prompt.append("Sure,").parent == with_prompt


@pytest.mark.parametrize("build, match", [
    (lambda: Context.chat([]), "generation prompt needs"),
    (lambda: Context.chat([], add_generation_prompt=False), "no messages"),
    (lambda: Context.chat([{"content": "x"}]), "needs a 'role'"),
    (lambda: Context.chat([{"role": "user", "content": ["parts"]}]), "text only"),
    (lambda: Context.chat([{"role": "system", "content": "a"}], system="b"), "system"),
    (lambda: Context.message("user", "x").chat([{"role": "user", "content": "y"}], tools=[]), "conversation starts"),
    (lambda: Context.chat([{"role": "user", "content": "x"}], tokenize=True), "itself"),
    (lambda: Context.chat([{"role": "user", "content": "x"}], tools=[3]), "JSON schema"),
])
def test_bad_conversations_are_refused(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_a_tokenizer_without_a_chat_template_is_a_clear_error():
    model, tokenizer = tiny_model("llama")
    tokenizer = spanctx.byte_tokenizer()
    tokenizer.chat_template = None
    rt = spanctx.Runtime(model, tokenizer, store_bytes=1 << 20)
    with pytest.raises(ValueError, match="no chat template"):
        rt.token_ids(Context.message("user", "hi"))
    ctx = Context.chat([{"role": "user", "content": "hi"}], chat_template=TOOLS_TEMPLATE)
    assert rt.tokenizer.decode(rt.token_ids(ctx)) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
