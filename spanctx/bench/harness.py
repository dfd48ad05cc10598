"""What every scenario needs: the model, its runtime, the device, the token source and
the repeat counts. Built once per benchmark run."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import attrs
import torch

from ..presets import PRESETS, load_preset
from ..runtime import Runtime
from .workloads import TokenSource

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@attrs.frozen(eq=False)
class Harness:
    """A loaded model and runtime plus the run's settings."""

    model: torch.nn.Module
    tokenizer: object
    runtime: Runtime
    model_name: str
    source: TokenSource
    warmup: int
    repeats: int  # default timed repeats per row
    scenario_repeats: Mapping[str, int] = attrs.field(factory=dict)  # per-scenario overrides
    progress: Callable[..., object] | None = None  # tqdm-like factory, or None for silence

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def bos(self) -> tuple[int, ...]:
        """The ids the runtime puts in front of every prompt (BOS, or nothing)."""
        return tuple(self.runtime.resolver.bos)

    def prompt_ids(self, *blocks: Sequence[int]) -> tuple[int, ...]:
        """The ids of a prompt made of id ``blocks``, exactly as the runtime builds them."""
        return self.bos + tuple(t for block in blocks for t in block)

    def repeats_for(self, scenario: str) -> int:
        return self.scenario_repeats.get(scenario, self.repeats)

    def bar(self, total: int, description: str):
        """A progress bar over ``total`` rows (a silent stand-in without ``progress``)."""
        if self.progress is None:
            return _SilentBar()
        return self.progress(total=total, desc=description, unit="row", leave=True)


class _SilentBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def load_model(name_or_path: str, device: str, dtype: str | None, seed: int, attn: str | None):
    """(model, tokenizer): a preset (random weights, seeded) or a local folder / hub id."""
    torch_dtype = DTYPES[dtype] if dtype else None
    if name_or_path in PRESETS:
        return load_preset(name_or_path, device=device, dtype=torch_dtype, seed=seed, attn_implementation=attn)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"attn_implementation": attn} if attn else {}
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype or "auto", **kwargs)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(name_or_path)


def make_harness(model, tokenizer, model_name: str, *, seed: int = 0, warmup: int = 1, repeats: int = 5,
                 scenario_repeats: Mapping[str, int] | None = None, store_bytes: int | None = None,
                 progress: Callable[..., object] | None = None, executor: str = "auto",
                 compile: bool = False) -> Harness:
    """A harness over an already loaded model (a fresh runtime and store)."""
    runtime = Runtime(model, tokenizer, store_bytes, executor=executor, compile=compile)
    vocab = model.config.get_text_config().vocab_size
    return Harness(model, tokenizer, runtime, model_name, TokenSource.for_tokenizer(tokenizer, vocab, seed),
                   warmup, repeats, dict(scenario_repeats or {}), progress)
