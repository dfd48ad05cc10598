"""spanctx/hf.py is the one place that knows how transformers spells its cache argument."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, tiny_model

import spanctx
from spanctx import hf
from spanctx.cache import kv as kvops

PACKAGE = Path(spanctx.__file__).parent


@pytest.mark.parametrize("arch", ARCHS)
def test_the_cache_argument_is_taken_silently(arch):
    """The model fills the cache handed over under ``cache_name`` and warns about nothing."""
    model, _ = tiny_model(arch)
    cache = kvops.empty_cache()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("error")
        model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **hf.cache_kwargs(model, cache))
        model(input_ids=torch.tensor([[4]]), use_cache=True, **hf.cache_kwargs(model, cache))
    assert kvops.cache_length(cache) == 4


def test_cache_argument_reads_either_spelling():
    cache = object()
    assert hf.cache_argument({"cache": cache}) is cache
    assert hf.cache_argument({"past_key_values": cache}) is cache
    assert hf.cache_argument({"input_ids": 1}) is None


def test_a_model_without_a_cache_argument_is_refused():
    class NoCache(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(TypeError, match="takes no cache argument"):
        hf.cache_name(NoCache())


def test_no_module_but_hf_spells_a_cache_argument():
    """Nowhere else guesses the name: a literal ``past_key_values`` / ``cache=`` keyword
    outside hf.py would break on one end of the supported range."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "hf.py" and path.parent == PACKAGE:
            continue
        text = path.read_text()
        # (a model call's ``cache=`` keyword can only sit in the executor, which the
        # architecture test pins; Mellea's own ``cache=`` argument is another thing)
        for needle in ("past_key_values", '"cache"'):
            if needle in text:
                offenders.append(f"{path.relative_to(PACKAGE)}: {needle}")
    assert not offenders
