"""Typed checks at the API edge: what a user passes in, refused at the call with an error
that names the fix, never dropped or failing deep inside.

One place for these rules: spans and messages check their content here, the options
their counts and seeds, the session its store size, identity and salt, the runtime its
lists. No torch, nothing of spanctx: the layers above call in. The checks that need the
``Context`` type itself (``as_context``: what every call takes as a prompt; the
constructor; ``parallel(docs)``) sit beside it in ``spans.py``, which builds on this
module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# torch.manual_seed takes a uint64 (negative values wrap); spanctx takes the plain range
SEED_LIMIT = 1 << 64


def text(value: str, what: str) -> str:
    """``value`` if it is valid Unicode text (it encodes to UTF-8: no lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise ValueError(f"{what} holds a lone surrogate {bad!r} at index {exc.start}: it is not valid "
                         "Unicode and cannot be tokenized; decode bytes with errors='replace' (or "
                         "'surrogatepass' and re-encode) first") from None
    return value


def span_content(content: Any) -> str | tuple[int, ...]:
    """Span content as stored: non-empty text, or a non-empty tuple of token ids
    (non-negative ints). Chat items are built with ``Context.message``/``chat``."""
    if isinstance(content, str):
        if content == "":
            raise ValueError("a span cannot be empty text")
        return text(content, "span text")
    if isinstance(content, (bytes, bytearray)):
        raise TypeError("a span is text (str) or token ids (a sequence of int), not bytes: decode it first, "
                        "e.g. data.decode('utf-8')")
    if isinstance(content, Mapping):
        raise TypeError(f"a span is text or token ids, got a dict ({_short(content)}); for chat messages use "
                        "ctx.message(role, content) or ctx.chat([{'role': ..., 'content': ...}, ...])")
    if not isinstance(content, Iterable):
        raise TypeError(f"a span is text (str) or token ids (a sequence of int), got {type(content).__name__} "
                        f"{_short(content)}" + (": convert it with str(...) first" if content is not None else ""))
    ids = tuple(content)
    if not ids:
        raise ValueError("a span cannot be an empty list of token ids")
    for t in ids:
        if isinstance(t, str):
            raise TypeError(f"a span is one text or a sequence of token ids, got a sequence holding text "
                            f"({_short(t)}): append each text as its own span (ctx.extend(texts)), or "
                            "ctx.parallel(*texts) for a parallel group")
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise TypeError(f"token ids must be non-negative ints, got {t!r}")
    return ids


def not_one_string(values: Any, call: str) -> list:
    """``values`` as a list, refusing a single string (which would run one item per
    character) and anything that is not a sequence of items."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{call} takes a list, got one string: pass [{_short(values)}]")
    if isinstance(values, Mapping) or not isinstance(values, Iterable):
        raise TypeError(f"{call} takes a list, got {type(values).__name__}")
    return list(values)


def positive_int(value: Any, name: str) -> int:
    """``value`` if it is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def seed(value: Any) -> int | None:
    """A sampling seed: None or an int in [0, 2**64)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"seed must be an int, got {value!r}")
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**64), got {value}; e.g. seed % 2**64")
    return value


def byte_count(value: Any, name: str) -> int | None:
    """A size in bytes: None (the default) or an int >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        hint = " (e.g. 1 << 30 for 1 GiB)" if isinstance(value, (str, float)) else ""
        raise TypeError(f"{name} is a number of bytes (int){hint}, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 bytes, got {value}")
    return value


def identity(value: Any) -> str | None:
    """A model identity: None (the weights are read) or a non-empty str."""
    if value is not None and (not isinstance(value, str) or not value):
        raise TypeError(f"model_identity is a non-empty str naming the weights (e.g. 'org/model@revision'), "
                        f"or None to fingerprint them; got {value!r}")
    return value


def salt(value: Any) -> str | None:
    """A tenant salt: None or a non-empty str."""
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"a salt is a non-empty str (or None), got {value!r}")
    return value


def _short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."
