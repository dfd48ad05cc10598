"""Images in prompts of vision-language models: placeholder ids in, image features out.

An image span resolves (``prompt.py``) to ``n`` **placeholder ids**, where ``n`` is the
number of image tokens the model's processor would expand the image to. They are ids
past the text vocabulary: ``vocab + block * BLOCK + i`` for the ``i``-th feature of the
image registered under ``block``. Every path of the engine feeds ids (slices, parallel
members, repairs, ``generate``); two hooks on the model's input embedding turn the
placeholders into the image's features, computed by the vision tower and projector on
first use and kept for the most recent images. So a stored image span costs no vision
forward, and its KV is reused exactly as a text span's is.

The span's key digests the processed pixels (dtype, shape, bytes) and the image
processor's config, never the placeholder ids, so the same picture under another file
name, or loaded again, hits the same stored KV.

Supported: LLaVA (``LlavaForConditionalGeneration``: one image = a fixed number of
tokens at ordinary 1-D positions, so its KV also moves like text in parallel groups).
Other families are refused with the reason (``UNSUPPORTED``).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict

import torch
import xxhash

from ..core.media import Image

__all__ = ["BLOCK", "ImagePlaceholders", "image_support"]

BLOCK = 1 << 20  # placeholder ids per image block: at most this many tokens per image
KEY_MARK = 0xFFFFFFFF  # first key id of an image span: never a text id
SUPPORTED = ("llava",)
UNSUPPORTED = {
    "qwen2_vl": "Qwen2-VL positions image tokens with M-RoPE over a (time, height, width) grid that HF computes "
                "from the placeholder ids of the whole prompt",
    "qwen2_5_vl": "Qwen2.5-VL positions image tokens with M-RoPE over a (time, height, width) grid that HF "
                  "computes from the placeholder ids of the whole prompt",
    "gemma3": "Gemma3 attends bidirectionally within an image and scales embeddings inside its embedding module",
}


class ImagePlaceholders:
    """Placeholder ids of one runtime's images: its processor, over the model's one
    ``_ImageTable`` (shared by every runtime on the model, since the hooks are the model's)."""

    def __init__(self, model, processor) -> None:
        self.config = model.config
        self.image_processor = processor.image_processor
        self.table = _table(model)
        self.image_token: str = processor.image_token  # what a chat template writes for an image part
        processor_config = self.image_processor.to_dict()
        processor_config.pop("processor_class", None)
        self._processor_digest = json.dumps(processor_config, sort_keys=True, default=str).encode()
        self._processed: OrderedDict[bytes, tuple[bytes, object, int]] = OrderedDict()  # raw digest -> ...

    def ids(self, image: Image) -> tuple[int, ...]:
        return self.table.register(*self._process(image))

    def key_ids(self, image: Image) -> tuple[int, ...]:
        digest, _, n = self._process(image)
        return (KEY_MARK, n, *(int.from_bytes(digest[i:i + 4], "little") for i in range(0, len(digest), 4)))

    def _process(self, image: Image) -> tuple[bytes, object, int]:
        """(content digest, pixel values ``[1, 3, H, W]`` as numpy, image token count)."""
        hit = self._processed.get(image.raw_digest)
        if hit is None:
            pixels = self.image_processor(images=image.load(), return_tensors="np")["pixel_values"]
            h = xxhash.xxh3_128()
            for part in (self._processor_digest, f"{pixels.dtype}:{pixels.shape}".encode(), pixels.tobytes()):
                h.update(len(part).to_bytes(8, "little"))
                h.update(part)
            hit = (h.digest(), pixels, _image_tokens(self.config, pixels.shape))
            self._processed[image.raw_digest] = hit
            while len(self._processed) > self.table.keep_images:
                self._processed.popitem(last=False)
        self._processed.move_to_end(image.raw_digest)
        return hit


class _ImageTable:
    """One model's registered images and the two hooks on its input embedding.

    ``keep_images``: how many images' pixels (and features) are kept between calls; a
    call's own images are registered when it is resolved, under the session's lock."""

    def __init__(self, model, keep_images: int = 256) -> None:
        self.model = model
        self.config = model.config
        self.vocab = model.config.get_text_config().vocab_size
        self.keep_images = keep_images
        self._blocks: dict[bytes, int] = {}  # content digest -> block, for good
        self._images: OrderedDict[int, _Entry] = OrderedDict()  # block -> pixels (LRU)
        self._lock = threading.Lock()
        self._pending = threading.local()
        embedding = model.get_input_embeddings()
        embedding.register_forward_pre_hook(self._swap_in)
        embedding.register_forward_hook(self._fill_in)

    def register(self, digest: bytes, pixels, tokens: int) -> tuple[int, ...]:
        """The placeholder ids of the image with content ``digest``."""
        with self._lock:
            block = self._blocks.setdefault(digest, len(self._blocks))
            entry = self._images.pop(block, None) or _Entry(pixels, tokens)
            self._images[block] = entry
            while len(self._images) > self.keep_images:
                self._images.popitem(last=False)
        base = self.vocab + block * BLOCK
        return tuple(range(base, base + tokens))

    def _swap_in(self, module, args):
        """Pre-hook: placeholder ids become id 0 for the embedding; their places are kept."""
        ids = args[0]
        self._pending.value = None
        if ids.is_cuda and torch.cuda.is_current_stream_capturing():
            return None  # a captured decode step holds text ids only
        virtual = ids >= self.vocab
        if not bool(virtual.any()):
            return None
        self._pending.value = (virtual, ids[virtual])
        return (ids.masked_fill(virtual, 0), *args[1:])

    def _fill_in(self, module, args, out):
        """Hook: the kept places get their image features (as LLaVA's own merge does)."""
        pending, self._pending.value = getattr(self._pending, "value", None), None
        if pending is None:
            return None
        virtual, placeholder = pending
        offsets = placeholder - self.vocab
        blocks, within = offsets // BLOCK, offsets % BLOCK
        rows = torch.empty((placeholder.numel(), out.shape[-1]), dtype=out.dtype, device=out.device)
        for block in blocks.unique().tolist():
            here = blocks == block
            rows[here] = self._features(block)[within[here]].to(out.dtype)
        out = out.clone()
        out[virtual] = rows
        return out

    def _features(self, block: int) -> torch.Tensor:
        """``[n, hidden]``: the image's features after the projector (computed once)."""
        with self._lock:
            entry = self._images.get(block)
        if entry is None:
            raise RuntimeError(f"image block {block} is no longer held (more than keep_images={self.keep_images} "
                               "images in one call?)")
        if entry.features is None:
            pixels = torch.from_numpy(entry.pixels).to(self.model.device, self.model.dtype)
            out = self.model.get_image_features(
                pixel_values=pixels, vision_feature_layer=self.config.vision_feature_layer,
                vision_feature_select_strategy=self.config.vision_feature_select_strategy)
            out = getattr(out, "pooler_output", out)
            out = torch.cat(list(out)) if isinstance(out, (list, tuple)) else out
            entry.features = out.reshape(-1, out.shape[-1])
            if entry.features.shape[0] != entry.tokens:
                raise RuntimeError(f"the vision tower gave {entry.features.shape[0]} features for an image of "
                                   f"{entry.tokens} tokens")
        return entry.features


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _table(model) -> _ImageTable:
    """The model's one image table (made with its hooks on first use)."""
    if model not in _TABLES:
        _TABLES[model] = _ImageTable(model)
    return _TABLES[model]


class _Entry:
    __slots__ = ("features", "pixels", "tokens")

    def __init__(self, pixels, tokens: int) -> None:
        self.pixels, self.tokens, self.features = pixels, tokens, None


class _Refused:
    """Image support of a model that takes images in a way spanctx does not reuse."""

    def __init__(self, reason: str, image_token: str | None) -> None:
        self.reason = reason
        self.image_token = image_token  # so that chat image parts reach ``ids`` and its reason

    def ids(self, image: Image) -> tuple[int, ...]:
        raise ValueError(self.reason)

    key_ids = ids


def image_support(model, processor) -> ImagePlaceholders | _Refused | None:
    """The resolver's image support for ``model`` (None: a text model)."""
    config = model.config
    if getattr(config, "vision_config", None) is None:
        return None
    kind = config.model_type
    if kind not in SUPPORTED:
        why = UNSUPPORTED.get(kind, "spanctx has not checked its image placeholders and positions")
        return _Refused(f"images on {type(model).__name__} are not supported: {why}. Supported: "
                        f"{', '.join(SUPPORTED)} (see docs/multimodal.md)", getattr(processor, "image_token", None))
    if processor is None or getattr(processor, "image_processor", None) is None:
        return _Refused("image spans need the model's processor: pass AutoProcessor.from_pretrained(...) "
                        "(not the bare tokenizer) as the runtime's tokenizer", "<image>")
    return ImagePlaceholders(model, processor)


def _image_tokens(config, pixel_shape: tuple[int, ...]) -> int:
    """How many tokens LLaVA's processor expands one image of ``pixel_shape`` to."""
    patch = config.vision_config.patch_size
    height, width = pixel_shape[-2:]
    cls = 0 if config.vision_feature_select_strategy == "default" else 1
    return (height // patch) * (width // patch) + cls
