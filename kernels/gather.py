"""Block-sparse attention by gathering each query block's listed key blocks: the CPU path.

The torch reference (``reference.py``) builds the dense ``S_q x S_kv`` mask and scores every key, so its cost
grows with the whole cache even when a query block lists two key blocks. Here each query block gathers only its
``width`` listed key blocks, ``(B, H, n_q, width * block_n, D)``, and attends over them: work and memory are
``S_q x width x block_n``, independent of the cache length. Semantics are the reference's: entries past
``count`` are ignored, a block listed twice counts once, keys past ``S_kv`` in a ragged last block are masked,
a query with no visible key gets zeros (and ``lse = -inf``).

Example:
    >>> import torch
    >>> from genkv.kernels import block_sparse_attention_torch
    >>> q, k, v = torch.randn(1, 40, 2, 16), torch.randn(1, 96, 2, 16), torch.randn(1, 96, 2, 16)
    >>> idx = torch.tensor([[0, 2], [1, 2], [2, 0]], dtype=torch.int32).expand(1, 2, 3, 2)
    >>> cnt = torch.tensor([2, 1, 2], dtype=torch.int32).expand(1, 2, 3)
    >>> args = dict(block_m=16, block_n=32)
    >>> torch.allclose(block_sparse_attention_gather(q, k, v, idx, cnt, **args),
    ...                block_sparse_attention_torch(q, k, v, idx, cnt, **args), atol=1e-6)
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _blocks(x: torch.Tensor, size: int, count: int) -> torch.Tensor:
    """(B, S, H, D) -> (B, H, count, size, D), zero-padded to ``count * size`` rows."""
    b, s, h, d = x.shape
    x = F.pad(x, (0, 0, 0, 0, 0, count * size - s))
    return x.view(b, count, size, h, d).permute(0, 3, 1, 2, 4)


def _gather_with_history(history, x: torch.Tensor, position: torch.Tensor, which: str,
                         compute: torch.dtype) -> torch.Tensor:
    """Rows at combined positions (B, H, n_q, W, bn) -> (B, H, n_q, W, bn, D): [0, S_h) dequantized from the
    quantized history (only these rows), [S_h, S_h + S_cur) from ``x`` (the current chunk); rows past the end
    repeat a real one (finite: the caller masks them)."""
    from .quant_kv import gather_history_rows

    rows = gather_history_rows(history, position, which).to(compute)
    if x.shape[1] == 0:
        return rows
    batch, heads = x.shape[0], x.shape[2]
    b_idx = torch.arange(batch, device=x.device).view(batch, 1, 1, 1, 1)
    h_idx = torch.arange(heads, device=x.device).view(1, heads, 1, 1, 1)
    current = x[b_idx, (position - history.length).clamp(0, x.shape[1] - 1), h_idx].to(compute)
    return torch.where((position < history.length)[..., None], rows, current)


def block_sparse_attention_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    *,
    key_bias: torch.Tensor | None = None,
    scale: float | None = None,
    block_m: int = 128,
    block_n: int = 128,
    return_lse: bool = False,
    history=None,
):
    """Block-sparse attention on (B, S, H, D) tensors over gathered key blocks (see the module docstring).

    ``history`` (a ``QuantizedKV`` of S_h tokens): as in the Triton kernel, positions [0, S_h) come from it
    (only the gathered blocks are dequantized) and ``k`` / ``v`` hold [S_h, S_h + S_cur); lists and
    ``key_bias`` index the combined sequence.
    """
    batch, s_q, heads, dim = q.shape
    s_kv = k.shape[1] + (0 if history is None else history.length)
    n_q, n_kv = math.ceil(s_q / block_m), math.ceil(s_kv / block_n)
    # Lists are padded to every block; only the longest count matters (one host read: this is the CPU path).
    width = int(kv_block_counts.max()) if kv_block_counts.numel() else 0
    width = max(1, min(width, kv_block_indices.shape[-1]))
    kv_block_indices = kv_block_indices[..., :width]
    scale = scale if scale is not None else 1.0 / math.sqrt(dim)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    device = q.device

    listed = torch.arange(width, device=device) < kv_block_counts[..., None].long()  # (B, H, n_q, W)
    index = kv_block_indices.long().clamp(0, max(n_kv - 1, 0))
    earlier = torch.ones(width, width, dtype=torch.bool, device=device).tril(-1)  # [j, i]: i listed before j
    repeated = ((index[..., :, None] == index[..., None, :]) & earlier & listed[..., None, :]).any(-1)
    listed = listed & ~repeated & (kv_block_indices.long() < n_kv)

    queries = _blocks(q.to(compute), block_m, n_q)  # (B, H, n_q, bm, D)
    b_idx = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h_idx = torch.arange(heads, device=device).view(1, heads, 1, 1)
    position = index[..., None] * block_n + torch.arange(block_n, device=device)  # (B, H, n_q, W, bn)
    if history is None:
        keys = _blocks(k.to(compute), block_n, n_kv)[b_idx, h_idx, index]  # (B, H, n_q, W, bn, D)
        values = _blocks(v.to(compute), block_n, n_kv)[b_idx, h_idx, index]
    else:
        keys = _gather_with_history(history, k, position, "keys", compute)
        values = _gather_with_history(history, v, position, "values", compute)

    logits = torch.einsum("bhqmd,bhqwnd->bhqmwn", queries, keys) * scale  # (B, H, n_q, bm, W, bn)
    visible = listed[..., None] & (position < s_kv)
    if key_bias is not None:
        bias = F.pad(key_bias.to(compute).permute(0, 2, 1), (0, n_kv * block_n - s_kv))  # (B, H, n_kv * bn)
        gathered = bias.gather(2, position.flatten(2)).view(position.shape)
        logits = logits + gathered[:, :, :, None]
    logits = logits.masked_fill(~visible[:, :, :, None], -float("inf")).flatten(4)  # (B, H, n_q, bm, W * bn)
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.einsum("bhqmk,bhqkd->bhqmd", weights, values.flatten(3, 4))  # (B, H, n_q, bm, D)
    out = out.permute(0, 2, 3, 1, 4).reshape(batch, n_q * block_m, heads, dim)[:, :s_q].to(q.dtype)
    if return_lse:
        return out, lse.reshape(batch, heads, n_q * block_m)[..., :s_q].float()
    return out
