"""Image span contents. Audio and video are refused (``docs/multimodal.md`` says why).

``Image(source)``: a file path (``str`` or ``os.PathLike``), a PIL image, or an array
``[H, W, C]`` / ``[H, W]`` (anything with ``__array__``, e.g. numpy). It is a frozen value
that compares and hashes by a digest of its raw content (the file's bytes; a PIL image's
mode, size and pixels; an array's dtype, shape and bytes), so a ``Context`` holding it
hashes like any other. Which KV it names is decided later, after the model's image
processor (``spanctx.engine.vision``): the span's key digests the processed pixels and
the processor's config, so one picture under two file names, or loaded twice, reuses
one stored KV. No torch here.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import xxhash

__all__ = ["Image"]


@attrs.frozen(eq=False, repr=False)
class Image:
    """One image in a prompt (see the module doc for what ``source`` may be)."""

    source: object
    raw_digest: bytes = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "raw_digest", _raw_digest(self.source))

    def load(self):
        """The image as the processor takes it: a PIL image (RGB for files) or the array."""
        if isinstance(self.source, (str, os.PathLike)):
            from PIL import Image as PILImage

            with PILImage.open(self.source) as img:
                return img.convert("RGB")
        return self.source

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Image) and other.raw_digest == self.raw_digest

    def __hash__(self) -> int:
        return hash(self.raw_digest)

    def __repr__(self) -> str:
        is_path = isinstance(self.source, (str, os.PathLike))
        name = repr(os.fspath(self.source)) if is_path else type(self.source).__name__
        return f"Image({name}, {self.raw_digest[:4].hex()})"


def _raw_digest(source: object) -> bytes:
    h = xxhash.xxh3_128()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no image file at {os.fspath(source)!r}")
        h.update(b"file")
        h.update(path.read_bytes())
    elif hasattr(source, "tobytes") and hasattr(source, "mode") and hasattr(source, "size"):  # PIL
        h.update(f"pil:{source.mode}:{source.size}".encode())
        h.update(source.tobytes())
    elif hasattr(source, "__array__"):
        import numpy as np

        array = np.ascontiguousarray(np.asarray(source))
        if array.ndim not in (2, 3) or array.size == 0:
            raise ValueError(f"an image array is [H, W] or [H, W, C], got shape {array.shape}")
        h.update(f"array:{array.dtype}:{array.shape}".encode())
        h.update(array.tobytes())
    else:
        raise TypeError(f"an Image is a file path, a PIL image or an array, got {type(source).__name__}")
    return h.digest()
