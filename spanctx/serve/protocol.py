"""The wire format: OpenAI request bodies and span contexts as JSON, parsed into what the
scheduler runs, and OpenAI-style errors. Pure (no model, no HTTP).

A context on the wire is a list of nodes, root first; each node is one of
``"text"`` or ``{"text": "..."}`` (a text span), ``{"ids": [...]}`` (token ids),
``{"message": {"role", "content", ...}}``, ``{"generation_prompt": true}``,
``{"template": {...}}`` (chat template arguments), ``{"parallel": [node, ...],
"anchor_depth": n}`` (a parallel group over the first ``n`` nodes), or
``{"messages": [...], "system": ..., "add_generation_prompt": true}`` (a conversation,
expanded as ``Context.chat`` does). ``context_to_json`` writes the first six exactly, so
``context_from_json(context_to_json(ctx)) == ctx``.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from ..core.messages import GenerationPrompt, Message, TemplateArgs, template_args
from ..core.spans import Context, ParallelGroup, Span

__all__ = ["ApiError", "GenRequest", "chat_request", "completion_request", "context_from_json",
           "context_to_json", "span_request"]

# OpenAI fields that change the output and that this server does not implement: refused,
# never silently ignored.
_REFUSED = {"logit_bias": "logit bias", "tools": "tool calls", "tool_choice": "tool calls", "functions": "tool calls",
            "response_format": "JSON output", "echo": "echo", "suffix": "suffix", "best_of": "best_of",
            "presence_penalty": "presence penalty", "frequency_penalty": "frequency penalty"}
_IGNORED = {"model", "user", "stream_options", "parallel_tool_calls", "metadata", "store", "service_tier"}
_SAMPLING = {"temperature", "top_p", "seed", "max_tokens", "max_completion_tokens", "stop", "n", "stream",
             "cache_salt", "logprobs"}
MAX_STOP = 4
MAX_N = 128  # OpenAI's bound; the server's queue must also hold the n choices at once
MAX_TOP_LOGPROBS = {"chat": 20, "completion": 5}  # OpenAI's bounds


class ApiError(Exception):
    """An error the client caused (or the server's state, for 429/503), sent as
    ``{"error": {"message", "type", "param", "code"}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@attrs.frozen(eq=False)
class GenRequest:
    """One generation as the scheduler runs it. ``generate_kwargs``: the options for
    ``Runtime.options`` (sampling fields, seed); ``stop``: strings that end the text (cut
    before them); ``include_usage``: a streamed reply ends with a usage chunk; ``logprobs``:
    None, or how many top alternatives each token's log-probability comes with; ``n``: the
    choices (``choices()``)."""

    ctx: Context
    max_new_tokens: int | None
    generate_kwargs: Mapping[str, object]
    stop: tuple[str, ...] = ()
    salt: str | None = None
    adapter: str | None = None
    repair: str | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    n: int = 1

    def choices(self) -> list[GenRequest]:
        """One request per choice. With a ``seed``, choice ``i`` samples with ``seed + i``:
        reproducible, and the choices differ (greedy choices are all alike)."""
        if self.n == 1:
            return [self]
        seed = self.generate_kwargs.get("seed")
        return [attrs.evolve(self, n=1, generate_kwargs=self.generate_kwargs if seed is None else
                             {**self.generate_kwargs, "seed": seed + i}) for i in range(self.n)]


def chat_request(body: Mapping) -> GenRequest:
    """``/v1/chat/completions``: the messages, each its own span, then a generation prompt."""
    _check_fields(body, {"messages", "top_logprobs"})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    try:
        ctx = Context.chat([_chat_message(m, i) for i, m in enumerate(messages)])
    except (TypeError, ValueError) as exc:
        raise ApiError(400, str(exc), param="messages") from None
    top = body.get("top_logprobs")
    if body.get("logprobs") not in (None, False, True):
        raise ApiError(400, f"logprobs must be a boolean on chat completions, got {body['logprobs']!r}",
                       param="logprobs")
    if top is not None and not body.get("logprobs"):
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = _bounded(top or 0, "top_logprobs", MAX_TOP_LOGPROBS["chat"]) if body.get("logprobs") else None
    return attrs.evolve(_generation(body, ctx), logprobs=logprobs)


def completion_request(body: Mapping) -> GenRequest:
    """``/v1/completions``: one prompt (text or token ids) as one span, no chat template."""
    _check_fields(body, {"prompt"})
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "one prompt per request: send the prompts as separate (concurrent) requests; "
                       "the server batches them", param="prompt")
    try:
        ctx = Context().append(prompt) if isinstance(prompt, (str, list)) else None
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"prompt: {exc}", param="prompt") from None
    if ctx is None:
        raise ApiError(400, "'prompt' must be a string or a list of token ids", param="prompt")
    return attrs.evolve(_generation(body, ctx), logprobs=_completion_logprobs(body))


