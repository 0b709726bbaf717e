"""Torch references for the block-sparse kernels: simple, obviously correct, any dtype, any device.

They build the dense mask a block list describes and run plain softmax attention, so they cost
O(S_q * S_kv) memory: meant for tests, CPU runs and small shapes, not for Wan-scale GPU work.
"""

from __future__ import annotations

import math

import torch


def block_mask_from_lists(
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    q_len: int,
    kv_len: int,
    block_m: int,
    block_n: int,
) -> torch.Tensor:
    """Boolean (B, H, S_q, S_kv) mask: True where a query's block lists the key's block (first ``count`` entries)."""
    b, h, n_q, width = kv_block_indices.shape
    n_kv = math.ceil(kv_len / block_n)
    used = torch.arange(width, device=kv_block_indices.device) < kv_block_counts[..., None].long()
    index = torch.where(used, kv_block_indices.long(), n_kv)  # unused entries go to a spill column
    blocks = torch.zeros(b, h, n_q, n_kv + 1, dtype=torch.bool, device=kv_block_indices.device)
    blocks.scatter_(3, index, True)
    blocks = blocks[..., :n_kv]
    mask = blocks.repeat_interleave(block_m, dim=2)[:, :, :q_len]
    return mask.repeat_interleave(block_n, dim=3)[..., :kv_len]


def block_sparse_attention_torch(
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
    """Reference block-sparse attention on (B, S, H, D) tensors; rows with no visible key give zeros.

    ``history`` (a ``QuantizedKV``): dequantized whole and put before ``k`` / ``v`` (the dense reference: it
    copies the history in full precision, unlike the kernels).
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if history is not None:
        from .quant_kv import dequantize

        k_hist, v_hist = dequantize(history)
        k, v = torch.cat([k_hist.to(compute), k.to(compute)], 1), torch.cat([v_hist.to(compute), v.to(compute)], 1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.to(compute), k.to(compute)) * scale
    if key_bias is not None:
        logits = logits + key_bias.to(compute).permute(0, 2, 1)[:, :, None, :]
    mask = block_mask_from_lists(kv_block_indices, kv_block_counts, q.shape[1], k.shape[1], block_m, block_n)
    logits = logits.masked_fill(~mask, -float("inf"))
    lse = torch.logsumexp(logits, dim=-1)  # (B, H, S_q); -inf for empty rows
    weights = torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v.to(compute)).to(q.dtype)
    return (out, lse.float()) if return_lse else out


def merge_attention_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attentions over disjoint key sets: ``o = sum_i exp(lse_i - lse) o_i`` (outputs (B, S, H, D)).

    A partial's rows with ``lse = -inf`` saw no key: their output is not read (it may be anything, NaN included).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    wa = torch.exp(lse_a - safe).permute(0, 2, 1)[..., None]
    wb = torch.exp(lse_b - safe).permute(0, 2, 1)[..., None]
    out = torch.where(wa > 0, out_a.float() * wa, 0.0) + torch.where(wb > 0, out_b.float() * wb, 0.0)
    return out.to(out_a.dtype), lse
