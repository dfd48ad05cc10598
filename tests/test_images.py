"""Image spans on a tiny random LLaVA: placeholder expansion equal to the processor's,
logits and greedy tokens equal to HF's own full prefill with pixel values, reuse keyed
by pixel content, parallel placement, and clear refusals."""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import spanctx
from spanctx.core.media import Image
from spanctx.engine.vision import image_support
from spanctx.hf import cache_kwargs

ATOL = 1e-5


@functools.cache
def _llava():
    return spanctx.load_preset("tiny-llava")


def runtime(**kwargs) -> spanctx.Runtime:
    model, processor = _llava()
    return spanctx.Runtime(model, processor, kwargs.pop("store_bytes", 64 << 20), **kwargs)


def picture(seed: int, shape=(40, 50, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def hf_inputs(text: str, images: list) -> dict:
    """What a LLaVA user hands HF: the processor's ids (``<image>`` expanded) and pixels."""
    _, processor = _llava()
    return processor(text=text, images=images or None, return_tensors="pt")


def hf_last_logits(text: str, images: list) -> torch.Tensor:
    model, _ = _llava()
    with torch.inference_mode():
        return model(**hf_inputs(text, images)).logits[0, -1]


def test_placeholders_expand_as_the_processor_does():
    rt = runtime()
    ctx = spanctx.Context().append("Look: ").append(Image(picture(0))).append("\nWhat is it?")
    image_id = rt.model.config.image_token_index
    ids = [image_id if t >= rt.resolver.vocab_size else t for t in rt.token_ids(ctx)]
    assert ids == hf_inputs("Look: <image>\nWhat is it?", [picture(0)])["input_ids"][0].tolist()


def test_logits_and_tokens_equal_hf_full_prefill_and_the_image_is_reused():
    rt = runtime()
    img = Image(picture(1))
    ctx = spanctx.Context().append("System: describe images. ").append(img)
    expected = hf_last_logits("System: describe images. <image>\nWhat colour?", [picture(1)])
    q1 = ctx.append("\nWhat colour?")
    torch.testing.assert_close(rt.next_token_logits(q1), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(rt.next_token_logits(q1, reuse=False), expected, atol=ATOL, rtol=0)
    # a second question over the stored image: the prefix and image are not recomputed
    q2 = ctx.append("\nHow many?")
    result = rt.generate(q2, max_new_tokens=6)
    inputs = hf_inputs("System: describe images. <image>\nHow many?", [picture(1)])
    with torch.inference_mode():
        ref = rt.model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=258)
    assert list(result.token_ids) == ref[0, inputs["input_ids"].shape[1]:].tolist()
    assert result.stats.cached_tokens == len(rt.token_ids(ctx))
    torch.testing.assert_close(rt.next_token_logits(q2),
                               hf_last_logits("System: describe images. <image>\nHow many?", [picture(1)]),
                               atol=ATOL, rtol=0)


def test_the_static_executor_runs_calls_over_a_stored_image():
    """Image features enter through hooks a captured step skips: a tail holding image tokens
    runs eagerly (saying so); once the image is stored, the question runs static."""
    static, eager = runtime(executor="static"), runtime(executor="eager")
    ctx = spanctx.Context().append("System: describe images. ").append(Image(picture(4)))
    first, *later = [ctx.append(q) for q in ("\nWhat colour?", "\nHow many?", "\nWhere?")]
    got, want = static.generate(first, 5), eager.generate(first, 5)
    assert got.stats.executor == "eager" and "image tokens" in got.stats.executor_fallback
    assert got.token_ids == want.token_ids
    for q in later:
        got, want = static.generate(q, 5), eager.generate(q, 5)
        assert (got.stats.executor, got.stats.cached_tokens) == ("static", len(static.token_ids(ctx)))
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(static.next_token_logits(q), eager.next_token_logits(q), atol=ATOL, rtol=0)


def test_two_images_in_one_prompt():
    rt = runtime()
    ctx = (spanctx.Context().append("A: ").append(Image(picture(2))).append(" B: ").append(Image(picture(3)))
           .append(" Same?"))
    expected = hf_last_logits("A: <image> B: <image> Same?", [picture(2), picture(3)])
    torch.testing.assert_close(rt.next_token_logits(ctx), expected, atol=ATOL, rtol=0)
    swapped = (spanctx.Context().append("A: ").append(Image(picture(3))).append(" B: ").append(Image(picture(2)))
               .append(" Same?"))
    torch.testing.assert_close(rt.next_token_logits(swapped),
                               hf_last_logits("A: <image> B: <image> Same?", [picture(3), picture(2)]),
                               atol=ATOL, rtol=0)


def test_the_key_is_the_processed_pixels_not_the_file_name(tmp_path):
    from PIL import Image as PILImage

    pixels = picture(4)
    for name in ("a.png", "copy-of-a.png"):
        PILImage.fromarray(pixels).save(tmp_path / name)
    rt = runtime()
    prefix = spanctx.Context().append("Photo: ")
    first = prefix.append(Image(tmp_path / "a.png"))
    rt.generate(first.append(" Caption:"), max_new_tokens=1)
    for source in (tmp_path / "copy-of-a.png", str(tmp_path / "a.png"), PILImage.fromarray(pixels), pixels):
        again = prefix.append(Image(source)).append(" Caption:")
        assert rt.generate(again, max_new_tokens=1).stats.cached_tokens >= len(rt.token_ids(first))
    other = prefix.append(Image(picture(5))).append(" Caption:")
    assert rt.generate(other, max_new_tokens=1).stats.cached_tokens == len(rt.token_ids(prefix))


def _forward(model, cache, ids: list[int], start: int, pixels=None) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), pixel_values=pixels, use_cache=True,
                    position_ids=torch.arange(start, start + len(ids))[None], **cache_kwargs(model, cache))
    return out.logits[0, -1]


