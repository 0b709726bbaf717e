"""A Wan self-attention's query/key RMSNorm and rotary embedding in one pass per token (issue 20).

A Wan block normalizes its projected queries and keys with an RMSNorm across all heads (``norm_q`` / ``norm_k``,
1536 channels at 1.3B) and then rotates interleaved channel pairs by the token's position. Compiled, Inductor
emits one looped reduction over both that took 121 us a call on an H100 at a chunk's 4680 tokens (18.2 ms of the
exact path's 359 ms chunk, 15.8 ms of the fp8 path's 266; `eval/profile_ops.py`, 2026-12-05): ~5x what its 56
MB of reads and writes need, since the loop reads each row twice and the rotation reads the row's pairs apart.
This kernel takes 31.6 us against the compiled ops' 110.3 (H100, ``eval/bench_fused_ops.py``).

:func:`qk_norm_rope` loads each token's row once as its even and odd channels (``(heads, D/2)`` each), takes the
row's mean square, scales by the norm's weight, rotates each pair with the token's ``cos`` / ``sin``, and
stores the result in the input's dtype: everything in float32, one rounding at the end (the eager module path
rounds after the norm and after each product of the rotation; compiled, Inductor rounds once as here). ``upcast``
keeps upstream Wan's ``UpcastRMSNorm`` rounding (the normalized row rounded before the weight, and after it).
The row is read as (heads, D) and its pairs are split in registers, so loads and stores are contiguous.

:data:`qk_norm_rope_op` is the custom op ``genkv::qk_norm_rope`` (one opaque call in a compiled block; CUDA graphs
record it): the kernel on CUDA, :func:`qk_norm_rope_reference` (the same float32 math in torch) elsewhere.

Example (CPU):
    >>> import torch
    >>> from genkv.kernels.qk_norm_rope import qk_norm_rope_op
    >>> q, k = torch.randn(1, 5, 2 * 8), torch.randn(1, 5, 2 * 8)   # 5 tokens, 2 heads x 8 channels
    >>> cos, sin = torch.ones(1, 5, 1, 8), torch.zeros(1, 5, 1, 8)  # no rotation
    >>> qo, ko = qk_norm_rope_op(q, k, torch.ones(16), torch.ones(16), 1e-6, cos, sin, 2, False)
    >>> tuple(qo.shape), bool(torch.allclose(qo.flatten(2), torch.nn.functional.rms_norm(q, (16,), eps=1e-6)))
    ((1, 5, 2, 8), True)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genkv.rope import apply_rotary_emb

__all__ = ["qk_norm_rope", "qk_norm_rope_reference", "qk_norm_rope_op", "qk_norm_rope_applies"]


@triton.jit
def _norm_rope_kernel(X, W, Cos, Sin, Out, seq, stride_xb, stride_xs, stride_cs, stride_ob, stride_os, eps,
                      HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr):
    token = tl.program_id(0)
    b = (token // seq).to(tl.int64)
    s = (token % seq).to(tl.int64)
    head = tl.arange(0, BLOCK_H)[:, None]
    channel = tl.arange(0, HEAD_DIM)[None, :]
    offs = head * HEAD_DIM + channel  # the row as (heads, D), read and written contiguously
    inside = (head < HEADS) & (channel < HEAD_DIM)
    x = tl.load(X + b * stride_xb + s * stride_xs + offs, mask=inside, other=0.0).to(tl.float32)
    inverse_rms = tl.math.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / (HEADS * HEAD_DIM) + eps)
    weight = tl.load(W + offs, mask=inside, other=0.0).to(tl.float32)
    if UPCAST:  # upstream Wan's RMSNorm: the normalized row rounded to the input dtype, then times the weight
        y = ((x * inverse_rms).to(X.dtype.element_ty).to(tl.float32) * weight).to(X.dtype.element_ty).to(tl.float32)
    else:
        y = x * inverse_rms * weight
    y_even, y_odd = tl.split(tl.reshape(y, [BLOCK_H, HEAD_DIM // 2, 2]))
    # Wan's tables repeat each pair's angle: cos of pair j at channel 2j, sin at channel 2j + 1
    pair = tl.arange(0, HEAD_DIM // 2)[None, :]
    cos = tl.load(Cos + s * stride_cs + 2 * pair).to(tl.float32)
    sin = tl.load(Sin + s * stride_cs + 2 * pair + 1).to(tl.float32)
    out = tl.reshape(tl.join(y_even * cos - y_odd * sin, y_even * sin + y_odd * cos), [BLOCK_H, HEAD_DIM])
    tl.store(Out + b * stride_ob + s * stride_os + offs, out.to(Out.dtype.element_ty), mask=inside)


def qk_norm_rope_reference(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor,
                           eps: float, cos: torch.Tensor, sin: torch.Tensor, heads: int, upcast: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`qk_norm_rope` computes, in torch: ``rope(rms_norm(x) * weight)`` in float32 (float64 for
    float64 inputs), rounded once to the input's dtype; ``(B, S, heads, D)`` each. ``upcast``: the norm as
    upstream Wan's (``UpcastRMSNorm``): the normalized row rounded to the input's dtype before the weight, and the
    product rounded too."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32

    def one(x, weight):
        if upcast:
            xf = x.to(work)
            normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * weight.to(x.dtype)
            normed = normed.to(work)
        else:
            normed = torch.nn.functional.rms_norm(x.to(work), (x.shape[-1],), weight.to(work), eps)
        return apply_rotary_emb(normed.unflatten(-1, (heads, -1)), cos.to(work), sin.to(work)).to(x.dtype)

    return one(q, weight_q), one(k, weight_k)


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, heads: int) -> None:
    if q.dim() != 3 or k.shape != q.shape or q.shape[-1] % heads or (q.shape[-1] // heads) % 2:
        raise ValueError(f"q and k must be (B, S, heads * D) with D even and {heads} heads; got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    if cos.shape[-1] != q.shape[-1] // heads or cos.shape[-3] != q.shape[1]:
        raise ValueError(f"rotary tables must be (..., S, 1, D) for S={q.shape[1]}, D={q.shape[-1] // heads}; got "
                         f"{tuple(cos.shape)}")


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor, eps: float,
                 cos: torch.Tensor, sin: torch.Tensor, heads: int, upcast: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized and rotated queries and keys ``(B, S, heads, D)`` from projected ``(B, S, heads * D)`` ones,
    one Triton pass per tensor. ``cos`` / ``sin``: Wan's tables ``(1, S, 1, D)`` (a batch dimension of 1
    broadcasts). Where the kernel does not run (not CUDA and no ``TRITON_INTERPRET=1``, float64, ``D / 2`` not a
    power of two, a table whose last dimension is strided), :func:`qk_norm_rope_reference`. ``upcast``: upstream
    Wan's rounding of the norm (see the reference)."""
    from .block_sparse import triton_runs_on

    _check(q, k, cos, heads)
    half = q.shape[-1] // heads // 2
    if not qk_norm_rope_applies(q, cos, sin, heads) or not triton_runs_on(q):
        return qk_norm_rope_reference(q, k, weight_q, weight_k, eps, cos, sin, heads, upcast)
    batch, seq, _ = q.shape
    cos = cos.reshape(-1, seq, 2 * half)
    sin = sin.reshape(-1, seq, 2 * half)
    outs = []
    for x, weight in ((q, weight_q), (k, weight_k)):
        if x.stride(-1) != 1:
            x = x.contiguous()
        out = torch.empty(batch, seq, heads, 2 * half, device=x.device, dtype=x.dtype)
        _norm_rope_kernel[(batch * seq,)](
            x, weight.contiguous(), cos, sin, out, seq, x.stride(0), x.stride(1), cos.stride(1),
            out.stride(0), out.stride(1), float(eps),
            HEADS=heads, HEAD_DIM=2 * half, BLOCK_H=triton.next_power_of_2(heads), UPCAST=upcast, num_warps=4,
        )
        outs.append(out)
    return outs[0], outs[1]


