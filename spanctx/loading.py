"""Loading a model and its tokenizer: presets, local folders and hub ids.

Options (all keyword-only, all optional):
- ``device``: where the whole model goes. Default: cuda, then mps, then cpu.
- ``dtype``: a ``torch.dtype`` or its name (``"bfloat16"``, ``"float16"``,
  ``"float32"``), or ``"auto"``: the checkpoint's own dtype (the default for folders and
  hub ids; presets default to their own dtype).
- ``device_map``: passed to transformers (``"auto"``, ``"cuda:0"``, a dict): accelerate
  places the layers, possibly over several GPUs and the CPU. Excludes ``device``.
- ``quantization``: ``"8bit"`` or ``"4bit"`` (NF4, compute in ``dtype`` or bfloat16),
  through bitsandbytes; it must be installed (``pip install 'spanctx[quant]'``).
- ``max_gpu_memory``: a per-GPU limit (``"20GiB"`` or bytes) for accelerate's
  placement; implies ``device_map="auto"``; needs CUDA.

``load_options`` turns these into transformers ``from_pretrained`` kwargs without
touching a model (pure, so tested on CPU); ``load_model`` probes the machine and loads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator
from typing import Literal

import attrs
import torch
from safetensors import SafetensorError

Quantization = Literal["8bit", "4bit"]

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@attrs.frozen
class Environment:
    """What ``load_options`` needs to know about the machine."""

    cuda_devices: int
    has_accelerate: bool
    has_bitsandbytes: bool

    @classmethod
    def probe(cls) -> Environment:
        return cls(
            cuda_devices=torch.cuda.device_count() if torch.cuda.is_available() else 0,
            has_accelerate=importlib.util.find_spec("accelerate") is not None,
            has_bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
        )


@attrs.frozen
class LoadOptions:
    """Resolved loading: kwargs for ``from_pretrained``, then move to ``move_to`` (or
    leave the placement to ``device_map`` when ``move_to`` is None)."""

    kwargs: dict
    move_to: str | None


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """``dtype`` as a ``torch.dtype``, ``"auto"`` or None; a clear error for other names."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be a torch.dtype, 'auto' or one of {sorted(DTYPE_NAMES)}, got {dtype!r}")


def load_options(env: Environment, *, device: str | None = None, dtype: torch.dtype | str | None = None,
                 device_map: str | dict | None = None, quantization: Quantization | None = None,
                 max_gpu_memory: str | int | None = None) -> LoadOptions:
    """The ``from_pretrained`` kwargs for these options on ``env`` (see the module doc)."""
    dtype = resolve_dtype(dtype)
    if device is not None and device_map is not None:
        raise ValueError("pass device (one device for the whole model) or device_map, not both")
    kwargs: dict = {"dtype": dtype or "auto"}
    if max_gpu_memory is not None:
        if env.cuda_devices == 0:
            raise ValueError("max_gpu_memory needs CUDA, and no CUDA device is visible")
        kwargs["max_memory"] = {i: max_gpu_memory for i in range(env.cuda_devices)}
        device_map = device_map or "auto"
    if quantization is not None:
        if quantization not in ("8bit", "4bit"):
            raise ValueError(f"quantization must be '8bit' or '4bit', got {quantization!r}")
        if not env.has_bitsandbytes:
            raise ImportError(f"{quantization} loading needs bitsandbytes: pip install 'spanctx[quant]'")
        kwargs["quantization_config"] = quantization_config(quantization, dtype)
        # a quantized model cannot be moved with .to(): place it while loading
        device_map = device_map or {"": device or default_device()}
    if device_map is not None:
        if not env.has_accelerate:
            raise ImportError("device_map, max_gpu_memory and quantization need accelerate: "
                              "pip install 'spanctx[devices]'")
        kwargs["device_map"] = device_map
        return LoadOptions(kwargs, None)
    return LoadOptions(kwargs, device or default_device())


