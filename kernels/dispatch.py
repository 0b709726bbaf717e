"""``block_sparse_attention``: the device dispatch between the Triton kernel, FlexAttention and the gather path."""

from __future__ import annotations

import os

import torch

from .gather import block_sparse_attention_gather
from .reference import block_mask_from_lists, block_sparse_attention_torch, merge_attention_partials
from .cross import select_prompt_tokens, sparse_cross_attention
from .dense_lse import dense_attention_with_lse
from .quant_kv import (QuantizedKV, copy_slots, dequantize, dequantize_keys, key_channel_scales, pool_quantized_blocks,
                       quantize_kv, write_quantized)
from .routing import pool_blocks, route_blocks

_BACKENDS = ("auto", "torch", "gather", "flex", "triton")


def auto_backend(on_cuda: bool, triton_fits: bool, *, history: bool = False, merges: bool = False) -> str:
    """The backend ``backend="auto"`` picks: the Triton kernel on CUDA where it fits (fp16/bf16, head dim 16-128
    in powers of two), else FlexAttention on CUDA, else the gather path. Flex reads neither a quantized
    ``history`` nor partial results (``initial`` / ``return_lse``: ``merges``), so calls that need them fall back
    to gather, which does both; a float32 or head-dim-48 model on a GPU (``sprites-tiny``) makes such calls.

    Example:
        >>> auto_backend(on_cuda=True, triton_fits=False, merges=True)
        'gather'
    """
    if not on_cuda:
        return "gather"
    if triton_fits:
        return "triton"
    return "gather" if history or merges else "flex"


def block_sparse_attention(
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
    backend: str | None = None,
    return_lse: bool = False,
    history: QuantizedKV | None = None,
    initial: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Attention of each query block over its listed key blocks; q/k/v (B, S, H, D), optional bias (B, S_kv, H).

    With ``return_lse`` also returns the natural-log sum of exponentials (B, H, S_q) for merging partial results
    (:func:`merge_attention_partials`); not available on the flex backend.
    ``history``: a quantized KV history (:func:`quantize_kv`) holding key positions [0, S_h), read directly by
    the kernels; ``k`` / ``v`` then hold the current chunk [S_h, S_h + S_cur), and lists and bias index the
    combined sequence. Triton (CUDA), gather and the torch reference take it; flex does not.
    ``initial``: ``(out0 (B, S_q, H, D), lse0 (B, H, S_q))``, the same queries' attention over other keys (e.g.
    :func:`dense_attention_with_lse` over the current chunk); the result is the attention over both key sets.
    The Triton kernel resumes from it (no merge pass); gather and torch merge afterwards; flex does not take it.

    Example:
        >>> import torch
        >>> q, k, v = torch.randn(1, 40, 2, 16), torch.randn(1, 96, 2, 16), torch.randn(1, 96, 2, 16)
        >>> idx, cnt = route_blocks(q, k, block_m=16, block_n=32, top_k=2)
        >>> block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=32).shape
        torch.Size([1, 40, 2, 16])

        The first 60 keys committed as int4, the last 36 (the current chunk) in full precision:

        >>> hist = quantize_kv(k[:, :60], v[:, :60], "int4")
        >>> out = block_sparse_attention(q, k[:, 60:], v[:, 60:], idx, cnt, block_m=16, block_n=32, history=hist)
        >>> bool((out - block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=32)).abs().max() < 0.3)
        True

        Keys 64-95 (the last block) attended densely by one call, blocks 0 and 1 resumed from that partial:

        >>> part = dense_attention_with_lse(q, k[:, 64:], v[:, 64:])
        >>> first_two = torch.tensor([0, 1], dtype=torch.int32).expand(1, 2, 3, 2)
        >>> two = torch.full((1, 2, 3), 2, dtype=torch.int32)
        >>> out = block_sparse_attention(q, k[:, :64], v[:, :64], first_two, two, block_m=16, block_n=32, initial=part)
        >>> every = torch.arange(3, dtype=torch.int32).expand(1, 2, 3, 3)
        >>> bool((out - block_sparse_attention(q, k, v, every, two + 1, block_m=16, block_n=32)).abs().max() < 1e-5)
        True
    """
    choice = (backend or os.environ.get("GENKV_KERNEL_BACKEND", "auto")).lower()
    if choice not in _BACKENDS:
        raise ValueError(f"kernel backend {choice!r} is not one of {', '.join(_BACKENDS)}")
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q, k, v must be (B, S, H, D) with matching B, H, D; got {tuple(q.shape)}, {tuple(k.shape)}")
    if kv_block_indices.dtype != torch.int32 or kv_block_counts.dtype != torch.int32:
        raise TypeError("kv_block_indices and kv_block_counts must be int32 (FlexAttention's BlockMask convention)")
    if choice == "auto":
        from .block_sparse import kernel_fits

        choice = auto_backend(q.is_cuda, kernel_fits(q), history=history is not None,
                              merges=initial is not None or return_lse)
    if choice == "triton":
        from .block_sparse import block_sparse_attention_triton

        return block_sparse_attention_triton(
            q, k, v, kv_block_indices, kv_block_counts, key_bias=key_bias, scale=scale, block_m=block_m,
            block_n=block_n, return_lse=return_lse, history=history, initial=initial,
        )
    if initial is not None and choice == "flex":
        raise ValueError("initial is not available on the flex backend; use 'triton', 'gather' or 'torch'")
    if choice == "flex":
        if history is not None:
            raise ValueError("a quantized history is not available on the flex backend; use 'triton' or 'gather'")
        if return_lse:
            raise ValueError("return_lse is not available on the flex backend; use backend='torch' or 'triton'")
        if not q.is_cuda:
            raise ValueError("the flex backend needs CUDA tensors; use backend='torch' on CPU")
        from .flex import block_sparse_attention_flex

        return block_sparse_attention_flex(
            q, k, v, kv_block_indices, kv_block_counts, key_bias=key_bias, scale=scale, block_m=block_m,
            block_n=block_n,
        )
    implementation = block_sparse_attention_gather if choice == "gather" else block_sparse_attention_torch
    result = implementation(
        q, k, v, kv_block_indices, kv_block_counts, key_bias=key_bias, scale=scale, block_m=block_m, block_n=block_n,
        return_lse=return_lse or initial is not None, history=history,
    )
    if initial is None:
        return result
    out, lse = merge_attention_partials(*result, *initial)
    return (out, lse) if return_lse else out


__all__ = [
    "QuantizedKV",
    "auto_backend",
    "block_sparse_attention",
    "block_sparse_attention_gather",
    "block_sparse_attention_torch",
    "block_mask_from_lists",
    "copy_slots",
    "dense_attention_with_lse",
    "dequantize",
    "dequantize_keys",
    "key_channel_scales",
    "merge_attention_partials",
    "pool_blocks",
    "pool_quantized_blocks",
    "quantize_kv",
    "route_blocks",
    "select_prompt_tokens",
    "sparse_cross_attention",
    "write_quantized",
]
