"""Block-sparse attention in Triton: each (batch, head, query block) attends to the key blocks listed for it.

Structure of the Triton fused-attention tutorial (FA2 forward): one program per (query block, batch x head),
the query tile kept in registers, an online softmax in base 2 (the ``1/sqrt(d)`` scale and ``log2(e)`` folded
into one multiplier), and a loop over key blocks. The loop runs over the row's *index list*
(``kv_block_indices[b, h, m, :count]``, FlexAttention's ``from_kv_blocks`` convention) instead of all blocks.
Tensors stay in diffusers' ``(B, S, H, D)`` layout: the kernel takes strides, so views of a larger cache buffer
(``buffer[:, :length]``) need no copy. An optional per-key bias ``(B, S_kv, H)`` is added to the logits
(TempCache's ``log(count)``; ``-inf`` marks an empty slot). Rows that see no key produce zeros and an LSE of
``-inf``, never NaN.
"""

from __future__ import annotations

import math

import torch

try:  # triton is optional: CPU installs use the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

LOG2E = 1.4426950408889634


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _block_sparse_fwd(
        Q, K, V, Bias, Out, Lse, Idx, Cnt,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ob, stride_os, stride_oh,
        stride_bb, stride_bs, stride_bh,
        stride_ib, stride_ih, stride_iq,
        stride_cb, stride_ch,
        stride_lb, stride_lh,
        num_heads, q_len, kv_len, qk_scale,
        HAS_BIAS: tl.constexpr,
        STORE_LSE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < q_len

        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        count = tl.load(Cnt + b * stride_cb + h * stride_ch + pid_m)
        idx_row = Idx + b * stride_ib + h * stride_ih + pid_m * stride_iq
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        for i in range(0, count):
            block = tl.load(idx_row + i)
            offs_n = block * BLOCK_N + offs_n0
            col_ok = offs_n < kv_len
            k = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None], mask=col_ok[None, :], other=0.0)
            qk = tl.dot(q, k) * qk_scale  # logits in base 2
            if HAS_BIAS:
                bias = tl.load(Bias + b * stride_bb + h * stride_bh + offs_n * stride_bs, mask=col_ok, other=0.0)
                qk += bias[None, :] * 1.4426950408889634
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row with nothing visible so far keeps m = -inf; subtract 0 there instead of -inf (no NaN).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        denom = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / denom[:, None]
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        if STORE_LSE:
            lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(denom)) / 1.4426950408889634)
            tl.store(Lse + b * stride_lb + h * stride_lh + offs_m, lse, mask=row_ok)


def _check(q, k, v, kv_block_indices, kv_block_counts, key_bias, block_m, block_n) -> None:
    interpreting = __import__("os").environ.get("TRITON_INTERPRET") == "1"
    allowed = (torch.float16, torch.float32) if interpreting else (torch.float16, torch.bfloat16, torch.float32)
    if q.dtype not in allowed or k.dtype != q.dtype or v.dtype != q.dtype:
        hint = " (the Triton interpreter computes bf16 wrongly)" if interpreting else ""
        raise TypeError(f"triton block-sparse attention takes {', '.join(map(str, allowed))} q/k/v{hint}; got {q.dtype}")
    d = q.shape[-1]
    if d not in (16, 32, 64, 128):
        raise ValueError(f"triton block-sparse attention supports head_dim 16, 32, 64, 128; got {d} (use backend='torch')")
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {size}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k, v must be contiguous in the head dimension")
    n_q = math.ceil(q.shape[1] / block_m)
    b, h = q.shape[0], q.shape[2]
    if kv_block_indices.shape[:3] != (b, h, n_q) or kv_block_counts.shape != (b, h, n_q):
        raise ValueError(
            f"block lists must be (B, H, {n_q}, n) and (B, H, {n_q}) for S_q={q.shape[1]}, block_m={block_m}; "
            f"got {tuple(kv_block_indices.shape)} and {tuple(kv_block_counts.shape)}"
        )
    if key_bias is not None and key_bias.shape != (b, k.shape[1], h):
        raise ValueError(f"key_bias must be (B, S_kv, H) = {(b, k.shape[1], h)}, got {tuple(key_bias.shape)}")


def block_sparse_attention_triton(
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
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: torch.Tensor | None = None,
):
    """Launch the kernel on (B, S, H, D) tensors; see the module docstring. Returns ``out`` or ``(out, lse)``.

    ``out`` (optional) is written in place: tests pass a NaN-filled tensor to catch unwritten elements.
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use backend='torch'")
    _check(q, k, v, kv_block_indices, kv_block_counts, key_bias, block_m, block_n)
    b, s_q, h, d = q.shape
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(b, h, s_q, device=q.device, dtype=torch.float32) if return_lse else out
    bias = key_bias if key_bias is not None else q  # placeholder pointer, never read
    if key_bias is not None and key_bias.dtype != torch.float32:
        bias = key_bias.float()
    bias_strides = (bias.stride(0), bias.stride(1), bias.stride(2)) if key_bias is not None else (0, 0, 0)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    grid = (math.ceil(s_q / block_m), b * h)
    idx = kv_block_indices
    cnt = kv_block_counts
    _block_sparse_fwd[grid](
        q, k, v, bias, out, lse, idx, cnt,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *bias_strides,
        idx.stride(0), idx.stride(1), idx.stride(2),
        cnt.stride(0), cnt.stride(1),
        lse.stride(0) if return_lse else 0, lse.stride(1) if return_lse else 0,
        h, s_q, k.shape[1], scale * LOG2E,
        HAS_BIAS=key_bias is not None,
        STORE_LSE=return_lse,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=d,
        num_warps=num_warps or (8 if d >= 128 else 4),
        num_stages=num_stages or 2,
    )
    return (out, lse) if return_lse else out
