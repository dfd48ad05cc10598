"""Vision-language presets (LLaVA): configs, and a processor built with no files.

The processor is a ``LlavaProcessor`` over a CLIP image processor made from a config
dict and the byte tokenizer with ``<image>`` added as id ``TINY_VOCAB`` (the text
model's vocabulary is one larger than the text presets'). ``load_preset`` returns it in
place of the tokenizer, as ``AutoProcessor.from_pretrained`` would be passed for a real
model: ``Runtime(model, processor)`` takes image spans.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

from .tokenizer import byte_tokenizer

IMAGE_TOKEN = "<image>"


# the byte tokenizer's ChatML template after the BOS token (as Llama-based LLaVA templates
# write it), with content given as a list of parts (an image part is written as the
# image token, as LLaVA's own templates do)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def image_tokenizer():
    """The byte tokenizer with ``<image>`` as one more special token (its last id) and a
    chat template that takes image parts."""
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llava_config(text: dict) -> LlavaConfig:
    """A LLaVA with a 2-layer CLIP tower on 28x28 images (patch 7: 16 image tokens) and a
    tiny Llama (``text``: the text presets' shape)."""
    vocab = len(image_tokenizer())
    return LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=28, patch_size=7, projection_dim=64),
        text_config=LlamaConfig(**{**text, "vocab_size": vocab}), image_token_index=vocab - 1,
        image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default")


def llava_15_7b_config() -> LlavaConfig:
    """LLaVA-1.5-7B's shape: CLIP ViT-L/14 at 336 px (576 image tokens), Llama-2-7B."""
    vocab = 32064
    return LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=vocab,
                                max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=256,
                                eos_token_id=257, pad_token_id=258),
        image_token_index=len(image_tokenizer()) - 1, image_seq_length=576, vision_feature_layer=-2,
        vision_feature_select_strategy="default")


def llava_processor(config: LlavaConfig) -> LlavaProcessor:
    """A processor for ``config``'s image size, over ``image_tokenizer()`` (no files)."""
    from transformers import CLIPImageProcessor

    size = config.vision_config.image_size
    tokenizer = image_tokenizer()
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_index:
        raise ValueError(f"the config's image token {config.image_token_index} is not the tokenizer's "
                         f"{tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}")
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=config.vision_config.patch_size,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
                          chat_template=tokenizer.chat_template)
