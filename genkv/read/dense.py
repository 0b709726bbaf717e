"""Dense readers: every query attends to every kept key (self) or every prompt token (cross)."""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn


class DenseSelfAttention:
    """Attention of the chunk's queries over ``history + chunk`` through diffusers' dispatcher.

    Without a key bias this is exactly the call ``WanAttnProcessor`` makes, so the model's attention backend
    (``set_attention_backend``, ``attention_backend(...)``) and its parallel config keep working. A key bias
    (merged keys' ``log(count)``, ``-inf`` holes) becomes an additive mask broadcast over the queries.
    """

    def graph_signature(self, store: Any) -> tuple:
        """Every forward takes the same path (no host work): any two of a chunk may share a CUDA graph."""
        return ("dense",)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_bias: torch.Tensor | None,
        *,
        backend: Any = None,
        parallel_config: Any = None,
        layer_index: int = 0,
        store: Any = None,
        history: Any = None,
    ) -> torch.Tensor:
        if history is not None:  # a quantized cache: key / value hold the chunk, the history stays codes
            return attend_quantized(query, key, value, key_bias, history)
        mask = None
        if key_bias is not None:
            if _biased_dense_on_triton(query):
                return _dense_with_bias_triton(query, key, value, key_bias)
            mask = key_bias.permute(0, 2, 1).unsqueeze(2).to(query.dtype)  # (B, H, 1, S_kv)
        return dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=0.0,
            is_causal=False,
            backend=backend,
            parallel_config=parallel_config,
        )


def _biased_dense_on_triton(query: torch.Tensor) -> bool:
    """SDPA with a float mask falls back to slow kernels that materialise (B, H, S_q, S_kv) logits; the
    block-sparse kernel takes the per-key bias natively, so on CUDA dense + bias runs there, every block with a
    visible key listed."""
    from genkv.kernels.block_sparse import kernel_fits

    return query.is_cuda and kernel_fits(query)


