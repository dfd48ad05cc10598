"""Split-KV attention over fixed KV buffers, for one step of the static executor.

``split_attention`` reads keys and values in place from buffer views ``[B, H_kv, Lb, D]``
(the first ``Lb`` slots of each row's buffer; see ``spanctx.slots``) under an additive
mask, and computes plain softmax attention (no soft-capping, no sinks). The ``Lb`` slots
are cut into ``chunks`` pieces attended in parallel and merged by their log-sum-exp
("flash-decoding"), so one query over a long cache can keep every SM busy. A piece in
which a row sees no slot is left out of the merge. On an H200 (2026-12-03), pieces merged
from the CUDA kernel's outputs disagreed with one piece by up to 3 logits (fp32; the
errors depended on the stale tokens of unseen slots); with the guard against unseen
pieces, added after that measurement, 2-128 pieces agreed to 6e-5 there (the same night,
``benchmarks/results/serve/gpu_h200_lanes_check_run4_pieces.json``). On CUDA each
piece runs in PyTorch's memory-efficient attention kernel, which takes a mask and returns
the log-sum-exp (never the math backend); on CPU it is float32 arithmetic. The query heads
that share a KV head are folded into the query rows: GQA without copying keys.

Measured on an H100 (benchmarks/results/NOTES-static.md): PyTorch's flash kernel in its
variable-length form with ``seqused_k`` needs no mask, but does not split the keys: one
query over 8K slots took 5x longer than this, so it is not offered.

``works(...)`` runs the kernel once (on CUDA inside a captured graph) on random data
against float64 attention, so an executor never picks a kernel that fails or disagrees
on this machine.
"""

from __future__ import annotations

import torch

from .graphs import collector_paused

__all__ = ["chunk_count", "split_attention", "works"]


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
    bias = mask.reshape(B, 1, M, chunks, n).permute(0, 1, 3, 2, 4)  # [B, 1, C, M, n], a view
    # one row: every KV head reads the same mask (a stride-0 view); several: a copy per head
    bias = bias[0].expand(H, chunks, M, n) if B == 1 else bias.expand(B, H, chunks, M, n).reshape(B * H, chunks, M, n)
    out, lse = _partial_attention(q, k, v, bias, scale)  # [BH, C, M, D], [BH, C, M] float32
    if chunks == 1:
        return out[:, 0].reshape(B, H, M, D)
    # a piece where a row sees no slot is left out of the merge: the kernel's output and
    # log-sum-exp for such a row follow its own conventions (measured wrong on an H200)
    seen = (mask.reshape(B, M, chunks, n) > torch.finfo(mask.dtype).min / 2).any(-1).transpose(1, 2)  # [B, C, M]
    seen = seen[:, None].expand(B, H, chunks, M).reshape(B * H, chunks, M)
    weight = torch.softmax(lse.masked_fill(~seen, float("-inf")), dim=1)[..., None]  # [BH, C, M, 1]
    merged = (out.float().masked_fill(~seen[..., None], 0.0) * weight).sum(dim=1)  # [BH, M, D]
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


def works(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``split_attention`` runs here (on CUDA: inside a captured CUDA graph) and
    agrees with float64 attention on random data: a padded row start, a partly used
    buffer whose unused slots hold junk, pieces no row sees, two query heads per KV head."""
    tokens, length, used_end, start = 8, 1024, 300, 5  # the pieces past 512 are seen by no row
    q = torch.randn(1, 4, tokens, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(1, 2, length, head_dim, device=device, dtype=dtype) for _ in range(2))
    v[:, :, used_end:] = 1e4  # junk in slots nobody sees (a buffer's stale tokens) must not leak
    slots = torch.arange(used_end - tokens, used_end, device=device)
    j = torch.arange(length, device=device)
    visible = (j >= start) & (j <= slots[:, None])  # [Tb, Lb]
    mask = torch.zeros(visible.shape, device=device, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    folded_mask = mask.repeat(2, 1)[None, None]  # query rows folded per KV head: [1, 1, 2 * Tb, Lb]

    def attend() -> torch.Tensor:  # [1, 4, Tb, D]
        return split_attention(q.reshape(1, 2, 2 * tokens, head_dim), k, v, folded_mask, None, 4).reshape(q.shape)

    try:
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                attend()  # warm-up on the capture's stream
            graph = torch.cuda.CUDAGraph()
            with collector_paused(), torch.cuda.graph(graph, stream=stream):
                got = attend()
            graph.replay()
            torch.cuda.synchronize(device)
        else:
            got = attend()
    except RuntimeError:
        return False
    kr, vr = (t.double().repeat_interleave(2, dim=1) for t in (k, v))
    want = torch.softmax(q.double() @ kr.transpose(-1, -2) * head_dim ** -0.5 + mask.double(), -1) @ vr
    return bool((got.double() - want).abs().max() < 0.05)
