"""Reading and checking PEFT adapter folders before anything is loaded: the config
(kinds spanctx can switch), the weight file's shapes against the base model."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

__all__ = ["ADAPTER_CONFIG", "WEIGHT_FILES", "AdapterError", "adapter_weight_shapes", "check_base_model",
           "read_adapter_config"]

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# a saved LoRA weight: "base_model.model.<module path>.lora_A.weight", lora_embedding_B, ...
_LORA_WEIGHT = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?:embedding_)?(?P<part>[AB])(?:\.weight)?$")


class AdapterError(ValueError):
    """A bad adapter folder, an unknown adapter name, or an adapter that does not fit."""


def read_adapter_config(folder: Path) -> dict:
    """The adapter's ``adapter_config.json``, after checking that spanctx can run it."""
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {str(folder)!r} does not exist")
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise FileNotFoundError(f"{str(folder)!r} has no adapter weights ({' or '.join(WEIGHT_FILES)})")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{str(folder)!r} is a {config.get('peft_type')} adapter; spanctx runs LoRA and aLoRA")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{str(folder)!r} trains the base model's biases (bias={config['bias']!r}): "
                           "switching it off would not restore the base model")
    for field in ("modules_to_save", "trainable_token_indices"):
        if config.get(field):
            raise AdapterError(f"{str(folder)!r} has {field}={config[field]!r}: spanctx switches LoRA layers "
                               "only (and for an aLoRA, whole replaced modules would change every token)")
    return config


def adapter_weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor in the adapter's weight file, read without loading it all."""
    safetensors_file = folder / WEIGHT_FILES[0]
    if safetensors_file.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors_file), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    state = torch.load(folder / WEIGHT_FILES[1], map_location="cpu", weights_only=True, mmap=True)
    return {key: tuple(t.shape) for key, t in state.items()}


def check_base_model(model: torch.nn.Module, folder: Path, config: dict) -> None:
    """Refuse an adapter whose LoRA weights do not fit ``model`` (a target module that
    is missing, or has other in/out features); warn when it names another base model."""
    trained_on = config.get("base_model_name_or_path") or ""
    made_for = f" (made for {trained_on!r})" if trained_on else ""
    for key, shape in adapter_weight_shapes(folder).items():
        match = _LORA_WEIGHT.match(key)
        if match is None:
            continue
        path, part = match["path"], match["part"]
        module = _base_module(model, path)
        if module is None:
            raise AdapterError(f"{str(folder)!r} adapts {path}, which this {type(model).__name__} does not "
                               f"have: the adapter is for another base model{made_for}")
        features = _in_out_features(module)
        if features is None:
            continue
        # lora_A: [r, in], lora_B: [out, r]
        want, got = (features[0], shape[1]) if part == "A" else (features[1], shape[0])
        if want != got:
            side = "input" if part == "A" else "output"
            raise AdapterError(f"{str(folder)!r} adapts {path} with {side} size {got}, but this model's has "
                               f"{want}: the adapter is for another base model{made_for}")
    ours = getattr(model.config, "name_or_path", "") or ""
    if trained_on and ours and _model_id(trained_on) != _model_id(ours):
        warnings.warn(f"adapter {str(folder)!r} was trained on {trained_on!r} but the model is {ours!r}; "
                      "its shapes fit, so it is loaded", UserWarning, stacklevel=4)


def _base_module(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    while hasattr(module, "base_layer"):  # already wrapped by PEFT for another adapter
        module = module.base_layer
    return module


def _in_out_features(module: torch.nn.Module) -> tuple[int, int] | None:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, Conv1D):  # weight: [in, out]
        return module.weight.shape[0], module.weight.shape[1]
    return None  # other layer kinds: PEFT checks them when it loads the weights


def _model_id(name_or_path: str) -> str:
    """``org/Model-8B`` and ``/models/model-8b/`` name the same model."""
    return Path(name_or_path.rstrip("/")).name.lower()
