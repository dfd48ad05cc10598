"""pytest plugin: run Mellea's own Hugging Face backend tests offline, on stock or on spanctx.

Mellea's ``test/backends/test_huggingface.py`` loads Granite from the hub and needs a
20 GB GPU. This plugin (ours; none of Mellea's code) makes it run here:

- ``require_gpu`` becomes a no-op mark, so the module is collected on a CPU;
- hub loads are answered by ``offline.offline_hub``: a tiny random Granite-architecture
  model, a byte tokenizer with Granite's special tokens, stand-in intrinsics;
- ``MELLEA_BACKEND=spanctx`` replaces ``mellea.backends.huggingface.LocalHFBackend``
  with ``spanctx.integrations.mellea.SpanctxBackend`` before the test module imports it
  (``stock``, the default, leaves Mellea's backend in place).

Run it with ``benchmarks/mellea/run_acceptance.sh`` (both backends, counts side by side).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from offline import offline_hub, tiny_granite

BACKEND = os.environ.get("MELLEA_BACKEND", "stock")
if BACKEND not in ("stock", "spanctx"):
    raise ValueError(f"MELLEA_BACKEND is 'stock' or 'spanctx', got {BACKEND!r}")


def _no_gpu_needed(*args, **kwargs):
    return pytest.mark.skipif(False, reason="offline acceptance run: tiny CPU models")


def pytest_configure(config) -> None:
    import test.predicates

    test.predicates.require_gpu = _no_gpu_needed
    if BACKEND == "spanctx":
        import mellea.backends.huggingface as hf

        from spanctx.integrations.mellea import SpanctxBackend

        hf.LocalHFBackend = SpanctxBackend
    adapters = Path(tempfile.mkdtemp(prefix="mellea-acceptance-adapters-"))
    hub = offline_hub(tiny_granite, adapters)
    hub.__enter__()
    config.add_cleanup(lambda: hub.__exit__(None, None, None))


def pytest_report_header(config) -> str:
    return f"mellea acceptance: backend={BACKEND}, offline tiny Granite-style model"
