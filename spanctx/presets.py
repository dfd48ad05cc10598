"""Built-in models with the offline byte tokenizer: random weights in a given shape, and
one small trained model.

Tiny presets run in seconds on a CPU (the demo's default and the tests' models). The
real-shape presets have the exact shapes of public models, for benchmarks: timing does
not depend on the weights' values. Their weights are RANDOM: their text is noise.
``tiny-trained`` is the exception: a 6M-parameter Llama trained on English prose and
synthetic retrieval (``benchmarks/train_tiny.py``); its weights ship in the package
(``spanctx/weights/tiny-trained``: bfloat16 safetensors, loaded as float32 by default,
with its training log). To use a real model, pass a local folder or a hub id to
``Runtime.from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import attrs
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    BartConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    T5Config,
)

from .tokenizer import TURN_END, byte_tokenizer

WEIGHTS_DIR = Path(__file__).parent / "weights"
TINY_VOCAB = len(byte_tokenizer())
_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=8192,
             bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)


@attrs.frozen
class Preset:
    """A named model: its config and the dtype it is meant to run in. ``weights`` names a
    folder of ``WEIGHTS_DIR`` holding trained weights; None: random weights."""

    name: str
    make_config: Callable[[], PretrainedConfig]
    dtype: torch.dtype
    description: str
    weights: str | None = None

    @property
    def weights_dir(self) -> Path | None:
        return None if self.weights is None else WEIGHTS_DIR / self.weights


def _tiny(config_cls, **extra) -> Callable[[], PretrainedConfig]:
    return lambda: config_cls(**{**_TINY, **extra})


def _tiny_llava_config(base):
    from .vision_presets import tiny_llava_config  # on first use: processors are slow to import

    return tiny_llava_config(base)


def _llava_15_7b_config():
    from .vision_presets import llava_15_7b_config

    return llava_15_7b_config()


def _llava_processor(config):
    from .vision_presets import llava_processor

    return llava_processor(config)


def _untied(config: PretrainedConfig) -> PretrainedConfig:
    """``config`` with its own LM head (T5Config's constructor ignores the argument):
    a tied random head keeps echoing the decoder's input token, a useless test model."""
    config.tie_word_embeddings = False
    return config


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny-llama", _tiny(LlamaConfig), torch.float32, "Llama, 4 layers, hidden 128"),
        Preset("tiny-qwen2", _tiny(Qwen2Config), torch.float32, "Qwen2 (QKV bias), 4 layers"),
        Preset("tiny-mistral", _tiny(MistralConfig, sliding_window=64), torch.float32,
               "Mistral, sliding window 64"),
        Preset("tiny-gemma2", _tiny(Gemma2Config, head_dim=32, query_pre_attn_scalar=32, sliding_window=64,
                                    hidden_activation="gelu_pytorch_tanh"), torch.float32,
               "Gemma2: alternating sliding/full layers, logit soft-capping"),
        Preset("tiny-gemma3", _tiny(Gemma3TextConfig, head_dim=32, query_pre_attn_scalar=32, sliding_window=64,
                                    layer_types=["sliding_attention", "full_attention"] * 2,
                                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                     "sliding_attention": {"rope_type": "default",
                                                                           "rope_theta": 1e4}}),
               torch.float32, "Gemma3 text: per-layer-type RoPE"),
        Preset("tiny-phi3", _tiny(Phi3Config, partial_rotary_factor=0.5), torch.float32,
               "Phi3: partial rotary (half of each head's channels rotate)"),
        Preset("tiny-gpt2", lambda: GPT2Config(n_embd=128, n_layer=4, n_head=4, n_positions=4096,
                                               vocab_size=TINY_VOCAB, bos_token_id=256, eos_token_id=257,
                                               pad_token_id=258),
               torch.float32, "GPT-2: absolute position embeddings, no RoPE"),
        Preset("llama-3.1-8b", lambda: LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192},
            rms_norm_eps=1e-5, bos_token_id=256, eos_token_id=257, pad_token_id=258),
            torch.bfloat16, "Llama-3.1-8B shape (random weights)"),
        Preset("granite-3.3-8b", lambda: GraniteConfig(
            hidden_size=4096, intermediate_size=12800, num_hidden_layers=40, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=49159, max_position_embeddings=131072,
            rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0},
            attention_multiplier=0.0078125, embedding_multiplier=12.0, residual_multiplier=0.22,
            logits_scaling=16.0, tie_word_embeddings=True, bos_token_id=256, eos_token_id=257,
            pad_token_id=258),
            torch.bfloat16, "Granite-3.3-8B shape (random weights)"),
        Preset("qwen2.5-7b", lambda: Qwen2Config(
            hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, rms_norm_eps=1e-6,
            bos_token_id=256, eos_token_id=257, pad_token_id=258),
            torch.bfloat16, "Qwen2.5-7B shape (random weights)"),
        # encoder-decoder presets: run them with spanctx.Seq2SeqRuntime (spanctx/seq2seq.py)
        Preset("tiny-t5", lambda: _untied(T5Config(
            vocab_size=TINY_VOCAB, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=32, pad_token_id=258, eos_token_id=257, decoder_start_token_id=258)),
            torch.float32, "T5 (v1.1-style, untied head) encoder-decoder, 2+2 layers, relative position bias"),
        Preset("tiny-bart", lambda: BartConfig(
            vocab_size=TINY_VOCAB, d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=1024,
            bos_token_id=256, eos_token_id=257, pad_token_id=258, decoder_start_token_id=256,
            forced_bos_token_id=None, forced_eos_token_id=None, tie_word_embeddings=False), torch.float32,
            "BART encoder-decoder, 2+2 layers, learned absolute positions"),
        Preset("t5-base", lambda: T5Config(
            vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12,
            pad_token_id=258, eos_token_id=257, decoder_start_token_id=258), torch.float32,
            "T5-base shape (random weights; the byte tokenizer uses ids < 261 of its vocab)"),
        # vision-language presets: load_preset returns their processor (spanctx/vision_presets.py)
        Preset("tiny-llava", lambda: _tiny_llava_config(_TINY), torch.float32,
               "LLaVA: 2-layer CLIP tower on 28x28 images (16 image tokens), tiny Llama"),
        Preset("llava-1.5-7b", lambda: _llava_15_7b_config(), torch.bfloat16,
               "LLaVA-1.5-7B shape: CLIP ViT-L/14-336 (576 image tokens), Llama-2-7B (random weights)"),
        Preset("tiny-trained", lambda: LlamaConfig.from_pretrained(WEIGHTS_DIR / "tiny-trained"), torch.float32,
               "Llama, 8 layers, hidden 256, GQA 8/2, TRAINED on English prose and synthetic retrieval",
               weights="tiny-trained"),
    ]
}

