"""PEFT adapters (LoRA and aLoRA) on a runtime's one base model, switched per call.

``AdapterSet`` loads adapters into the runtime's model in place: PEFT injects LoRA
layers once per adapter, and switching adapters never reloads anything. Between calls
every adapter layer is disabled, so base calls run the base model exactly.

How adapter KV is keyed, so that the store is never tainted:
- Base spans live under the runtime's base namespace, computed once at init, before
  any adapter was injected.
- A LoRA changes every token's KV: all of its spans live under the adapter's own
  namespace (``keys.adapter_namespace`` of the base namespace and a digest of the
  adapter's config and loaded weights) and never mix with base entries.
- An aLoRA changes only the tokens from its invocation on (PEFT applies it from the
  last occurrence of ``alora_invocation_tokens``). The context before the invocation
  keeps its base keys and reuses base entries as they are; the invocation is appended
  (unless the context already ends with it) as one span under the adapter's namespace.
  The base part always ends before the invocation starts: when the context ends with
  the invocation, those tokens move out of the base spans into the adapter span.

Execution of an aLoRA call: PEFT's aLoRA layers take ``alora_offsets``, per batch row
the number of a forward's LAST tokens that run with the adapter (PEFT 0.21 switches it on
for columns ``>= T - offset`` of a ``T``-token forward; padding after a row's end is
counted, an offset past ``T`` is clipped to ``T``). A forward pre-hook on the model
computes it for every model call from where the call sits in each row's prompt (tokens
already in its cache + its length - that row's invocation start), and pre-hooks on the
LoRA layers pass it on. So reused KV, compute steps, the prefill, every decode step of
``generate`` and a right-padded batch of rows with their own invocation starts (the
batched checks) switch the adapter on exactly at each row's invocation, whatever was
cached.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import torch
import xxhash

from ..core.keys import adapter_namespace
from ..core.prompt import PromptResolver, ResolvedPrompt
from ..core.spans import Span
from ..engine.slots import STEP_KWARG
from ..hf import cache_argument, peft_wrapping
from .adapter_files import WEIGHT_FILES, AdapterError, check_base_model, read_adapter_config

ALORA_STARTS = ("append", "in_prompt")


@attrs.frozen
class AdapterInfo:
    """A loaded adapter. ``invocation_ids`` is set for an aLoRA, None for a plain LoRA;
    ``alora_start`` says where an aLoRA's invocation is (``spanctx.core.prompt``)."""

    name: str
    path: str
    invocation_ids: tuple[int, ...] | None
    namespace: bytes = attrs.field(repr=False)
    alora_start: str = "append"

    @property
    def is_alora(self) -> bool:
        return self.invocation_ids is not None


@attrs.frozen
class Activation:
    """What one call switches on: an adapter and, for an aLoRA, the prompt index of its
    invocation in each batch row (tokens before it run on base weights)."""

    name: str
    alora_starts: tuple[int, ...] | None

    @property
    def before_invocation(self) -> Activation | None:
        """What runs prompt tokens that come before every row's invocation: base weights
        for an aLoRA, the adapter itself for a plain LoRA."""
        return None if self.alora_starts is not None else self


def batch_activation(activations: Sequence[Activation | None]) -> Activation | None:
    """The activation of one batch whose row ``i`` is the call of ``activations[i]``;
    every row must switch on the same adapter (or none)."""
    first = activations[0]
    if first is None or first.alora_starts is None:
        if any(a != first for a in activations):
            raise ValueError("every row of a batch must use the same adapter")
        return first
    if any(a is None or a.name != first.name or a.alora_starts is None for a in activations):
        raise ValueError("every row of a batch must use the same adapter")
    return Activation(first.name, tuple(start for a in activations for start in a.alora_starts))


