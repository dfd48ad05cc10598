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
import json
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import torch
import xxhash

from ..core.keys import adapter_namespace
from ..core.prompt import PromptResolver, ResolvedPrompt
from ..core.spans import Span
from ..hf import cache_argument, peft_wrapping

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# a saved LoRA weight: "base_model.model.<module path>.lora_A.weight", lora_embedding_B, ...
_LORA_WEIGHT = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?:embedding_)?(?P<part>[AB])(?:\.weight)?$")


class AdapterError(ValueError):
    """A bad adapter folder, an unknown adapter name, or an adapter that does not fit."""


ALORA_STARTS = ("append", "in_prompt")


@attrs.frozen
class AdapterInfo:
    """A loaded adapter. ``invocation_ids`` is set for an aLoRA, None for a plain LoRA;
    ``alora_start`` says where an aLoRA's invocation is (``spanctx.prompt``)."""

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


class AdapterSet:
    """The adapters of one runtime's model; the runtime calls it under its lock.

    Invariant: outside ``activated`` every adapter layer is disabled (the model is the
    base model).
    """

    def __init__(self, model: torch.nn.Module, resolver: PromptResolver, base_namespace: bytes) -> None:
        self.model = model
        self.resolver = resolver
        self.base_namespace = base_namespace
        self._peft = None  # a peft.PeftModel around ``model`` while an adapter is loaded
        self._infos: dict[str, AdapterInfo] = {}
        self._lora_layers: list[torch.nn.Module] = []

    def infos(self) -> dict[str, AdapterInfo]:
        return dict(self._infos)

    def get(self, name: str) -> AdapterInfo:
        info = self._infos.get(name) if isinstance(name, str) else None
        if info is None:
            loaded = ", ".join(repr(n) for n in self._infos) or "none"
            raise AdapterError(f"no adapter named {name!r} (loaded: {loaded}); add it with "
                               "rt.add_adapter(name, path)")
        return info

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
        """Unload ``name``. Unloading the last adapter restores the model's own modules."""
        self.get(name)
        others = [n for n in self._infos if n != name]
        if not others:
            self._peft.base_model.unload()
            self._peft = None
        else:
            self._peft.set_adapter(others[0])  # PEFT warns when the active adapter goes
            self._peft.delete_adapter(name)
        del self._infos[name]
        self._after_change()

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
        """Inject and load the adapter; returns its fingerprint. On failure the model is
        left as it was."""
        from peft import LoraConfig, PeftModel

        try:
            if self._peft is None:
                config = LoraConfig.from_pretrained(str(folder))
                config.inference_mode = True
                with peft_wrapping():
                    self._peft = PeftModel(self.model, config, adapter_name=name)
            self._peft.load_adapter(str(folder), adapter_name=name, is_trainable=False,
                                    torch_device=str(self.model.device))
            return self._fingerprint(name)
        except Exception:
            if self._peft is not None and name in self._peft.peft_config:
                if len(self._peft.peft_config) == 1:
                    self._peft.base_model.unload()
                    self._peft = None
                else:
                    self._peft.delete_adapter(name)
            raise
        finally:
            self._after_change()

    def _after_change(self) -> None:
        """Re-establish the invariant after PEFT changed the model's modules."""
        from peft.tuners.lora import LoraLayer

        self.model.eval()  # new LoRA modules start in training mode (dropout)
        self._lora_layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        if self._peft is not None:
            self._peft.base_model.disable_adapter_layers()

    def _fingerprint(self, name: str) -> bytes:
        """Digest of the adapter's config and of its weights as loaded (dtype included)."""
        from peft import get_peft_model_state_dict

        h = xxhash.xxh3_128()
        config = self._peft.peft_config[name].to_dict()
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        # save_embedding_layers=False: "auto" would look the base model up on the hub
        weights = get_peft_model_state_dict(self._peft, adapter_name=name, save_embedding_layers=False)
        for key, tensor in sorted(weights.items()):
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
        self._switch(activation.name)
        handles = []
        try:
            if activation.alora_starts is not None:
                handles = self._alora_hooks(activation.name, activation.alora_starts)
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._switch(None)

    def _switch(self, name: str | None) -> None:
        """Make ``name`` the one enabled adapter of every LoRA layer (None: all disabled).

        It sets on each layer what PEFT's ``set_adapter`` and ``enable_adapter_layers``
        set, without their requires_grad bookkeeping: that walks every module and
        parameter (55-80 ms per call on the CPU dev machine with 224 LoRA layers, as an
        8B Llama with all linear layers adapted has; this loop: ~1.5 ms), and inference
        does not need it. The tests check that PEFT's own view of the layers agrees.
        """
        for layer in self._lora_layers:
            if name is not None:
                layer._active_adapter = [name]
            layer._disable_adapters = name is None

    def _alora_hooks(self, name: str, starts: tuple[int, ...]) -> list:
        """Hooks that give every model call PEFT's ``alora_offsets`` for a batch whose row
        ``i`` has its invocation at prompt index ``starts[i]``."""
        offsets: list[int] = []  # rewritten before each model call, read by its LoRA layers

        def before_model_call(module, args, kwargs):
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
                    for layer in self._lora_layers if name in layer.lora_A]
        return handles


