"""Loading options: the pure resolution on imagined machines, and real loads on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaForCausalLM

import spanctx
from spanctx import loading
from spanctx.loading import Environment, load_options

CPU_ONLY = Environment(cuda_devices=0, has_accelerate=True, has_bitsandbytes=False)
TWO_GPUS = Environment(cuda_devices=2, has_accelerate=True, has_bitsandbytes=True)


def test_defaults_move_the_whole_model_to_the_default_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert load_options(CPU_ONLY) == loading.LoadOptions({"dtype": "auto"}, "cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert load_options(CPU_ONLY).move_to == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_options(CPU_ONLY).move_to == "cuda"
    assert load_options(CPU_ONLY, device="cpu").move_to == "cpu"


@pytest.mark.parametrize(("given", "expected"), [
    ("bfloat16", torch.bfloat16), ("torch.float16", torch.float16), (torch.float32, torch.float32),
    ("auto", "auto"), (None, None),
])
def test_dtype_names(given, expected):
    assert loading.resolve_dtype(given) == expected


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="one of \\['bfloat16', 'float16', 'float32'\\]"):
        load_options(CPU_ONLY, dtype="fp8")
    with pytest.raises(ValueError, match="device .* or device_map, not both"):
        load_options(CPU_ONLY, device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="max_gpu_memory needs CUDA"):
        load_options(CPU_ONLY, max_gpu_memory="10GiB")
    with pytest.raises(ImportError, match="needs bitsandbytes: pip install 'spanctx\\[quant\\]'"):
        load_options(CPU_ONLY, quantization="4bit")
    with pytest.raises(ValueError, match="'8bit' or '4bit'"):
        load_options(TWO_GPUS, quantization="3bit")
    no_accelerate = Environment(cuda_devices=1, has_accelerate=False, has_bitsandbytes=False)
    with pytest.raises(ImportError, match="need accelerate"):
        load_options(no_accelerate, device_map="auto")


def test_gpu_placement_options():
    capped = load_options(TWO_GPUS, max_gpu_memory="20GiB", dtype="bfloat16")
    assert capped == loading.LoadOptions(
        {"dtype": torch.bfloat16, "max_memory": {0: "20GiB", 1: "20GiB"}, "device_map": "auto"}, None)
    mapped = load_options(TWO_GPUS, device_map={"": "cuda:1"})
    assert mapped.kwargs["device_map"] == {"": "cuda:1"} and mapped.move_to is None


def test_quantization_configs():
    eight = load_options(TWO_GPUS, quantization="8bit", device="cuda:1")
    assert eight.kwargs["quantization_config"].load_in_8bit
    assert eight.kwargs["device_map"] == {"": "cuda:1"} and eight.move_to is None
    four = load_options(TWO_GPUS, quantization="4bit", dtype="float16").kwargs["quantization_config"]
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_compute_dtype == torch.float16
    assert load_options(TWO_GPUS, quantization="4bit").kwargs["quantization_config"].bnb_4bit_compute_dtype \
        == torch.bfloat16


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny random Llama and the byte tokenizer saved as a local model folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = spanctx.load_preset("tiny-llama", num_hidden_layers=2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_runtime_from_a_local_folder_with_dtype_and_device(saved_model):
    rt = spanctx.Runtime.from_pretrained(str(saved_model), device="cpu", dtype="bfloat16", store_bytes=1 << 20)
    assert isinstance(rt.model, LlamaForCausalLM) and rt.model.dtype == torch.bfloat16
    assert rt.device.type == "cpu" and not rt.model.training
    ctx = spanctx.Context().append("hello")
    assert rt.generate(ctx, max_new_tokens=2).token_ids == rt.generate(ctx, max_new_tokens=2, reuse=False).token_ids
    default = spanctx.Runtime.from_pretrained(str(saved_model), device="cpu", store_bytes=1 << 20)
    assert default.model.dtype == torch.float32  # "auto": the checkpoint's dtype


def test_device_map_on_cpu(saved_model):
    pytest.importorskip("accelerate")
    model, _ = spanctx.load_model(str(saved_model), device_map="cpu", dtype=torch.float32)
    # on a CPU-only machine this checks the device_map path runs (placement is trivial)
    assert {p.device.type for p in model.parameters()} == {"cpu"} and not model.training


def test_load_model_with_another_model_class(saved_model):
    model, _ = spanctx.load_model(str(saved_model), model_class=AutoModelForSequenceClassification, num_labels=1,
                                  device="cpu")
    assert type(model).__name__ == "LlamaForSequenceClassification"


def test_model_kwargs_cannot_override_resolved_options(saved_model, monkeypatch):
    monkeypatch.setattr(Environment, "probe", classmethod(lambda cls: TWO_GPUS))
    with pytest.raises(ValueError, match="\\['quantization_config'\\] are set by spanctx's loading options"):
        spanctx.load_model(str(saved_model), quantization="8bit", quantization_config=object())


def test_presets_refuse_placement_options():
    with pytest.raises(ValueError, match="presets are random-weight models"):
        spanctx.Runtime.from_pretrained("tiny-llama", device_map="auto")
    rt = spanctx.Runtime.from_pretrained("tiny-llama", device="cpu", dtype="bfloat16", store_bytes=1 << 20)
    assert rt.model.dtype == torch.bfloat16