DEFAULT_PRESET = "tiny-llama"


def preset_config(name: str, **overrides) -> PretrainedConfig:
    """The config of preset ``name`` with ``overrides`` applied (e.g. fewer layers)."""
    config = _preset(name).make_config()
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"{type(config).__name__} has no attribute {key!r}")
        setattr(config, key, value)
    return config


def load_preset(name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                seed: int = 0, attn_implementation: str | None = None, model_class=AutoModelForCausalLM,
                **overrides):
    """Build preset ``name`` on ``device``: random weights (seeded), or a trained preset's
    shipped weights (``seed`` unused; its shape cannot be overridden).

    Returns ``(model, tokenizer)``. Random weights are initialised on the device itself,
    so an 8B shape takes seconds on a GPU. ``model_class`` is an ``AutoModelFor...`` class
    (e.g. ``AutoModelForSequenceClassification`` for a random reward model).
    """
    preset = _preset(name)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    tokenizer = byte_tokenizer()
    if preset.weights_dir is not None:
        if overrides:
            raise ValueError(f"preset {name!r} has trained weights: its config cannot be overridden "
                             f"(got {sorted(overrides)})")
        model = model_class.from_pretrained(preset.weights_dir, dtype=dtype or preset.dtype, **kwargs).to(device)
        config = model.config
    else:
        config = preset_config(name, **overrides)
        if getattr(config, "is_encoder_decoder", False) and model_class is AutoModelForCausalLM:
            raise ValueError(f"preset {name!r} is an encoder-decoder model: "
                             f"use spanctx.Seq2SeqRuntime.from_pretrained({name!r})")
        if getattr(config, "vision_config", None) is not None and model_class is AutoModelForCausalLM:
            model_class = AutoModelForImageTextToText
        torch.manual_seed(seed)
        with torch.device(device):
            model = model_class.from_config(config, dtype=dtype or preset.dtype, **kwargs)
    model.eval()
    model.config._name_or_path = name  # what repr(Runtime) shows; not part of the model's fingerprint
    if getattr(model, "generation_config", None) is not None:
        text = config.get_text_config()
        model.generation_config.pad_token_id = text.pad_token_id
        if not getattr(config, "is_encoder_decoder", False):
            # stop where the chat template ends a turn, as at EOS: a chat reply ends there
            model.generation_config.eos_token_id = [text.eos_token_id, tokenizer.convert_tokens_to_ids(TURN_END)]
    if getattr(config, "vision_config", None) is not None:
        return model, _llava_processor(config)  # the processor: Runtime(model, processor) takes images
    return model, tokenizer


def _preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None