def qk_norm_rope_applies(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> bool:
    """Whether the kernel takes these inputs: float16/bfloat16/float32, ``D / 2`` a power of two (16 to 128), the
    tables' last dimension contiguous and their batch dimension 1, and the same table layout for cos and sin."""
    half = q.shape[-1] // heads // 2
    return (q.dtype in (torch.float16, torch.bfloat16, torch.float32) and half in (8, 16, 32, 64)
            and cos.stride() == sin.stride() and cos.stride(-1) == 1 and cos.numel() == q.shape[1] * 2 * half)


@torch.library.custom_op("genkv::qk_norm_rope", mutates_args=())
def qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor, eps: float,
                    cos: torch.Tensor, sin: torch.Tensor, heads: int, upcast: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``genkv::qk_norm_rope``: :func:`qk_norm_rope` on CUDA, :func:`qk_norm_rope_reference` elsewhere."""
    if q.is_cuda:
        return qk_norm_rope(q, k, weight_q, weight_k, eps, cos, sin, heads, upcast)
    return qk_norm_rope_reference(q, k, weight_q, weight_k, eps, cos, sin, heads, upcast)


@qk_norm_rope_op.register_fake
def _(q, k, weight_q, weight_k, eps, cos, sin, heads, upcast):
    _check(q, k, cos, heads)
    shape = (*q.shape[:-1], heads, q.shape[-1] // heads)
    return q.new_empty(shape), k.new_empty(shape)
