"""Mellea without a model hub: tiny random models, stand-in intrinsics, local adapters.

Mellea's Hugging Face backend loads Granite models and its intrinsics' io.yaml files and
adapters from the hub. Nothing can be downloaded here, so ``offline_hub`` answers those
loads locally:

- ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` of an ``ibm-granite/...``
  id build a random-weight model (``model_factory``) with a byte tokenizer that has
  Granite's special tokens and a Granite-style chat template (``GRANITE_STYLE_TEMPLATE``:
  our own, written after Granite's layout, not Granite's template);
- the intrinsics ``requirement-check`` and ``answerability`` get the stand-in io.yaml
  files of this folder and random aLoRA adapters made with PEFT for the served model.

Used by the acceptance plugin (``acceptance_plugin.py``) and the benchmark
(``bench.py``). Nothing here is Mellea's code.
"""

from __future__ import annotations

import contextlib
import functools
import pathlib
from collections.abc import Callable, Iterator
from unittest import mock

import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer, GraniteConfig

from spanctx import byte_tokenizer
from spanctx.bench.random_adapters import make_adapter

__all__ = ["GRANITE_STYLE_TEMPLATE", "INTRINSICS", "Intrinsic", "granite_style_tokenizer", "offline_hub",
           "tiny_granite"]

HERE = pathlib.Path(__file__).parent
GRANITE_SPECIALS = ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>")

# Granite's message layout; prefix-stable (no message is rendered differently once later
# messages exist). With tools and no system message, the system prompt names the tools.
GRANITE_STYLE_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}{%- set rest = messages -%}"
    "{%- if tools -%}{%- set system = 'You are a helpful assistant with access to the following tools. "
    "When a tool is required to answer the user\\'s query, respond with <|tool_call|> followed by a JSON "
    "list of tools used.' -%}"
    "{%- else -%}{%- set system = 'You are a helpful AI assistant.' -%}{%- endif -%}{%- endif -%}"
    "<|start_of_role|>system<|end_of_role|>{{ system }}<|end_of_text|>\n"
    "{%- if tools %}<|start_of_role|>available_tools<|end_of_role|>{{ tools | tojson }}<|end_of_text|>\n"
    "{%- endif %}"
    "{%- for doc in documents or [] %}<|start_of_role|>document {{ doc['doc_id'] | default(loop.index) }}"
    "<|end_of_role|>{{ doc['text'] }}<|end_of_text|>\n{%- endfor %}"
    "{%- for m in rest %}<|start_of_role|>{{ m['role'] }}<|end_of_role|>{{ m['content'] or '' }}"
    "{%- if m['tool_calls'] %}<|tool_call|>{{ m['tool_calls'] | tojson }}{%- endif %}<|end_of_text|>\n"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{%- endif %}"
)


def granite_style_tokenizer():
    """spanctx's byte tokenizer with Granite's special tokens, EOS ``<|end_of_text|>``,
    no BOS on plain encodes, and ``GRANITE_STYLE_TEMPLATE``."""
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(GRANITE_SPECIALS)})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    tokenizer.eos_token = "<|end_of_text|>"
    tokenizer.padding_side = "left"
    tokenizer.chat_template = GRANITE_STYLE_TEMPLATE
    return tokenizer


def tiny_granite(seed: int = 0, *, hidden_size: int = 64, layers: int = 2, dtype=torch.float32):
    """``(model, tokenizer)``: a random Granite-architecture model whose vocabulary is
    exactly the tokenizer's (Mellea's llguidance set-up asserts they agree)."""
    tokenizer = granite_style_tokenizer()
    config = GraniteConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                           max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


class Intrinsic:
    """A stand-in intrinsic: its io.yaml in this folder and its aLoRA invocation text."""

    def __init__(self, name: str, invocation: str) -> None:
        self.name = name
        self.invocation = invocation

    @property
    def io_yaml(self) -> pathlib.Path:
        return HERE / "intrinsics" / f"{self.name}.yaml"


# requirement-check: the invocation opens the instruction Mellea appends as the last user
# message, so it sits INSIDE the prompt; answerability: the generation prompt at its end.
INTRINSICS = {i.name: i for i in (Intrinsic("requirement-check", "<requirements>:"),
                                  Intrinsic("answerability", "<|start_of_role|>assistant<|end_of_role|>"))}


def make_intrinsic_adapters(model, tokenizer, root: pathlib.Path, *, rank: int = 4) -> dict[str, pathlib.Path]:
    """One random aLoRA folder per stand-in intrinsic, for ``model``; name -> folder."""
    out = {}
    for seed, intrinsic in enumerate(INTRINSICS.values(), start=1):
        invocation = tokenizer(intrinsic.invocation, add_special_tokens=False)["input_ids"]
        out[intrinsic.name] = make_adapter(model, root / intrinsic.name, rank=rank, invocation_ids=invocation,
                                           seed=seed)
    return out


@contextlib.contextmanager
def offline_hub(model_factory: Callable[[], tuple], adapter_root: pathlib.Path) -> Iterator[None]:
    """Serve ``ibm-granite/...`` loads with ``model_factory()`` (a fresh model per load, the
    tokenizer of the first) and the stand-in intrinsics, until the block exits."""
    from mellea.formatters.granite import intrinsics
    from mellea.formatters.granite.intrinsics import util as intrinsics_util

    first = functools.cache(model_factory)
    adapters = functools.cache(lambda: make_intrinsic_adapters(*model_factory(), adapter_root))
    real_model, real_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def model_from_pretrained(name, *args, **kwargs):
        if not str(name).startswith("ibm-granite/"):
            return real_model(name, *args, **kwargs)
        return model_factory()[0]

    def tokenizer_from_pretrained(name, *args, **kwargs):
        if not str(name).startswith("ibm-granite/"):
            return real_tokenizer(name, *args, **kwargs)
        return first()[1]

    def obtain_lora(intrinsic_name, *args, file_glob: str = "*", **kwargs):
        if intrinsic_name not in INTRINSICS:
            raise ValueError(f"offline: no stand-in adapter for intrinsic {intrinsic_name!r}")
        return adapters()[intrinsic_name]

    def obtain_io_yaml(intrinsic_name, *args, **kwargs):
        if intrinsic_name not in INTRINSICS:
            raise ValueError(f"offline: no stand-in io.yaml for intrinsic {intrinsic_name!r}")
        return INTRINSICS[intrinsic_name].io_yaml

    patches = [(AutoModelForCausalLM, "from_pretrained", model_from_pretrained),
               (AutoTokenizer, "from_pretrained", tokenizer_from_pretrained),
               (intrinsics, "obtain_lora", obtain_lora), (intrinsics, "obtain_io_yaml", obtain_io_yaml),
               (intrinsics_util, "obtain_lora", obtain_lora), (intrinsics_util, "obtain_io_yaml", obtain_io_yaml)]
    with contextlib.ExitStack() as stack:
        for owner, name, value in patches:
            stack.enter_context(mock.patch.object(owner, name, value))
        yield