class ModelLoras:
    """The LoRA layers PEFT injected into one model, shared by every runtime over it
    (``ModelLoras.of``). Each runtime loads its adapters under PEFT names of its own
    (``AdapterSet``), so one runtime's loads and unloads never touch another's adapters;
    the injected layers go when the last adapter of any runtime goes.

    Invariant: outside a call's ``AdapterSet.activated`` every adapter layer is disabled.
    Calls of two runtimes over one model with adapters must not overlap in time: the
    switch of enabled adapter is the model's (see docs/tenancy.md).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.peft = None  # a peft.PeftModel around ``model`` while an adapter is loaded
        self.layers: list[torch.nn.Module] = []
        self.lock = threading.RLock()

    def __getstate__(self) -> dict:  # a copied or pickled model gets its own lock
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, lock=threading.RLock())

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelLoras:
        # in the model's __dict__, not as an attribute: a PeftModel must not become a submodule
        return model.__dict__.setdefault("_spanctx_loras", cls(model))

    def load(self, peft_name: str, folder: Path):
        """Inject (the first time) and load the adapter in ``folder`` as ``peft_name``;
        PEFT's load result (missing and unexpected keys). On failure nothing is left."""
        from peft import LoraConfig, PeftModel

        with self.lock:
            try:
                if self.peft is None:
                    config = LoraConfig.from_pretrained(str(folder))
                    config.inference_mode = True
                    with peft_wrapping():
                        self.peft = PeftModel(self.model, config, adapter_name=peft_name)
                return self.peft.load_adapter(str(folder), adapter_name=peft_name, is_trainable=False,
                                              torch_device=str(self.model.device))
            except Exception:
                self.delete(peft_name)
                raise
            finally:
                self.refresh()

    def delete(self, peft_name: str) -> None:
        """Unload ``peft_name`` (if loaded); the last one restores the model's own modules."""
        with self.lock:
            if self.peft is None or peft_name not in self.peft.peft_config:
                return
            others = [n for n in self.peft.peft_config if n != peft_name]
            if not others:
                self.peft.base_model.unload()
                self.peft = None
            else:
                self.peft.set_adapter(others[0])  # PEFT warns when the active adapter goes
                self.peft.delete_adapter(peft_name)
            self.refresh()

    def refresh(self) -> None:
        """Re-establish the invariant after PEFT changed the model's modules."""
        from peft.tuners.lora import LoraLayer

        self.model.eval()  # new LoRA modules start in training mode (dropout)
        self.layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        if self.peft is not None:
            self.peft.base_model.disable_adapter_layers()


_runtime_serials = itertools.count()