def span_request(body: Mapping) -> GenRequest:
    """``/v1/spanctx/generate``: a context as JSON nodes, with ``adapter`` and ``repair``."""
    _check_fields(body, {"context", "adapter", "repair"})
    for name in ("adapter", "repair"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise ApiError(400, f"'{name}' must be a string", param=name)
    if body.get("n") not in (None, 1):
        raise ApiError(400, "the span endpoint returns one choice; send n requests (they share the context's "
                       "spans and run batched)", param="n", code="unsupported_parameter")
    return attrs.evolve(_generation(body, context_from_json(body.get("context"))), adapter=body.get("adapter"),
                        repair=body.get("repair"), logprobs=_completion_logprobs(body))


def _completion_logprobs(body: Mapping) -> int | None:
    """Completions' ``logprobs``: how many top alternatives per token (None: none asked)."""
    logprobs = body.get("logprobs")
    return None if logprobs is None else _bounded(logprobs, "logprobs", MAX_TOP_LOGPROBS["completion"])


def _bounded(value, name: str, most: int, least: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
        raise ApiError(400, f"{name} must be an integer in [{least}, {most}], got {value!r}", param=name)
    return value


def _check_fields(body: Mapping, own: set[str]) -> None:
    if not isinstance(body, Mapping):
        raise ApiError(400, "the request body must be a JSON object")
    for name, what in _REFUSED.items():
        if body.get(name) not in (None, False, 0, {"type": "text"}):
            raise ApiError(400, f"'{name}' is not supported by this server ({what}); leave it out",
                           param=name, code="unsupported_parameter")
    unknown = sorted(set(body) - own - _SAMPLING - _IGNORED - set(_REFUSED))
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}", param=unknown[0], code="unknown_parameter")


def _generation(body: Mapping, ctx: Context) -> GenRequest:
    n = 1 if body.get("n") is None else _bounded(body["n"], "n", MAX_N, least=1)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ApiError(400, f"max_tokens must be an integer >= 1, got {limit!r}", param="max_tokens")
    kwargs: dict[str, object] = {}
    temperature, top_p, seed = body.get("temperature"), body.get("top_p"), body.get("seed")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise ApiError(400, f"temperature must be a number in [0, 2], got {temperature!r}", param="temperature")
        kwargs.update(do_sample=False) if temperature == 0 else kwargs.update(temperature=float(temperature))
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ApiError(400, f"top_p must be a number in (0, 1], got {top_p!r}", param="top_p")
        if top_p < 1 and kwargs.get("do_sample") is not False:
            kwargs["top_p"] = float(top_p)
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ApiError(400, f"seed must be an integer, got {seed!r}", param="seed")
        kwargs["seed"] = seed
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ApiError(400, "cache_salt must be a non-empty string", param="cache_salt")
    options = body.get("stream_options") or {}
    return GenRequest(ctx, limit, kwargs, _stop(body.get("stop")), salt, stream=bool(body.get("stream")),
                      include_usage=bool(isinstance(options, Mapping) and options.get("include_usage")), n=n)


def _stop(stop) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP}", param="stop")
    return tuple(stops)


