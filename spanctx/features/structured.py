"""JSON output enforced while decoding, then parsed and validated.

``generate_json(rt, ctx, format)`` generates after ``ctx`` (with the usual span reuse of
the prompt) under a token mask that only lets the output spell a JSON value of the
schema, then EOS. The mask comes from llguidance (the ``json`` extra): it compiles the
JSON schema to a grammar and computes, per step, which tokens can continue it (a bitmask
over the vocabulary, ~tens of microseconds for a small vocabulary). Output is compact
JSON (no free whitespace), so a schema with a finite set of values (bounded strings,
enums, bounded integers, no open-ended arrays) has a bounded length.

``format`` is a pydantic model class (the result is an instance of it) or a JSON schema
``dict`` (the result is the parsed JSON, checked with ``jsonschema``). The prompt is not
changed: describe the format to the model in the prompt yourself; the mask only forbids.
"""

from __future__ import annotations

import json
import weakref
from typing import TYPE_CHECKING, Any

import attrs
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..session.results import GenerationStats
from . import validation

if TYPE_CHECKING:
    from ..core.spans import Context
    from ..runtime import Runtime

#: llguidance JSON options: compact output; a schema's own "x-guidance" overrides them.
JSON_DEFAULTS = {"whitespace_flexible": False}


class StructuredOutputError(ValueError):
    """The output is not a complete, valid value of the format. ``text`` is the output."""

    def __init__(self, message: str, text: str) -> None:
        super().__init__(message)
        self.text = text


@attrs.frozen
class JsonResult:
    """A JSON generation: the parsed, validated value, the text and the call's stats."""

    value: Any
    text: str
    token_ids: tuple[int, ...]
    stats: GenerationStats


@attrs.frozen(eq=False)
class JsonFormat:
    """What the output must be: a JSON schema, and the pydantic model it came from, if any."""

    schema: dict
    model: type | None = None

    @classmethod
    def of(cls, format: Any) -> JsonFormat:
        if isinstance(format, JsonFormat):
            return format
        if isinstance(format, dict):
            validation.validator(format)  # a clear error for an invalid schema, before decoding
            return cls(format)
        if isinstance(format, type) and hasattr(format, "model_json_schema"):
            return cls(format.model_json_schema(), format)
        raise TypeError(f"format must be a pydantic model class or a JSON schema dict, got {format!r}")

    def parse(self, text: str) -> Any:
        """The value of ``text``: a model instance, or JSON data valid for the schema."""
        if self.model is not None:
            from pydantic import ValidationError

            try:
                return self.model.model_validate_json(text)
            except ValidationError as exc:
                raise StructuredOutputError(f"the output does not validate: {exc}", text) from None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StructuredOutputError(f"the output is not JSON ({exc.msg} at char {exc.pos})", text) from None
        problems = validation.errors(validation.validator(self.schema), value)
        if problems:
            raise StructuredOutputError("the output does not match the schema: " + "; ".join(problems), text)
        return value


def generate_json(rt: Runtime, ctx: Context, format: Any, *, max_new_tokens: int = 256,
                  **generate_kwargs) -> JsonResult:
    """Generate a value of ``format`` after ``ctx`` (see the module doc).

    Greedy unless sampling kwargs are given (the mask applies before temperature and
    top-k/p). One sequence only: no beams, no ``num_return_sequences``. Raises
    ``StructuredOutputError`` when ``max_new_tokens`` ends the output before the value is
    complete, and ``ValueError`` when llguidance cannot compile the schema.
    """
    for key in ("num_beams", "num_return_sequences"):
        if generate_kwargs.get(key, 1) != 1:
            raise ValueError(f"generate_json makes one sequence: {key} must be 1")
    fmt = JsonFormat.of(format)
    mask = GrammarMask(json_matcher(rt, fmt.schema), eos_ids(rt))
    processors = LogitsProcessorList([*generate_kwargs.pop("logits_processor", []), mask])
    result = rt.generate(ctx, max_new_tokens, logits_processor=processors, **generate_kwargs)
    mask.advance(result.token_ids)  # the last token is sampled after the mask's last call
    if not (mask.matcher.is_accepting() or mask.matcher.is_stopped()):
        raise StructuredOutputError(f"the output ended after {len(result.token_ids)} tokens before the JSON value "
                                    "was complete: raise max_new_tokens or bound the schema", result.text)
    return JsonResult(fmt.parse(result.text), result.text, result.token_ids, result.stats)


