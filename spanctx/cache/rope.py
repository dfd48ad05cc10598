"""Moving cached keys along positions: RoPE re-rotation by a position delta.

Cached keys are post-RoPE: the key of a token at position ``p`` is ``s * R(p * theta) k``,
with ``R`` the half-split (``rotate_half``) rotation of the first ``rotary_dim`` channels,
``theta`` the rotary embedding's ``inv_freq`` and ``s`` its attention scaling (yarn).
Since ``R((p + d) * theta) = R(d * theta) R(p * theta)``, moving a cached key by ``d``
positions is one rotation by ``d * theta``; values and the non-rotary channels
(partial rotary, Phi-style) do not change, and ``s`` is already inside the key.

That is exact when ``theta`` is fixed: default, linear, llama3 and yarn rope. It is not
for dynamic NTK and longrope (their ``theta`` depends on the sequence length), and
models with absolute position embeddings (GPT-2) cannot move a key at all: for those,
``KeyMover.reason`` says why, and the runtime recomputes spans at their place instead.

``key_mover(model)`` reads each layer's ``inv_freq`` (per layer type for Gemma3-style
models) and then checks on the model itself that a rotated key equals the key computed
at the moved position, so an unknown rope layout is refused, never silently wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import torch

from .span_kv import SpanKV

MOVABLE_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
UNMOVABLE_ROPE_TYPES = {
    "dynamic": "dynamic NTK rope: its frequencies depend on the sequence length",
    "longrope": "longrope: its frequencies depend on the sequence length",
}
PROBE_TOKENS = 8
PROBE_DELTA = 997


def rotation(delta: int | torch.Tensor, inv_freq: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of the rotation by ``delta`` positions: ``[rotary_dim]`` for an int
    delta, ``[S, rotary_dim]`` for a per-token delta ``[S]``. Angles are formed in float64."""
    freq = inv_freq.to(device=device, dtype=torch.float64)  # [rotary_dim / 2]
    if isinstance(delta, torch.Tensor):
        angle = delta.to(device=device, dtype=torch.float64)[:, None] * freq  # [S, rotary_dim / 2]
    else:
        angle = delta * freq
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos().float(), angle.sin().float()