def _chat_message(message, index: int) -> dict:
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
        raise ApiError(400, f"messages[{index}] must be an object with a 'role'", param=f"messages[{index}]")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
            raise ApiError(400, f"messages[{index}]: only text content parts are supported",
                           param=f"messages[{index}].content")
        content = "".join(str(p.get("text", "")) for p in content)
    return {**message, "content": content}


# -- contexts as JSON ---------------------------------------------------------------------


def context_from_json(nodes) -> Context:
    """The ``Context`` of a list of JSON nodes (see the module doc); ApiError 400 if malformed."""
    if not isinstance(nodes, list) or not nodes:
        raise ApiError(400, "'context' must be a non-empty list of nodes", param="context")
    ctx = Context()
    for i, node in enumerate(nodes):
        try:
            ctx = _append_node(ctx, node)
        except ApiError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise ApiError(400, f"context[{i}]: {exc}", param=f"context[{i}]") from None
    return ctx


def _append_node(ctx: Context, node) -> Context:
    if isinstance(node, Mapping) and "parallel" in node:
        members = node["parallel"]
        if not isinstance(members, list) or not members:
            raise ValueError("'parallel' must be a non-empty list of nodes")
        depth = node.get("anchor_depth", len(ctx))
        if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= len(ctx):
            raise ValueError(f"anchor_depth must be an int in [0, {len(ctx)}], got {depth!r}")
        return Context(ctx, ParallelGroup(tuple(_span(m) for m in members), depth))
    if isinstance(node, Mapping) and "messages" in node:
        extra = set(node) - {"messages", "system", "add_generation_prompt"}
        if extra:
            raise ValueError(f"unknown keys {sorted(extra)} in a messages node")
        return ctx.chat(node["messages"], system=node.get("system"),
                        add_generation_prompt=bool(node.get("add_generation_prompt", True)))
    return Context(ctx, _span(node))


def _span(node) -> Span:
    if isinstance(node, str):
        return Span(node)
    if not isinstance(node, Mapping) or len(node) != 1:
        raise ValueError(f"a span node is a string or an object with one of 'text', 'ids', 'message', "
                         f"'generation_prompt', 'template'; got {node!r}")
    (kind, value), = node.items()
    if kind == "text" and isinstance(value, str):
        return Span(value)
    if kind == "ids" and isinstance(value, list):
        return Span(value)
    if kind == "message" and isinstance(value, Mapping):
        fields = dict(value)
        return Span(Message.of(fields.pop("role"), fields.pop("content", None), **fields))
    if kind == "generation_prompt" and value is True:
        return Span(GenerationPrompt())
    if kind == "template" and isinstance(value, Mapping):
        rest = {k: v for k, v in value.items() if k not in ("tools", "chat_template")}
        return Span(template_args(value.get("tools"), value.get("chat_template"), rest))
    raise ValueError(f"bad span node {node!r}")


def context_to_json(ctx: Context) -> list:
    """``ctx`` as JSON nodes, exactly (see the module doc)."""
    return [({"parallel": [_span_json(m) for m in node.members], "anchor_depth": node.anchor_depth}
             if isinstance(node, ParallelGroup) else _span_json(node)) for node in ctx.spans]


def _span_json(span: Span):
    content = span.content
    if isinstance(content, str):
        return {"text": content}
    if isinstance(content, tuple):
        return {"ids": list(content)}
    if isinstance(content, Message):
        return {"message": content.as_dict()}
    if isinstance(content, GenerationPrompt):
        return {"generation_prompt": True}
    if isinstance(content, TemplateArgs):
        return {"template": content.as_kwargs()}
    raise TypeError(f"cannot write span content {type(content).__name__} as JSON")