class AdapterSet:
    """The adapters of one runtime; the runtime calls it under its lock. Its adapters are
    its own: another runtime over the same model never sees, changes or unloads them
    (they share the injected layers, ``ModelLoras``, under other PEFT names).

    Invariant: outside ``activated`` every adapter layer is disabled (the model is the
    base model).
    """

    def __init__(self, model: torch.nn.Module, resolver: PromptResolver, base_namespace: bytes) -> None:
        self.model = model
        self.resolver = resolver
        self.base_namespace = base_namespace
        self._loras = ModelLoras.of(model)
        self._serial = next(_runtime_serials)
        self._infos: dict[str, AdapterInfo] = {}

    def infos(self) -> dict[str, AdapterInfo]:
        return dict(self._infos)

    def get(self, name: str) -> AdapterInfo:
        info = self._infos.get(name) if isinstance(name, str) else None
        if info is None:
            loaded = ", ".join(repr(n) for n in self._infos) or "none"
            raise AdapterError(f"no adapter named {name!r} (loaded: {loaded}); add it with "
                               "rt.add_adapter(name, path)")
        return info

    def peft_name(self, name: str) -> str:
        """The PEFT adapter name of this runtime's adapter ``name`` (unique per runtime)."""
        return f"{name}__rt{self._serial}"

    # -- loading -----------------------------------------------------------------------

    def add(self, name: str, path: str | Path, invocation: str | None = None,
            alora_start: str = "append") -> AdapterInfo:
        """Load the PEFT LoRA or aLoRA adapter folder ``path`` as ``name``.

        ``invocation``, when given, is the aLoRA's invocation text: it must tokenize (as a
        span) to the adapter's configured ``alora_invocation_tokens``.
        """
        if not isinstance(name, str) or not name:
            raise AdapterError(f"an adapter name is a non-empty str, got {name!r}")
        if alora_start not in ALORA_STARTS:
            raise AdapterError(f"alora_start is one of {ALORA_STARTS}, got {alora_start!r}")
        if name in self._infos:
            raise AdapterError(f"an adapter named {name!r} is loaded already; unload it first")
        folder = Path(path)
        config = read_adapter_config(folder)
        invocation_ids = self._invocation_ids(name, config, invocation)
        check_base_model(self.model, folder, config)
        namespace = adapter_namespace(self.base_namespace, self._load(name, folder))
        info = AdapterInfo(name, str(folder), invocation_ids, namespace, alora_start)
        self._infos[name] = info
        return info

    def remove(self, name: str) -> None:
        """Unload ``name``. Unloading the model's last adapter restores its own modules."""
        self.get(name)
        self._loras.delete(self.peft_name(name))
        del self._infos[name]

    def _invocation_ids(self, name: str, config: dict, invocation: str | None) -> tuple[int, ...] | None:
        configured = config.get("alora_invocation_tokens")
        if configured is None:
            if invocation is not None:
                raise AdapterError(f"adapter {name!r} is a plain LoRA: it has no invocation to match "
                                   f"{invocation!r} against")
            return None
        ids = tuple(configured)
        vocab = self.resolver.vocab_size
        if not ids or any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise AdapterError(f"adapter {name!r}: alora_invocation_tokens {list(ids)} are not token ids of "
                               f"this model's vocabulary of {vocab}")
        if invocation is not None:
            got = self.resolver.span_ids(Span(invocation))
            if got != ids:
                raise AdapterError(f"invocation {invocation!r} tokenizes to {list(got)}, but adapter {name!r} is "
                                   f"configured for {list(ids)}: the adapter would not activate on it")
        return ids

    def _load(self, name: str, folder: Path) -> bytes:
        """Inject and load the adapter, refusing a file whose weights are missing,
        unexpected or not finite; returns its fingerprint. On failure the model is left
        as it was."""
        peft_name = self.peft_name(name)
        result = self._loras.load(peft_name, folder)
        try:
            file = next(str(folder / f) for f in WEIGHT_FILES if (folder / f).is_file())
            missing = [k for k in result.missing_keys if f".{peft_name}" in k]
            if missing or result.unexpected_keys:
                problems = ([f"{len(missing)} missing (e.g. {missing[0].replace(f'.{peft_name}', '')})"]
                            if missing else []) + (
                    [f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})"]
                    if result.unexpected_keys else [])
                raise AdapterError(f"{file!r} does not hold the weights its config names: {'; '.join(problems)}; "
                                   "is the file cut short, or saved for another configuration?")
            return self._fingerprint(peft_name, file)
        except Exception:
            self._loras.delete(peft_name)
            raise

    def _fingerprint(self, peft_name: str, file: str) -> bytes:
        """Digest of the adapter's config and of its weights as loaded (dtype included);
        refuses weights that are not finite."""
        from peft import get_peft_model_state_dict

        peft = self._loras.peft
        h = xxhash.xxh3_128()
        config = peft.peft_config[peft_name].to_dict()
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        # save_embedding_layers=False: "auto" would look the base model up on the hub
        weights = get_peft_model_state_dict(peft, adapter_name=peft_name, save_embedding_layers=False)
        for key, tensor in sorted(weights.items()):
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"{file!r}: {key} holds non-finite values (NaN or inf)")
            flat = tensor.detach().reshape(-1).contiguous().cpu()
            h.update(f"{key}:{flat.dtype}:{tuple(tensor.shape)}".encode())
            h.update(flat.view(torch.uint8).numpy().tobytes())
        return h.digest()

    # -- calls -------------------------------------------------------------------------

    def activation(self, prompt: ResolvedPrompt, name: str | None) -> Activation | None:
        """What a call of adapter ``name`` (None: the base model) on ``prompt`` switches on."""
        if name is None:
            return None
        info = self.get(name)
        return Activation(name, None if info.invocation_ids is None else (prompt.invocation_start,))

    @contextlib.contextmanager
    def activated(self, activation: Activation | None) -> Iterator[None]:
        """Run the block with ``activation``'s adapter as the only one on (None: base)."""
        if activation is None:
            yield
            return
        self._switch(self.peft_name(activation.name))
        handles = []
        try:
            if activation.alora_starts is not None:
                handles = self._alora_hooks(self.peft_name(activation.name), activation.alora_starts)
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._switch(None)

    def _switch(self, name: str | None) -> None:
        """Make PEFT adapter ``name`` the one enabled adapter of every LoRA layer (None: all disabled).

        It sets on each layer what PEFT's ``set_adapter`` and ``enable_adapter_layers``
        set, without their requires_grad bookkeeping: that walks every module and
        parameter (55-80 ms per call on the CPU dev machine with 224 LoRA layers, as an
        8B Llama with all linear layers adapted has; this loop: ~1.5 ms), and inference
        does not need it. The tests check that PEFT's own view of the layers agrees.
        """
        for layer in self._loras.layers:
            if name is not None:
                layer._active_adapter = [name]
            layer._disable_adapters = name is None

    def _alora_hooks(self, name: str, starts: tuple[int, ...]) -> list:
        """Hooks that give every model call PEFT's ``alora_offsets`` (PEFT adapter ``name``) for a batch whose row
        ``i`` has its invocation at prompt index ``starts[i]``."""
        offsets: list[int] = []  # rewritten before each model call, read by its LoRA layers

        def before_model_call(module, args, kwargs):
            if STEP_KWARG in kwargs:  # a static executor's step: it applies the aLoRA itself
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise AdapterError("an aLoRA call needs input_ids (its invocation is found by token)")
            if ids.shape[0] != len(starts):
                raise AdapterError(f"an aLoRA call activated for {len(starts)} rows got a batch of {ids.shape[0]}")
            cache = cache_argument(kwargs)
            done = 0 if cache is None else cache.get_seq_length()
            # ids: [B, T]; every row's call covers its prompt tokens [done, done + T) (right
            # padding included), and PEFT adapts the last offsets[i] of them
            offsets[:] = [max(0, done + ids.shape[1] - start) for start in starts]

        def before_lora_layer(module, args, kwargs):
            kwargs["alora_offsets"] = offsets
            return args, kwargs

        handles = [self.model.register_forward_pre_hook(before_model_call, with_kwargs=True)]
        handles += [layer.register_forward_pre_hook(before_lora_layer, with_kwargs=True)
                    for layer in self._loras.layers if name in layer.lora_A]
        return handles
