"""Dense attention that also returns its log-sum-exp: the chunk's own part of a split routed read.

A routed read (``annsa`` / ``fastar``) attends every query block to all of the current chunk's keys and to a few
history blocks. The chunk part is dense, which cuDNN's SDPA computes faster than the block-sparse kernel does (an
H100 measured 524 TFLOP/s for dense cuDNN against 439 for the kernel with every block listed; docs/BENCHMARKS.md),
and the kernel can resume from a partial ``(out, lse)`` (``initial=``), so the split costs no merge pass.
torch's public ``scaled_dot_product_attention`` returns no LSE; its cuDNN and flash kernels do, through the aten
ops called here. ``math`` is the reference (and the CPU path): plain softmax attention in float32 (float64 for
float64 inputs).
"""

from __future__ import annotations

import math

import torch

BACKENDS = ("auto", "cudnn", "flash", "math")
_CUDNN_FAILED: set[tuple] = set()  # (device, dtype, head_dim) where the cuDNN op raised: flash from then on


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = torch.einsum("bqhd,bkhd->bhqk", q.to(compute), k.to(compute)) * scale
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(logits - lse[..., None]), v.to(compute))
    return out.to(q.dtype), lse.float()


def _sdpa_op(choice: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D) views: the ops take strides
    if choice == "cudnn":
        result = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, False, False,
                                                                     scale=scale)
    else:
        result = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False, scale=scale)
    out, lse = result[0], result[1]
    b, s_q, h, _ = q.shape
    if lse.numel() != b * h * s_q:
        raise RuntimeError(f"{choice} SDPA returned a log-sum-exp of shape {tuple(lse.shape)}, not (B, H, S_q) = "
                           f"{(b, h, s_q)}; use backend='math'")
    return out.transpose(1, 2), lse.reshape(b, h, s_q).float()


def dense_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of every query over every key, q / k / v (B, S, H, D): ``(out (B, S_q, H, D), lse (B, H,
    S_q) float32)``, the LSE in natural log, ready for ``block_sparse_attention(..., initial=(out, lse))``.

    ``backend``: ``"cudnn"`` / ``"flash"`` (CUDA, fp16 / bf16), ``"math"`` (any device and dtype), or ``"auto"``:
    cuDNN for CUDA fp16 / bf16 (flash where cuDNN raised once for that device, dtype and head size), else math.

    Example:
        >>> q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 7, 2, 8), torch.randn(1, 7, 2, 8)
        >>> out, lse = dense_attention_with_lse(q, k, v)
        >>> want = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        >>> bool((out - want.transpose(1, 2)).abs().max() < 1e-5), tuple(lse.shape)
        (True, (1, 2, 5))
    """
    if backend not in BACKENDS:
        raise ValueError(f"dense attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q, k, v must be (B, S, H, D) with matching B, H, D; got {tuple(q.shape)}, {tuple(k.shape)}")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    fused_ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    choice = backend
    if backend == "auto":
        choice = "cudnn" if fused_ok else "math"
    if choice == "math":
        return _math(q, k, v, scale)
    if not fused_ok:
        raise ValueError(f"the {choice} backend takes CUDA fp16 / bf16 tensors; use backend='math'")
    shape_key = (str(q.device), q.dtype, q.shape[-1])
    if choice == "cudnn" and backend == "auto" and shape_key in _CUDNN_FAILED:
        choice = "flash"
    if choice == "cudnn" and backend == "auto":
        try:
            return _sdpa_op("cudnn", q, k, v, scale)
        except RuntimeError:  # cuDNN without its SDPA engine for this GPU / head size: flash from now on
            _CUDNN_FAILED.add(shape_key)
            choice = "flash"
    return _sdpa_op(choice, q, k, v, scale)


__all__ = ["BACKENDS", "dense_attention_with_lse"]