# -- reading and checking adapter folders -----------------------------------------------

def read_adapter_config(folder: Path) -> dict:
    """The adapter's ``adapter_config.json``, after checking that spanctx can run it."""
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {str(folder)!r} does not exist")
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise FileNotFoundError(f"{str(folder)!r} has no adapter weights ({' or '.join(WEIGHT_FILES)})")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{str(folder)!r} is a {config.get('peft_type')} adapter; spanctx runs LoRA and aLoRA")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{str(folder)!r} trains the base model's biases (bias={config['bias']!r}): "
                           "switching it off would not restore the base model")
    for field in ("modules_to_save", "trainable_token_indices"):
        if config.get(field):
            raise AdapterError(f"{str(folder)!r} has {field}={config[field]!r}: spanctx switches LoRA layers "
                               "only (and for an aLoRA, whole replaced modules would change every token)")
    return config


def adapter_weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor in the adapter's weight file, read without loading it all."""
    safetensors_file = folder / WEIGHT_FILES[0]
    if safetensors_file.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors_file), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    state = torch.load(folder / WEIGHT_FILES[1], map_location="cpu", weights_only=True, mmap=True)
    return {key: tuple(t.shape) for key, t in state.items()}


def check_base_model(model: torch.nn.Module, folder: Path, config: dict) -> None:
    """Refuse an adapter whose LoRA weights do not fit ``model`` (a target module that
    is missing, or has other in/out features); warn when it names another base model."""
    trained_on = config.get("base_model_name_or_path") or ""
    made_for = f" (made for {trained_on!r})" if trained_on else ""
    for key, shape in adapter_weight_shapes(folder).items():
        match = _LORA_WEIGHT.match(key)
        if match is None:
            continue
        path, part = match["path"], match["part"]
        module = _base_module(model, path)
        if module is None:
            raise AdapterError(f"{str(folder)!r} adapts {path}, which this {type(model).__name__} does not "
                               f"have: the adapter is for another base model{made_for}")
        features = _in_out_features(module)
        if features is None:
            continue
        # lora_A: [r, in], lora_B: [out, r]
        want, got = (features[0], shape[1]) if part == "A" else (features[1], shape[0])
        if want != got:
            side = "input" if part == "A" else "output"
            raise AdapterError(f"{str(folder)!r} adapts {path} with {side} size {got}, but this model's has "
                               f"{want}: the adapter is for another base model{made_for}")
    ours = getattr(model.config, "name_or_path", "") or ""
    if trained_on and ours and _model_id(trained_on) != _model_id(ours):
        warnings.warn(f"adapter {str(folder)!r} was trained on {trained_on!r} but the model is {ours!r}; "
                      "its shapes fit, so it is loaded", UserWarning, stacklevel=4)


def _base_module(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    while hasattr(module, "base_layer"):  # already wrapped by PEFT for another adapter
        module = module.base_layer
    return module


def _in_out_features(module: torch.nn.Module) -> tuple[int, int] | None:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, Conv1D):  # weight: [in, out]
        return module.weight.shape[0], module.weight.shape[1]
    return None  # other layer kinds: PEFT checks them when it loads the weights


def _model_id(name_or_path: str) -> str:
    """``org/Model-8B`` and ``/models/model-8b/`` name the same model."""
    return Path(name_or_path.rstrip("/")).name.lower()