def json_matcher(rt: Runtime, schema: dict):
    """A fresh llguidance matcher for ``schema`` over ``rt``'s tokenizer and vocabulary."""
    llguidance = _llguidance()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
    ll_tokenizer = _ll_tokenizer(rt.tokenizer, rt.model.config.get_text_config().vocab_size, eos_ids(rt))
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise ValueError(f"llguidance cannot compile this schema: {matcher.get_error()}")
    return matcher


class GrammarMask(LogitsProcessor):
    """Sets every token the matcher forbids to -inf; feeds the matcher each new token.

    One sequence (batch of one). The first call sees the prompt only; later calls see the
    prompt plus the tokens generated so far, which the matcher consumes up to the first
    of ``eos_ids`` (EOS ends the sequence; a finished grammar refuses to consume it).
    """

    def __init__(self, matcher, eos_ids: frozenset[int]) -> None:
        self.matcher = matcher
        self.eos_ids = eos_ids
        self.prompt_len: int | None = None
        self.consumed = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # input_ids: [1, S]; scores: [1, V]
        if input_ids.shape[0] != 1:
            raise ValueError(f"GrammarMask constrains one sequence; got a batch of {input_ids.shape[0]}")
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        self.advance(input_ids[0, self.prompt_len:].tolist())
        allowed = _unpack_bitmask(self.matcher.compute_bitmask(), scores.shape[-1]).to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))

    def advance(self, generated: list[int] | tuple[int, ...]) -> None:
        """Feed the matcher the tokens of ``generated`` (all new tokens so far) it has not seen."""
        new = list(generated[self.consumed:])
        ends = [i for i, t in enumerate(new) if t in self.eos_ids]
        new = new[: ends[0]] if ends else new
        if not self.matcher.consume_tokens(new) or self.matcher.is_error():
            raise RuntimeError(f"the grammar refused generated tokens {new}: {self.matcher.get_error()}")
        self.consumed += len(new)


def _unpack_bitmask(bitmask: bytes, vocab_size: int) -> torch.Tensor:
    """llguidance's mask (little-endian 32-bit words, bit i of word w = token 32w + i)
    as ``[vocab_size]`` bools; tokens past the mask are forbidden."""
    packed = torch.frombuffer(bytearray(bitmask), dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1  # [bytes, 8], LSB first
    allowed = bits.flatten().bool()
    if allowed.numel() < vocab_size:
        allowed = torch.cat([allowed, allowed.new_zeros(vocab_size - allowed.numel())])
    return allowed[:vocab_size]


def eos_ids(rt: Runtime) -> frozenset[int]:
    """The ids that end generation: the generation config's EOS ids and the tokenizer's.
    The mask allows all of them once the value is complete."""
    config_eos = getattr(rt.model.generation_config, "eos_token_id", None)
    ids = config_eos if isinstance(config_eos, list) else [config_eos]
    return frozenset(i for i in [*ids, rt.tokenizer.eos_token_id] if i is not None)


_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ll_tokenizer(tokenizer, vocab_size: int, eos: frozenset[int]):
    """llguidance's view of ``tokenizer`` (built once per tokenizer, vocabulary size and
    EOS ids: it takes about a second for a real vocabulary)."""
    built = _LL_TOKENIZERS.setdefault(tokenizer, {})
    key = (vocab_size, tuple(sorted(eos)))
    if key not in built:
        import llguidance.hf

        built[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(key[1]))
    return built[key]


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ImportError("JSON-constrained decoding needs llguidance: pip install 'spanctx[json]'") from None
    return llguidance
