"""Tiny PEFT adapters made in the tests, and PEFT's own full-prefill references.

Adapters are built on a COPY of the shared tiny model (PEFT injects layers in place), and
every runtime that loads adapters gets its own copy too, so the session models in
conftest stay untouched for other tests.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from conftest import tiny_model
from peft import LoraConfig, PeftModel, get_peft_model

import spanctx

INVOCATION = "<|im_start|>check"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def invocation_ids(tokenizer) -> list[int]:
    return tokenizer(INVOCATION, add_special_tokens=False)["input_ids"]


def make_adapter(model, folder: Path, *, invocation: list[int] | None = None, seed: int = 0,
                 target_modules=ATTENTION, **lora_kwargs) -> Path:
    """Save a random LoRA (an aLoRA with ``invocation``) for ``model`` in ``folder``.

    lora_B is drawn non-zero (PEFT initialises it to zero), so the adapter changes outputs.
    """
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(target_modules),
                        task_type="CAUSAL_LM", alora_invocation_tokens=invocation, **lora_kwargs)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    gen = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.3
    peft_model.save_pretrained(folder)
    return folder


def adapter_pair(arch: str, tmp_path_factory, name: str, seeds: tuple[int, int]) -> tuple[str, Path, Path]:
    """(arch, aLoRA folder, LoRA folder): random adapters of ``arch``'s tiny model."""
    model, tokenizer = tiny_model(arch)
    root = tmp_path_factory.mktemp(f"{name}-{arch}")
    alora = make_adapter(model, root / "alora", invocation=invocation_ids(tokenizer), seed=seeds[0])
    lora = make_adapter(model, root / "lora", seed=seeds[1])
    return arch, alora, lora


def fresh_runtime(arch: str, **kwargs) -> spanctx.Runtime:
    """A runtime over its own copy of the tiny model of ``arch`` (adapters mutate it)."""
    model, tokenizer = tiny_model(arch)
    return spanctx.Runtime(copy.deepcopy(model), tokenizer, store_bytes=64 << 20, **kwargs)


def peft_reference(arch: str, folder: Path) -> PeftModel:
    """PEFT's own model: a fresh copy of the base with the adapter loaded."""
    model, _ = tiny_model(arch)
    return PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()


def reference_tokens(model, ids: list[int], max_new_tokens: int) -> tuple[int, ...]:
    """Greedy tokens of ``model.generate`` on a full prefill of ``ids``."""
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=258)
    return tuple(out[0, len(ids):].tolist())


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits of a full prefill of ``ids`` (PEFT finds the aLoRA invocation itself)."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()
