"""The one module that knows how the installed transformers spells its API.

Supported: transformers 5.17 (the oldest tested) up to the newest release tested.
Differences handled here, and nowhere else:

- The cache argument of a model's ``forward`` and of ``generate``: ``past_key_values``
  up to 5.23, ``cache`` from 5.24 on (``past_key_values`` still accepted there with a
  FutureWarning, removed in 5.40 for ``forward`` and 6.0 for ``generate``). The name is
  read off the model class's ``forward`` signature, so a model class that has not moved
  yet keeps the old name.

- peft 0.21 reads ``PreTrainedModel.is_gradient_checkpointing``, which transformers 5.24
  deprecates: a FutureWarning raised by PEFT's own code whenever a PEFT model is made.
  ``peft_wrapping`` silences exactly that one around spanctx's calls into PEFT.

- The cache field of ``generate``'s output: ``past_key_values`` up to 5.23, ``cache``
  from 5.24 on, where every access under the old name goes through a shim that logs a
  deprecation warning. ``cacheless_output`` builds an output without a cache that
  answers the old name as a plain unset attribute on every version (for code written
  against the old name, such as Mellea 0.8's post-processing).

Everything else in spanctx passes caches through ``cache_kwargs``, reads a forward's
cache argument through ``cache_argument`` and a config's length limit through
``max_positions``. No torch, and nothing of spanctx: every layer may import it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Mapping

__all__ = ["CACHE_NAMES", "cache_argument", "cache_kwargs", "cache_name", "cacheless_output", "max_positions",
           "peft_wrapping"]

# every spelling of the cache argument, newest first
CACHE_NAMES = ("cache", "past_key_values")


@functools.cache
def _cache_name_of(model_class: type) -> str:
    # transformers' deprecate_kwarg wraps forward with functools.wraps: the signature is
    # the new one (``cache``) wherever the rename happened
    parameters = inspect.signature(model_class.forward).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise TypeError(f"{model_class.__name__}.forward takes no cache argument (looked for {CACHE_NAMES}): "
                    "spanctx runs decoder models that take one")


def cache_name(model) -> str:
    """The name under which ``model``'s forward (and ``generate``) takes its KV cache."""
    return _cache_name_of(type(model))


def cache_kwargs(model, cache) -> dict[str, object]:
    """``{name: cache}`` for a call of ``model`` or ``model.generate``."""
    return {cache_name(model): cache}


def cache_argument(kwargs: Mapping[str, object]):
    """The cache a forward was called with (in a forward pre-hook), or None."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def max_positions(config) -> int | None:
    """How many positions a model's text config allows (None: no limit given); configs
    spell it ``max_position_embeddings`` or, GPT-2 style, ``n_positions``."""
    text = config.get_text_config()
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


@contextlib.contextmanager
def peft_wrapping():
    """Around a call that makes a PEFT model: PEFT's own read of a property that
    transformers 5.24 deprecated warns nothing (see the module doc); all else warns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def cacheless_output(**fields):
    """``GenerateDecoderOnlyOutput(**fields)`` with no cache, whose old cache name reads
    None, can be set, and is answered by the mapping as itself: nothing logs a rename
    warning (see the module doc)."""
    return _cacheless_output_class()(**fields)


@functools.cache
def _cacheless_output_class() -> type:
    from transformers.generation.utils import GenerateDecoderOnlyOutput  # here: hf.py stays torch-free

    class CachelessOutput(GenerateDecoderOnlyOutput):
        past_key_values = None  # a plain attribute, over 5.24's renaming property

        def _replace_old_cache_name(self, key: str) -> str:  # 5.24's shim for item access: no rename
            return key

    return CachelessOutput