def test_parallel_images_equal_a_reference_of_hf_forwards():
    """A group of two images anchored after a prefix, then a question: each image's KV is
    what it is right after the prefix (the image's keys then moved to its own positions),
    the question attends to everything. Built here from HF forwards with pixel values:
    the prefix is prefilled shifted so that the image, right after it, lands at its
    positions (as in tests/test_parallel.py's reference)."""
    rt = runtime(repair="none")
    model, processor = _llava()
    image_id = model.config.image_token_index
    prefix, question = "Compare: ", " Which is darker?"
    ctx = spanctx.Context().append(prefix).parallel(Image(picture(6)), Image(picture(7))).append(question)
    bos = [rt.tokenizer.bos_token_id]
    prefix_ids = bos + rt.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    question_ids = rt.tokenizer(question, add_special_tokens=False)["input_ids"]
    cache = DynamicCache()
    _forward(model, cache, prefix_ids, 0)
    start = len(prefix_ids)
    for seed in (6, 7):
        pixels = processor.image_processor(images=picture(seed), return_tensors="pt")["pixel_values"]
        member = DynamicCache()
        _forward(model, member, prefix_ids, start - len(prefix_ids))
        _forward(model, member, [image_id] * 16, start, pixels)
        for i, layer in enumerate(member.layers):
            cache.update(layer.keys[:, :, len(prefix_ids):], layer.values[:, :, len(prefix_ids):], i)
        start += 16
    expected = _forward(model, cache, question_ids, start)
    torch.testing.assert_close(rt.next_token_logits(ctx), expected, atol=1e-4, rtol=0)
    # each member's KV is stored once, as computed right after the prefix: the swapped
    # order reuses both images, the one now second moved by the other's 16 tokens
    swapped = spanctx.Context().append(prefix).parallel(Image(picture(7)), Image(picture(6))).append(question)
    stats = rt.generate(swapped, max_new_tokens=1).stats
    assert stats.parallel.moved_tokens == 16 and stats.computed_tokens == len(question_ids)


def test_refusals_name_the_reason():
    text_rt = spanctx.Runtime(*spanctx.load_preset("tiny-llama"), store_bytes=1 << 20)
    with pytest.raises(ValueError, match="takes no images"):
        text_rt.generate(spanctx.Context().append(Image(picture(0))))
    model, processor = _llava()
    bare = spanctx.Runtime(model, processor.tokenizer, store_bytes=1 << 20)
    with pytest.raises(ValueError, match="AutoProcessor"):
        bare.generate(spanctx.Context().append(Image(picture(0))))
    fake = types.SimpleNamespace(config=types.SimpleNamespace(vision_config=object(), model_type="qwen2_vl"))
    support = image_support(fake, processor)
    with pytest.raises(ValueError, match="M-RoPE"):
        support.ids(Image(picture(0)))
    with pytest.raises(TypeError, match="file path, a PIL image or an array"):
        Image(b"not an image")
    with pytest.raises(FileNotFoundError):
        Image("/no/such/picture.png")


def test_messages_with_image_parts_equal_the_processors_chat_template():
    rt = runtime()
    model, processor = _llava()
    messages = [{"role": "system", "content": "You describe images."},
                {"role": "user", "content": [{"type": "image", "image": picture(8)},
                                             {"type": "text", "text": "What is this?"}]}]
    ctx = spanctx.Context.chat(messages)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    image_id = model.config.image_token_index
    ids = [image_id if t >= rt.resolver.vocab_size else t for t in rt.token_ids(ctx)]
    assert ids == inputs["input_ids"][0].tolist()
    with torch.inference_mode():
        expected = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits[0, -1]
    torch.testing.assert_close(rt.next_token_logits(ctx), expected, atol=ATOL, rtol=0)
    # the next turn reuses the whole first turn, image included
    turn = ctx.message("assistant", "A picture.").message("user", "Which colours?", add_generation_prompt=True)
    assert rt.generate(turn, max_new_tokens=1).stats.cached_tokens >= len(rt.token_ids(ctx))


def test_audio_parts_and_images_on_text_models_are_refused():
    with pytest.raises(NotImplementedError, match="audio parts are not supported"):
        spanctx.Context.chat([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}])
    text_rt = spanctx.Runtime(*spanctx.load_preset("tiny-llama"), store_bytes=1 << 20)
    ctx = spanctx.Context.chat([{"role": "user", "content": [{"type": "image", "image": picture(0)}]}])
    with pytest.raises(ValueError, match="takes no images"):
        text_rt.generate(ctx)


def test_a_saved_vlm_folder_loads_with_its_processor(tmp_path):
    model, processor = _llava()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    rt = spanctx.Runtime.from_pretrained(str(tmp_path), device="cpu", dtype="float32", store_bytes=1 << 24)
    ctx = spanctx.Context().append("A ").append(Image(picture(9))).append(" b")
    torch.testing.assert_close(rt.next_token_logits(ctx), runtime().next_token_logits(ctx), atol=ATOL, rtol=0)