def empty_key_blocks(key_bias: torch.Tensor, block: int) -> torch.Tensor:
    """(n_blocks,) bool: the key blocks of ``block`` slots in which no batch element or head sees any key (bias
    -inf throughout, e.g. a fixed-layout cache's empty region). Decided on the device, no sync.

    Example:
        >>> bias = torch.zeros(1, 6, 2)
        >>> bias[:, 2:4] = -float("inf")
        >>> empty_key_blocks(bias, 2).tolist()
        [False, True, False]
    """
    visible = (key_bias > -float("inf")).any(-1).any(0)
    n_blocks = -(-visible.shape[0] // block)
    visible = torch.nn.functional.pad(visible, (0, n_blocks * block - visible.shape[0]))
    return ~visible.view(n_blocks, block).any(-1)


def _dense_with_bias_triton(query, key, value, key_bias, block: int = 128, history: Any = None) -> torch.Tensor:
    from genkv.kernels import block_sparse_attention

    b, s_q, h, _ = query.shape
    s_kv = key.shape[1] + (0 if history is None else history.length)
    n_q, n_kv = -(-s_q // block), -(-s_kv // block)
    # Every query block lists every key block that holds a visible key, in ascending order: a fixed-layout
    # cache's empty blocks (bias -inf throughout) would add exactly nothing, so they are not read. Decided on
    # the device (no sync); broadcast views of one row, nothing (B, H, n_q, n_kv)-sized materialised.
    if key_bias is None:
        empty = torch.zeros(n_kv, dtype=torch.bool, device=query.device)
    else:
        empty = empty_key_blocks(key_bias, block)
    order = torch.argsort(empty.to(torch.int32), stable=True).to(torch.int32)
    indices = order.expand(b, h, n_q, n_kv)
    counts = (~empty).sum().to(torch.int32).expand(b, h, n_q).contiguous()
    return block_sparse_attention(query, key, value, indices, counts, key_bias=key_bias, block_m=block,
                                  block_n=block, backend="triton", history=history)


def attend_quantized(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_bias: torch.Tensor | None,
                     history: Any, tile: int = 1024) -> torch.Tensor:
    """Dense attention of ``query`` over a quantized ``history`` (``QuantizedKV``) followed by the chunk
    ``key`` / ``value``; ``key_bias`` (B, S_h + S_cur, H) or None spans both.

    On CUDA the block-sparse kernel reads the codes with every block listed. Elsewhere the history is streamed
    ``tile`` slots at a time (dequantize a tile, fold it into an online softmax), so no full-precision copy of
    the history exists at any moment: memory is one tile's logits, independent of the history's length.

    Example:
        >>> from genkv.kernels import dequantize, quantize_kv
        >>> q, k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
        >>> hist = quantize_kv(k[:, :32], v[:, :32], "int8")
        >>> out = attend_quantized(q, k[:, 32:], v[:, 32:], None, hist, tile=16)
        >>> k_hat, v_hat = dequantize(hist)
        >>> ref = torch.nn.functional.scaled_dot_product_attention(
        ...     q.transpose(1, 2), torch.cat([k_hat, k[:, 32:]], 1).transpose(1, 2),
        ...     torch.cat([v_hat, v[:, 32:]], 1).transpose(1, 2)).transpose(1, 2)
        >>> bool((out - ref).abs().max() < 1e-5)
        True
    """
    if _biased_dense_on_triton(query):
        return _dense_with_bias_triton(query, key, value, key_bias, history=history)
    from genkv.kernels import dequantize

    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query.to(compute).permute(0, 2, 1, 3) * (1.0 / math.sqrt(query.shape[-1]))  # (B, H, S_q, D)
    softmax = _OnlineSoftmax(q)
    n_hist = history.length
    for start in range(0, n_hist, tile):
        end = min(start + tile, n_hist)
        k_tile, v_tile = dequantize(history, start, end)
        softmax.add(k_tile, v_tile, None if key_bias is None else key_bias[:, start:end])
    if key.shape[1]:
        softmax.add(key, value, None if key_bias is None else key_bias[:, n_hist:])
    return softmax.result().to(query.dtype)


class _OnlineSoftmax:
    """softmax(q k^T + bias) v accumulated over key tiles (flash-attention's running max and sum)."""

    def __init__(self, q: torch.Tensor) -> None:
        self.q = q  # (B, H, S_q, D), already scaled
        b, h, s_q, d = q.shape
        self.high = q.new_full((b, h, s_q), -float("inf"))
        self.total = q.new_zeros(b, h, s_q)
        self.acc = q.new_zeros(b, h, s_q, d)

    def add(self, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Fold keys / values (B, T, H, D) with an optional bias (B, T, H) in."""
        logits = torch.einsum("bhqd,bkhd->bhqk", self.q, k.to(self.q.dtype))
        if bias is not None:
            logits = logits + bias.to(self.q.dtype).permute(0, 2, 1)[:, :, None]
        high = torch.maximum(self.high, logits.amax(-1))
        safe = torch.where(torch.isfinite(high), high, torch.zeros_like(high))  # all hidden so far: no shift
        weights = torch.exp(logits - safe[..., None])
        rescale = torch.exp(self.high - safe)
        self.total = self.total * rescale + weights.sum(-1)
        self.acc = self.acc * rescale[..., None] + torch.einsum("bhqk,bkhd->bhqd", weights, v.to(self.q.dtype))
        self.high = high

    def result(self) -> torch.Tensor:
        """(B, S_q, H, D); a query that saw no visible key gets zeros."""
        out = self.acc / torch.where(self.total > 0, self.total, torch.ones_like(self.total))[..., None]
        return out.permute(0, 2, 1, 3)


class DenseCrossAttention:
    """Every query attends to every prompt token (Wan: all 512 rows, padding included, as upstream)."""

    def graph_signature(self, store: Any) -> tuple:
        return ("dense",)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        backend: Any = None,
        layer_index: int = 0,
        store: Any = None,
    ) -> torch.Tensor:
        return dispatch_attention_fn(
            query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, backend=backend, parallel_config=None
        )