def quantization_config(quantization: Quantization, dtype: torch.dtype | str | None):
    """transformers' ``BitsAndBytesConfig`` for 8-bit, or 4-bit NF4 computing in ``dtype``
    (bfloat16 when no explicit dtype is given)."""
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)


def load_model(name_or_path: str, *, model_class=None, device: str | None = None,
               dtype: torch.dtype | str | None = None, device_map: str | dict | None = None,
               quantization: Quantization | None = None, max_gpu_memory: str | int | None = None,
               **model_kwargs):
    """``(model, tokenizer)`` for a preset, a local folder or a hub id, in eval mode.

    ``model_class`` defaults to ``AutoModelForCausalLM`` (``AutoModelForSequenceClassification``
    for reward models). Presets are random-weight models built on one device: they take
    ``device`` and ``dtype`` only. Other ``model_kwargs`` go to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .presets import PRESETS, load_preset

    model_class = model_class or AutoModelForCausalLM
    if name_or_path in PRESETS:
        if device_map is not None or quantization is not None or max_gpu_memory is not None:
            raise ValueError("presets are random-weight models built on one device: "
                             "device_map, quantization and max_gpu_memory apply to pretrained models")
        dtype = resolve_dtype(dtype)
        with _progress_bars(False):  # a preset loads in a blink
            return load_preset(name_or_path, device=device or default_device(),
                               dtype=None if dtype == "auto" else dtype, model_class=model_class, **model_kwargs)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"a model is a preset name, a local folder or a hub id (str), got {name_or_path!r}")
    name_or_path = _local_folder_or_hub_id(os.fspath(name_or_path), PRESETS)
    options = load_options(Environment.probe(), device=device, dtype=dtype, device_map=device_map,
                           quantization=quantization, max_gpu_memory=max_gpu_memory)
    clash = sorted(options.kwargs.keys() & model_kwargs.keys())
    if clash:
        raise ValueError(f"{clash} are set by spanctx's loading options; pass them through those instead")
    try:
        with _progress_bars(sys.stderr.isatty()):
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            if model_class is AutoModelForCausalLM and _takes_images(name_or_path):
                from transformers import AutoModelForImageTextToText, AutoProcessor

                # a vision-language model: its processor stands for the tokenizer (spanctx.engine.vision)
                model_class, tokenizer = AutoModelForImageTextToText, AutoProcessor.from_pretrained(name_or_path)
            model = model_class.from_pretrained(name_or_path, **options.kwargs, **model_kwargs)
    except SafetensorError as exc:
        raise OSError(f"cannot read the weights in {name_or_path!r} ({exc}): a weights file there is "
                      "truncated or damaged; download or copy it again") from exc
    if options.move_to is not None:
        model.to(options.move_to)
    return model.eval(), tokenizer


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _local_folder_or_hub_id(name: str, presets) -> str:
    """``name`` as an existing local folder (``~`` expanded) or a hub id ``org/name``; an
    error that says which was meant otherwise (never the hub's "Repo id must be..." for a
    mistyped local path)."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{name!r} is a file; pass the model's folder (the one holding config.json)")
    if "/" not in name:
        raise ValueError(f"unknown preset {name!r} (and no such folder); presets: "
                         f"{', '.join(presets)}; or pass a local model folder or a hub id 'org/name'")
    if not HUB_ID.fullmatch(name) or os.path.isdir(name.split("/", 1)[0]):
        raise FileNotFoundError(f"no model folder at {os.path.abspath(path)!r} (a hub id is 'org/name'); "
                                "check the path, or download the model there first")
    return name


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' loading bars on (a terminal) or off (a pipe, a log) for the block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _takes_images(name_or_path: str) -> bool:
    """Whether the folder's (or hub id's) config is a vision-language model's."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(name_or_path), "vision_config", None) is not None


def default_device() -> str:
    """cuda, then mps, then cpu: the first that is available."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
