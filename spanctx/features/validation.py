"""JSON schema validation with ``jsonschema`` (Draft 2020-12), imported on first use.

One place for the optional dependency: tool arguments (``tools.py``) and JSON output
(``structured.py``) both validate here. jsonschema is the reference implementation of
the standard; a hand-written subset validator would have to refuse or silently skip
every keyword it lacks (``$ref``/``$defs`` from pydantic, ``pattern``, ``anyOf``...).
"""

from __future__ import annotations

from typing import Any


def validator(schema: dict):
    """A validator for ``schema``; ``ValueError`` when the schema itself is invalid."""
    jsonschema = _jsonschema()
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"invalid JSON schema: {exc.message}") from None
    return jsonschema.Draft202012Validator(schema)


def errors(checker, value: Any) -> list[str]:
    """What is wrong with ``value`` under ``checker`` (a ``validator``), one line per
    error as ``path: message``; empty when it is valid."""
    found = sorted(checker.iter_errors(value), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in found]


def _jsonschema():
    try:
        import jsonschema
    except ImportError:
        raise ImportError("JSON schema validation needs jsonschema: "
                          "pip install 'spanctx[tools]' or 'spanctx[json]'") from None
    return jsonschema
