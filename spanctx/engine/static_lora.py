"""PEFT adapters inside the static executor's steps, aLoRA included, as graphs can capture them.

The engine switches an adapter on the way it does for eager calls (the LoRA layers'
active adapter, enabled); the executor reads that state at the start of each call.

- A plain LoRA runs through PEFT's own forward (base + ``lora_B(lora_A(x)) * scaling``),
  which has no host-side step: graphs capture it as is.
- An aLoRA applies only from each row's invocation on. PEFT's aLoRA forward builds that
  row mask on the host (``torch.tensor`` of the offsets, boolean indexing): a graph
  cannot capture it. So during the call the executor switches PEFT's path off on the
  enabled layers and adds the adapter itself in a forward hook, masked by a device
  tensor: a step token of row ``r`` is adapted iff its position is at or after the row's
  invocation start (``starts[r]``, set per call). Rows without an invocation never are.
  Same arithmetic as PEFT's (``lora_B(lora_A(x)) * scaling`` added to the base output),
  computed for every token and multiplied by the mask.

The adapter state is part of a captured graph's key (``AdapterState``): a graph runs the
adapter it was captured with: before an adapter is unloaded, ``StaticExecutor.forget_adapter``
drops its steps.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import attrs
import torch

__all__ = ["AdapterState", "AdapterSteps"]

NEVER = 1 << 62  # the invocation start of a row that has none


@attrs.frozen
class AdapterState:
    """Which adapters the model's enabled LoRA layers run (part of a graph's key)."""

    names: tuple[str, ...]
    layers: int  # enabled LoRA layers
    alora: bool  # some active adapter is an aLoRA: the executor applies it (see module docstring)
    weights: int  # data pointer of the first enabled layer's lora_A weight (a reloaded adapter differs)


class AdapterSteps:
    """The adapter side of a static executor: state per call, the aLoRA row mask per step."""

    def __init__(self, model: torch.nn.Module, *, max_rows: int, max_tokens: int) -> None:
        self.model = model
        device = model.device
        self.starts = torch.full((max_rows,), NEVER, dtype=torch.long, device=device)  # position per row
        self.adapt = torch.zeros(1, max_tokens, dtype=torch.bool, device=device)
        self._tokens = 0  # the running step's token count (checked by the hooks)
        self._is_lora: dict[type, bool] = {}  # module class -> is a PEFT LoRA layer
        # where PEFT can put a LoRA layer: in place of a leaf module (or of a LoRA layer);
        # scanning these costs about a tenth of walking model.modules() on every call
        self._places = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
                        if self._lora(child) or next(child.children(), None) is None]

    def state(self) -> tuple[AdapterState | None, list[torch.nn.Module]]:
        """The enabled adapter state and the enabled LoRA layers (None, [] for the base model)."""
        if "peft" not in sys.modules:  # nothing can have injected a LoRA layer
            return None, []
        lora = [m for m in (getattr(parent, name) for parent, name in self._places) if self._lora(m)]
        enabled = [m for m in lora if not m.disable_adapters and any(name in m.lora_A for name in m.active_adapters)]
        if not enabled:
            return None, []
        names = tuple(sorted({name for layer in enabled for name in layer.active_adapters}))
        alora = any(_is_alora(layer, name) for layer in enabled for name in layer.active_adapters)
        first = enabled[0]
        weights = first.lora_A[next(n for n in first.active_adapters if n in first.lora_A)].weight.data_ptr()
        return AdapterState(names, len(enabled), alora, weights), enabled

    def _lora(self, module: torch.nn.Module) -> bool:
        """Whether ``module`` is a PEFT LoRA layer (cached per class: the scan runs every call)."""
        kind = type(module)
        known = self._is_lora.get(kind)
        if known is None and "peft" not in sys.modules:
            return False  # no LoRA class exists yet
        if known is None:
            from peft.tuners.lora import LoraLayer

            known = self._is_lora[kind] = issubclass(kind, LoraLayer)
        return known

    @contextlib.contextmanager
    def engaged(self, state: AdapterState | None, layers: Sequence[torch.nn.Module],
                starts: Sequence[int] | None) -> Iterator[None]:
        """Within the block, aLoRA layers run through the executor's masked hooks, with row
        ``r``'s invocation at position ``starts[r]`` (None: no row is adapted)."""
        if starts is not None and (state is None or not state.alora):
            raise ValueError("alora_offsets were given, but no aLoRA adapter is switched on")
        if state is None or not state.alora:
            yield
            return
        values = [NEVER if s is None else s for s in starts] if starts is not None else [NEVER] * self.starts.numel()
        self.starts[:len(values)].copy_(torch.tensor(values), non_blocking=True)
        handles = []
        try:
            for layer in layers:
                # what AdapterSet._switch sets: PEFT's own path off (base output only)
                layer._disable_adapters = True
                handles.append(layer.register_forward_hook(self._add_adapters))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer in layers:
                layer._disable_adapters = False

    def write_mask(self, positions: torch.Tensor, who: torch.Tensor) -> None:
        """Inside a step: which of its tokens (positions and rows ``[Tb]``) run with the
        adapter. Padding tokens (a negative row) take row 0's start: their output is junk."""
        self._tokens = positions.shape[0]
        self.adapt[0, :self._tokens].copy_(positions >= self.starts[who.clamp(min=0)])

    def _add_adapters(self, module, args, output: torch.Tensor) -> torch.Tensor:
        x = args[0]  # [B, T, in]
        if x.dim() != 3 or x.shape[1] != self._tokens:
            raise RuntimeError(f"an adapted {type(module).__name__} saw input {list(x.shape)} in a step of "
                               f"{self._tokens} tokens: aLoRA layers after the logits cut are not supported")
        mask = self.adapt[:x.shape[0], :x.shape[1], None]
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            lora_A, lora_B = module.lora_A[name], module.lora_B[name]
            delta = lora_B(lora_A(module.lora_dropout[name](x.to(lora_A.weight.dtype)))) * module.scaling[name]
            output = output + (delta * mask if _is_alora(module, name) else delta).to(output.dtype)
        return output


def _is_alora(layer, name: str) -> bool:
    from peft.tuners.lora.variants import ALoraLinearVariant

    return isinstance(getattr(layer, "lora_variant", {}).get(name), ALoraLinearVariant)