def rotate_keys(keys: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor,
                trig: tuple[torch.Tensor, torch.Tensor] | None = None, out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """``keys`` moved by ``delta`` positions (an int, or ``[S]`` per token): a new tensor,
    or written into ``out`` (same shape; not ``keys``); ``keys`` is not changed. ``trig``:
    ``rotation(delta, inv_freq, ...)`` if already formed.

    keys: ``[B, H, S, D]`` post-RoPE, half-split layout on the first ``2 * len(inv_freq)``
    channels. The rotation is done in float32.
    """
    rotary_dim = 2 * inv_freq.numel()
    if rotary_dim > keys.shape[-1]:
        raise ValueError(f"inv_freq covers {rotary_dim} channels, keys have {keys.shape[-1]}")
    cos, sin = trig if trig is not None else rotation(delta, inv_freq, keys.device)
    k = keys[..., :rotary_dim].float()  # [B, H, S, rotary_dim]
    half = rotary_dim // 2
    k_rotated_half = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    out = torch.empty_like(keys) if out is None else out
    torch.addcmul(k * cos, k_rotated_half, sin, out=out[..., :rotary_dim])  # rounded to keys' dtype on writing
    if rotary_dim < keys.shape[-1]:
        out[..., rotary_dim:].copy_(keys[..., rotary_dim:])
    return out


@attrs.frozen(eq=False)
class KeyMover:
    """How (and whether) one model's cached keys move along positions.

    ``inv_freq`` holds one tensor per layer when keys can move; otherwise it is empty and
    ``reason`` says why.
    """

    inv_freq: tuple[torch.Tensor, ...]
    reason: str | None = None

    @property
    def movable(self) -> bool:
        return self.reason is None

    def shift(self, kv: SpanKV, delta: int | torch.Tensor) -> SpanKV:
        """``kv`` moved by ``delta`` positions (an int, or ``[S]``: one delta per token, so
        several spans move in one rotation per layer): new key tensors, the same values."""
        if isinstance(delta, int) and delta == 0:
            return kv
        if not self.movable:
            raise ValueError(f"cannot move keys on this model: {self.reason}")
        if len(kv.keys) != len(self.inv_freq):
            raise ValueError(f"span has {len(kv.keys)} layers, the model {len(self.inv_freq)}")
        # layers that share a frequency tensor rotate as one stacked tensor: a dozen kernel
        # launches per span instead of a dozen per layer (an 8B model has 32 layers)
        groups: dict[int, list[int]] = {}
        for i, f in enumerate(self.inv_freq):
            groups.setdefault(id(f), []).append(i)
        keys: list[torch.Tensor | None] = [None] * len(kv.keys)
        for layers in groups.values():
            f = self.inv_freq[layers[0]]
            shapes = {tuple(kv.keys[i].shape) for i in layers}
            if len(shapes) > 1:  # layers of other shapes: one at a time
                for i in layers:
                    keys[i] = rotate_keys(kv.keys[i], delta, f)
                continue
            moved = rotate_keys(torch.stack([kv.keys[i] for i in layers]), delta, f)  # [G, B, H, S, D]
            for i, k in zip(layers, moved.unbind(0)):
                keys[i] = k
        return SpanKV(tuple(keys), kv.values)

    def shift_into(self, kv: SpanKV, delta: int, out: Sequence[torch.Tensor],
                   out_stacked: torch.Tensor | None = None) -> None:
        """Write ``kv``'s keys moved by ``delta`` into ``out`` (per layer; ``out_stacked``:
        the same memory as one ``[L, ...]`` tensor, when there is one): with both sides
        stacked, the rotation's last step writes straight into ``out``, no moved copy."""
        if not self.movable:
            raise ValueError(f"cannot move keys on this model: {self.reason}")
        if out_stacked is not None and kv.stacked_keys is not None and len(set(map(id, self.inv_freq))) == 1:
            rotate_keys(kv.stacked_keys, delta, self.inv_freq[0], out=out_stacked)  # one frequency, every layer
        else:
            torch._foreach_copy_(list(out), list(self.shift(kv, delta).keys))


def key_mover(model, kv_at: Callable[[torch.Tensor, torch.Tensor], SpanKV]) -> KeyMover:
    """Read ``model``'s per-layer rope frequencies and check, on the model, that rotating
    a cached key reproduces the key computed at the moved position. ``kv_at(ids,
    positions)`` runs ``ids`` ``[1, T]`` at ``positions`` ``[T]`` with no past and returns
    their KV (the engine's forward: this module never calls the model itself)."""
    inv_freq, reason = _layer_inv_freq(model)
    if reason is not None:
        return KeyMover((), reason)
    error = _probe_error(model, kv_at, inv_freq)
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if not error <= tolerance:
        return KeyMover((), f"rotating cached keys does not reproduce this model's keys (relative error "
                            f"{error:.2g} > {tolerance:g}): unknown rope layout")
    return KeyMover(inv_freq)


def _layer_inv_freq(model) -> tuple[tuple[torch.Tensor, ...], str | None]:
    """Per layer ``inv_freq``, or a reason why the model's keys cannot be moved."""
    text = model.config.get_text_config()
    params = getattr(text, "rope_parameters", None)
    rotaries = [m for m in model.modules() if any(_is_inv_freq(name) for name in m._buffers)]
    if not params or not rotaries:
        return (), "no rotary position embedding (absolute positions): a span's KV holds its positions"
    rope_types = {params["rope_type"]} if "rope_type" in params else {p["rope_type"] for p in params.values() if p}
    for rope_type in sorted(rope_types):
        if rope_type not in MOVABLE_ROPE_TYPES:
            return (), UNMOVABLE_ROPE_TYPES.get(rope_type, f"rope type {rope_type!r} is not known to move exactly")
    if len(rotaries) != 1:
        return (), f"found {len(rotaries)} rotary embeddings: cannot tell which one each layer uses"
    buffers = rotaries[0]._buffers
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    by_type: dict[str, torch.Tensor] = {}  # one copy per layer type: layers of a type share it
    for layer_type in layer_types:
        freq = buffers.get(f"{layer_type}_inv_freq", buffers.get("inv_freq"))
        if freq is None:
            return (), f"no rope frequencies for layer type {layer_type!r}"
        by_type.setdefault(layer_type, freq.detach().clone())
    return tuple(by_type[t] for t in layer_types), None


def _is_inv_freq(name: str) -> bool:
    return name == "inv_freq" or (name.endswith("_inv_freq") and not name.endswith(("original_inv_freq",
                                                                                      "long_inv_freq")))


def _probe_error(model, kv_at: Callable[[torch.Tensor, torch.Tensor], SpanKV],
                 inv_freq: tuple[torch.Tensor, ...]) -> float:
    """Worst relative (Frobenius) error, over layers, between a span's keys computed at
    ``PROBE_DELTA`` and its keys computed at 0 then rotated (no past either way)."""
    text = model.config.get_text_config()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, text.vocab_size, (1, PROBE_TOKENS), generator=generator).to(model.device)
    limit = getattr(text, "max_position_embeddings", None) or 2 * PROBE_DELTA
    delta = min(PROBE_DELTA, limit - PROBE_TOKENS)
    positions = torch.arange(PROBE_TOKENS, device=model.device)
    with torch.inference_mode():
        at_zero, moved = kv_at(ids, positions).keys, kv_at(ids, positions + delta).keys
    if len(at_zero) != len(inv_freq):
        return float("inf")
    errors = [(rotate_keys(k0, delta, f).float() - k1.float()).norm() / k1.float().norm()
              for k0, k1, f in zip(at_zero, moved, inv_freq)]
    return max(e.item() for e in errors)
