"""Attention kernels over fixed KV buffers, for one step of the static executor.

Both read the keys and values in place from buffer views ``[B, H_kv, Lb, D]`` (only the
first ``Lb`` slots of each row's buffer; see ``spanctx.slots``) and compute plain softmax
attention (no soft-capping, no sinks).

- ``split_attention``: split-KV ("flash-decoding") attention under an additive mask.
  The ``Lb`` slots are cut into ``chunks`` pieces attended in parallel, then merged by
  their log-sum-exp. On CUDA each piece runs in PyTorch's memory-efficient attention
  kernel, which takes a mask and returns the log-sum-exp; on CPU it is float32
  arithmetic. Folding the query heads of a KV head into the query rows keeps GQA
  without copying keys.
- ``flash_attention``: PyTorch's flash attention kernel in its variable-length form,
  told each row's used slots (``seqused_k``): no mask at all, bottom-right causal.
  CUDA and 16-bit only.

``works(mode, ...)`` runs a kernel once on random data against float64 attention, so
an executor never picks a kernel that fails or disagrees on this machine.
"""

from __future__ import annotations

import attrs
import torch

__all__ = ["FlashBounds", "chunk_count", "flash_attention", "split_attention", "works"]


@attrs.frozen(eq=False)
class FlashBounds:
    """Per row, the slots a flash step attends: ``[row_start, row_start + used)``, causal
    from the bottom right (query ``t`` of ``Tb`` sees keys up to slot ``slots[t]``)."""

    queries: torch.Tensor  # int32 [2]: (0, Tb), the varlen bounds of one row's queries
    keys: torch.Tensor  # int32 [B, 2]: (row_start, Lb) per row
    used: torch.Tensor  # int32 [B]: slots[-1] + 1 - row_start

    @classmethod
    def of(cls, slots: torch.Tensor, row_start: torch.Tensor, length: int) -> FlashBounds:
        tokens = slots.shape[0]
        queries = torch.arange(0, 2 * tokens, tokens, device=slots.device, dtype=torch.int32)
        starts = row_start.to(torch.int32)
        keys = torch.stack([starts, torch.full_like(starts, length)], dim=1)
        return cls(queries, keys, (slots[-1] + 1 - row_start).to(torch.int32))


def chunk_count(length: int, rows: int, *, target: int, min_chunk: int) -> int:
    """Pieces to cut ``length`` slots into so that ``rows`` (batch x KV heads x query
    blocks) times the pieces reaches ``target`` parallel blocks: a power of two that
    divides ``length`` into pieces of at least ``min_chunk`` slots, each a multiple of 16."""
    chunks = 1
    while (rows * chunks < target and length % (32 * chunks) == 0 and length // (2 * chunks) >= min_chunk):
        chunks *= 2
    return chunks


def split_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                    scale: float | None, chunks: int) -> torch.Tensor:
    """Attention of folded queries over ``chunks`` pieces of the slots, merged exactly.

    query ``[B, H, M, D]`` (folded), key/value ``[B, H, L, D]`` (buffer views), mask
    ``[B, 1, M, L]`` additive. Returns ``[B, H, M, D]`` in the query's dtype.
    """
    B, H, M, D = query.shape
    L = key.shape[2]
    n = L // chunks
    # batch dim B*H, "heads" dim = chunks: q [BH, C, M, D], k/v [BH, C, n, D] (views)
    q = query.reshape(B * H, 1, M, D).expand(B * H, chunks, M, D).contiguous()
    k = key.reshape(B * H, chunks, n, D)
    v = value.reshape(B * H, chunks, n, D)
    bias = mask.reshape(B, 1, M, chunks, n).permute(0, 1, 3, 2, 4).expand(B, H, chunks, M, n)
    bias = bias.reshape(B * H, chunks, M, n)
    out, lse = _partial_attention(q, k, v, bias, scale)  # [BH, C, M, D], [BH, C, M] float32
    if chunks == 1:
        return out[:, 0].reshape(B, H, M, D)
    weight = torch.softmax(lse, dim=1)[..., None]  # [BH, C, M, 1]
    merged = (out.float() * weight).sum(dim=1)  # [BH, M, D]
    return merged.to(query.dtype).reshape(B, H, M, D)


def _partial_attention(q, k, v, bias, scale):
    """Per piece: attention output and its log-sum-exp ``[BH, C, M]`` (float32)."""
    if q.is_cuda:
        # the memory-efficient kernel: takes an additive bias and returns the log-sum-exp
        # (padded to a multiple of 32 rows); SDPA's public entry point returns no LSE
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, False, scale=scale)[:2]
        return out, lse[..., :q.shape[2]]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + bias.float()  # [BH, C, M, n]
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
    return out, lse


def flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: FlashBounds,
                    window: int | None, scale: float | None) -> torch.Tensor:
    """Flash attention over each row's used slots (no mask): query ``[B, Hq, Tb, D]``,
    key/value ``[B, H_kv, Lb, D]`` buffer views; returns ``[B, Tb, Hq, D]``. CUDA, 16-bit.

    One varlen call per row: the row's keys are the buffer rows ``[row_start, row_start +
    used)`` read in place (strided), so nothing is copied or masked; the kernel's causal
    mask is bottom-right aligned, which is the slot order. A sliding window of ``W``
    keeps keys with ``q - k < W`` (transformers' rule).
    """
    B, _, tokens, _ = query.shape
    left = -1 if window is None else window - 1
    rows = []
    for b in range(B):
        out = torch.ops.aten._flash_attention_forward(
            query[b].transpose(0, 1), key[b].transpose(0, 1), value[b].transpose(0, 1), bounds.queries,
            bounds.keys[b], tokens, key.shape[2], 0.0, True, False, scale=scale, window_size_left=left,
            window_size_right=0, seqused_k=bounds.used[b:b + 1])[0]  # [Tb, Hq, D]
        rows.append(out)
    return torch.stack(rows)


def works(mode: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``mode``'s kernel ("split" or "flash") runs here (on CUDA: inside a captured
    CUDA graph) and agrees with float64 attention on random data: a padded row start, a
    partly used buffer, GQA."""
    if mode == "flash" and (device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16)):
        return False
    tokens, length, used_end, start = 8, 512, 300, 5
    q = torch.randn(1, 4, tokens, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(1, 2, length, head_dim, device=device, dtype=dtype) for _ in range(2))
    slots = torch.arange(used_end - tokens, used_end, device=device)
    j = torch.arange(length, device=device)
    visible = (j >= start) & (j <= slots[:, None])  # [Tb, Lb]
    mask = torch.zeros(visible.shape, device=device, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    bounds = FlashBounds.of(slots, torch.tensor([start], device=device), length)
    folded_mask = mask.repeat(2, 1)[None, None]  # query rows folded per KV head: [1, 1, 2 * Tb, Lb]

    def attend() -> torch.Tensor:  # [1, 4, Tb, D]
        if mode == "flash":
            return flash_attention(q, k, v, bounds, None, None).transpose(1, 2)
        return split_attention(q.reshape(1, 2, 2 * tokens, head_dim), k, v, folded_mask, None, 2).reshape(q.shape)

    try:
        got = attend()
        if device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                got = attend()
            graph.replay()
            torch.cuda.synchronize(device)
    except RuntimeError:
        return False
    kr, vr = (t.double().repeat_interleave(2, dim=1) for t in (k, v))
    want = torch.softmax(q.double() @ kr.transpose(-1, -2) * head_dim ** -0.5 + mask.double(), -1) @ vr
    return bool((got.double() - want).abs().max() < 0.05)
