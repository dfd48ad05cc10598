"""JSON output under llguidance's grammar mask: a random model's output always parses."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
import torch
from conftest import tiny_runtime
from hypothesis import given, settings
from strategies import bounded_json_schemas

import spanctx
from spanctx.features.structured import JsonFormat, StructuredOutputError

pydantic = pytest.importorskip("pydantic")
pytest.importorskip("llguidance")

PROMPT = spanctx.Context().extend(["Reply in JSON. ", "Here it is: "])


class Pet(pydantic.BaseModel):
    # extra="forbid" gives "additionalProperties": false: without it any extra key is
    # valid, and a sampling random model may add keys until max_new_tokens
    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = pydantic.Field(max_length=6)
    kind: Literal["cat", "dog", "fish"]
    age: int = pydantic.Field(ge=0, le=30)
    tags: list[Literal["a", "b"]] = pydantic.Field(max_length=2)


@settings(max_examples=8, deadline=None)
@given(schema=bounded_json_schemas)
def test_random_model_output_always_parses_and_validates(schema):
    rt = tiny_runtime("llama")
    result = rt.generate_json(PROMPT, schema, max_new_tokens=200)
    jsonschema.validate(result.value, schema)  # checked independently of spanctx
    assert json.loads(result.text) == result.value
    assert len(result.token_ids) < 200  # it ended by EOS, not by the token limit
    assert result.token_ids[-1] == rt.tokenizer.eos_token_id


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pydantic_format_with_sampling(arch):
    rt = tiny_runtime(arch)
    for seed in range(2):
        torch.manual_seed(seed)
        result = rt.generate_json(PROMPT, Pet, max_new_tokens=120, do_sample=True, temperature=1.5)
        assert isinstance(result.value, Pet)
        assert Pet.model_validate_json(result.text) == result.value
    assert result.stats.cached_tokens > 0  # the prompt's spans were reused


def test_output_cut_by_max_new_tokens_is_a_clear_error():
    rt = tiny_runtime("llama")
    with pytest.raises(StructuredOutputError, match="before the JSON value was complete") as info:
        rt.generate_json(PROMPT, Pet, max_new_tokens=4)
    assert info.value.text.startswith("{")


def test_format_errors():
    rt = tiny_runtime("llama")
    with pytest.raises(ValueError, match="invalid JSON schema"):
        rt.generate_json(PROMPT, {"type": "no-such-type"})
    with pytest.raises(TypeError, match="pydantic model class or a JSON schema"):
        rt.generate_json(PROMPT, "an object please")
    with pytest.raises(ValueError, match="num_beams must be 1"):
        rt.generate_json(PROMPT, Pet, num_beams=2)


def test_parse_rejects_what_the_schema_rejects():
    fmt = JsonFormat.of({"type": "object", "properties": {"n": {"type": "integer"}},
                                            "required": ["n"]})
    assert fmt.parse('{"n": 3}') == {"n": 3}
    with pytest.raises(StructuredOutputError, match="not JSON"):
        fmt.parse('{"n": ')
    with pytest.raises(StructuredOutputError, match="'n' is a required property"):
        fmt.parse("{}")
    with pytest.raises(StructuredOutputError, match="does not validate"):
        JsonFormat.of(Pet).parse('{"name": "x", "kind": "cow", "age": 1, "tags": []}')
