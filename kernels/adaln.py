"""A Wan block's residual add, LayerNorm and modulation in one pass per token, optionally with the per-row FP8
quantization of the result (issue 20).

Between its attention and feed-forward calls a Wan block runs three elementwise stretches over its ``(B, S, C)``
hidden states, each ending in a LayerNorm (``FP32LayerNorm``) whose output feeds linear layers:

1. ``norm1(h) * (1 + scale) + shift`` (adaptive LayerNorm, the self-attention's input);
2. ``h = h + attn1 * gate``, then ``norm2(h)`` (affine LayerNorm, or none; the cross-attention's query input);
3. ``h = h + attn2``, then ``norm3(h) * (1 + c_scale) + c_shift`` (the feed-forward's input).

Eagerly each stretch is five or six float32 kernels over the whole activation; compiled, Inductor fuses each into
one looped reduction that reads the row twice or three times (and, on the FP8 path, a third time for the row's
amax): 23-40 us a call at a chunk's 4680 x 1536 tokens on an H100, 14.7 ms of a 239 ms fp8 + TAEHV chunk
(``eval/profile_ops.py``, 2026-12-05). :func:`adaln` reads each row once into registers (one program per token),
adds the gated residual, normalizes, modulates, and writes the new hidden states, the normalized row in the
input's dtype and/or its e4m3 codes and float32 row scale (the quantization ``genkv.fp8.FP8Linear`` would do on
that rounded row, so the linears take the codes directly: :class:`genkv.fp8.FP8Rows`).

The arithmetic is diffusers' ``WanTransformerBlock.forward``'s, in float32 with the same roundings: the residual
sum rounded to the input's dtype, the LayerNorm over that rounded row (biased variance, ``eps`` inside the square
root), ``(1 + scale)`` and ``shift`` applied in float32, one rounding of the result. The GPU may contract a product
and a sum into one fused multiply-add, so results can differ from the eager torch ops by a float32 ulp before the
final rounding (one step of the output dtype, rarely); the tests bound that.

:data:`adaln_op` is the custom op ``genkv::adaln`` (one opaque call in a compiled block; CUDA graphs record it):
the kernel on CUDA, :func:`adaln_reference` (the same float32 math in torch) elsewhere. Under
``TRITON_INTERPRET=1`` the kernel itself runs on CPU tensors through :func:`adaln`.

Example (CPU):
    >>> import torch
    >>> from genkv.kernels.adaln import adaln_op
    >>> x, attn = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    >>> gate, scale, shift = torch.randn(3, 1, 1, 16).unbind(0)
    >>> h, normed, codes, code_scale = adaln_op(x, attn, gate, None, None, scale, shift, 1e-6, True, True, False)
    >>> bool(torch.allclose(h, x + attn * gate))
    True
    >>> ln = torch.nn.functional.layer_norm(h, (16,), eps=1e-6)
    >>> bool(torch.allclose(normed, ln * (1 + scale) + shift, atol=1e-5)), codes.numel()   # no codes asked for
    (True, 0)
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from genkv.fp8 import quantize_rows

from .fp8_rows import _codes, _row_scale

__all__ = ["adaln", "adaln_reference", "adaln_op", "adaln_applies"]

_MAX_COLS = 16384  # a row is held in registers (one program per token)


@triton.jit
def _adaln_kernel(X, Delta, Gate, W, Bias, Scale, Shift, H, Normed, Codes, CodeScale,
                  seq, n_cols, eps, stride_xb, stride_xs, stride_db, stride_ds, stride_gb, stride_gs,
                  stride_mb, stride_ms, stride_hb, stride_hs, stride_nb, stride_ns, stride_codes,
                  HAS_DELTA: tl.constexpr, HAS_GATE: tl.constexpr, NORMALIZE: tl.constexpr,
                  HAS_AFFINE: tl.constexpr, HAS_MODULATION: tl.constexpr, WRITE_H: tl.constexpr,
                  WRITE_NORMED: tl.constexpr, QUANTIZE: tl.constexpr, BLOCK: tl.constexpr, EMULATE: tl.constexpr):
    token = tl.program_id(0)
    b = (token // seq).to(tl.int64)
    s = (token % seq).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    h = tl.load(X + b * stride_xb + s * stride_xs + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_DELTA:
        delta = tl.load(Delta + b * stride_db + s * stride_ds + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_GATE:
            delta = delta * tl.load(Gate + b * stride_gb + s * stride_gs + cols, mask=inside, other=0.0).to(tl.float32)
        # the block keeps its hidden states in the model's dtype: the norm reads the rounded sum, as eagerly
        h = (h + delta).to(X.dtype.element_ty).to(tl.float32)
        if WRITE_H:
            tl.store(H + b * stride_hb + s * stride_hs + cols, h.to(H.dtype.element_ty), mask=inside)
    y = h
    if NORMALIZE:
        mean = tl.sum(h, axis=0) / n_cols
        centred = tl.where(inside, h - mean, 0.0)  # the padding must not enter the variance
        inverse_std = tl.math.rsqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
        y = centred * inverse_std
        if HAS_AFFINE:
            y = y * tl.load(W + cols, mask=inside, other=0.0).to(tl.float32) \
                + tl.load(Bias + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_MODULATION:
            modulation = b * stride_mb + s * stride_ms + cols
            scale = tl.load(Scale + modulation, mask=inside, other=0.0).to(tl.float32)
            shift = tl.load(Shift + modulation, mask=inside, other=0.0).to(tl.float32)
            y = y * (1.0 + scale) + shift
    y = y.to(Normed.dtype.element_ty)  # the row the linears would read (rounded once), quantized from it too
    if WRITE_NORMED:
        tl.store(Normed + b * stride_nb + s * stride_ns + cols, y, mask=inside)
    if QUANTIZE:
        y = tl.where(inside, y.to(tl.float32), 0.0)
        row_scale, inverse = _row_scale(tl.max(tl.abs(y), axis=0))
        tl.store(Codes + token.to(tl.int64) * stride_codes + cols, _codes(y, inverse, EMULATE), mask=inside)
        tl.store(CodeScale + token, row_scale)


def adaln_reference(x: torch.Tensor, delta: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                    weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                    scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None, eps: float = 1e-6,
                    normalize: bool = True, write_normed: bool = True, quantize: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`adaln` computes, with diffusers' Wan-block ops (float64 for float64 inputs, else float32):
    ``h = (x + delta * gate)`` rounded to ``x``'s dtype (``delta`` None: ``h = x``; ``gate`` None: no gate), then
    ``y = layer_norm(h) * weight + bias`` (affine if given; ``normalize`` False: ``y = h``), then ``y * (1 + scale)
    + shift`` (if given), rounded to ``x``'s dtype. Returns ``(h, y, codes, code_scale)``: ``h`` empty unless
    ``delta`` was given, ``y`` empty unless ``write_normed``, the per-row e4m3 codes ``(B*S, C)`` and scales
    ``(B*S, 1)`` of the rounded ``y`` (:func:`genkv.fp8.quantize_rows`) empty unless ``quantize``."""
    _check(x, delta, gate, weight, bias, scale, shift)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x
    if delta is not None:
        step = delta.to(work) * gate.to(work) if gate is not None else delta.to(work)
        h = (x.to(work) + step).to(x.dtype)
    y = h.to(work)
    if normalize:
        y = torch.nn.functional.layer_norm(y, (x.shape[-1],), None if weight is None else weight.to(work),
                                           None if bias is None else bias.to(work), eps)
        if scale is not None:
            y = y * (1 + scale.to(work)) + shift.to(work)
    y = y.to(x.dtype)
    if y is h or y is x:  # no norm: the row itself; an op's outputs must not alias its inputs or each other
        y = y.clone()
    codes, code_scale = quantize_rows(y.reshape(-1, x.shape[-1])) if quantize else (
        x.new_empty(0, dtype=torch.float8_e4m3fn), x.new_empty(0, dtype=torch.float32))
    return (h if delta is not None else x.new_empty(0)), (y if write_normed else x.new_empty(0)), codes, code_scale


def _check(x, delta, gate, weight, bias, scale, shift) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (B, S, C); got shape {tuple(x.shape)}")
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"delta must have x's shape {tuple(x.shape)}; got {tuple(delta.shape)}")
    if gate is not None and delta is None:
        raise ValueError("a gate multiplies delta: pass delta too")
    if (weight is None) != (bias is None) or (scale is None) != (shift is None):
        raise ValueError("weight and bias, and scale and shift, come in pairs")
    for name, t in (("gate", gate), ("scale", scale), ("shift", shift)):
        if t is not None and (t.dim() != 3 or t.shape[-1] != x.shape[-1] or t.shape[0] not in (1, x.shape[0])
                              or t.shape[1] not in (1, x.shape[1])):
            raise ValueError(f"{name} must broadcast to x's (B, S, C) = {tuple(x.shape)} as (B or 1, S or 1, C); "
                             f"got {tuple(t.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (x.shape[-1],):
            raise ValueError(f"{name} must be ({x.shape[-1]},); got {tuple(t.shape)}")


def adaln_applies(x: torch.Tensor) -> bool:
    """Whether the kernel takes ``x``: float16/bfloat16/float32, a row of at most 16384 channels."""
    return x.dtype in (torch.float16, torch.bfloat16, torch.float32) and 0 < x.shape[-1] <= _MAX_COLS


def _broadcast_strides(t: Optional[torch.Tensor], shape: torch.Size) -> tuple[torch.Tensor | None, int, int]:
    """``t`` with a contiguous last dimension and its (batch, token) strides, 0 where it broadcasts."""
    if t is None:
        return None, 0, 0
    if t.stride(-1) != 1:
        t = t.contiguous()
    t = t.expand(shape)
    return t, t.stride(0), t.stride(1)


def adaln(x: torch.Tensor, delta: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
          weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
          scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None, eps: float = 1e-6,
          normalize: bool = True, write_normed: bool = True, quantize: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`adaln_reference`'s result from one Triton pass per token (CUDA tensors, or CPU ones under
    ``TRITON_INTERPRET=1``, in float32 / float16 there: the interpreter computes bfloat16 wrongly). ``x`` /
    ``delta``: ``(B, S, C)`` with contiguous rows; ``gate`` / ``scale`` / ``shift``: ``(B or 1, S or 1, C)``, any
    float dtype (Wan's are float32); ``weight`` / ``bias``: ``(C,)``. Where the kernel does not run (float64,
    rows past 16384 channels, no Triton), the reference."""
    from .block_sparse import triton_runs_on

    _check(x, delta, gate, weight, bias, scale, shift)
    if not triton_runs_on(x) or not adaln_applies(x) or x.numel() == 0:
        return adaln_reference(x, delta, gate, weight, bias, scale, shift, eps, normalize, write_normed, quantize)
    batch, seq, cols = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if delta is not None and delta.stride(-1) != 1:
        delta = delta.contiguous()
    gate, stride_gb, stride_gs = _broadcast_strides(gate, x.shape)
    scale, stride_mb, stride_ms = _broadcast_strides(scale, x.shape)
    shift, shift_b, shift_s = _broadcast_strides(shift, x.shape)
    if shift is not None and (shift_b, shift_s) != (stride_mb, stride_ms):
        shift = torch.empty_like(scale).copy_(shift)  # the kernel reads scale and shift at one offset
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if delta is not None else x.new_empty(0)
    normed = torch.empty_like(x, memory_format=torch.contiguous_format) if write_normed else x.new_empty(0)
    codes = torch.empty(batch * seq, cols, device=x.device, dtype=torch.float8_e4m3fn) if quantize else \
        x.new_empty(0, dtype=torch.float8_e4m3fn)
    code_scale = torch.empty(batch * seq, 1, device=x.device, dtype=torch.float32) if quantize else \
        x.new_empty(0, dtype=torch.float32)
    block = triton.next_power_of_2(cols)
    dummy = x  # pointers of absent inputs/outputs are never read or written (their constexpr flag is off)
    _adaln_kernel[(batch * seq,)](
        x, delta if delta is not None else dummy, gate if gate is not None else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        h if delta is not None else dummy, normed if write_normed else x,
        codes.view(torch.uint8) if quantize else dummy, code_scale if quantize else dummy,
        seq, cols, float(eps), x.stride(0), x.stride(1),
        delta.stride(0) if delta is not None else 0, delta.stride(1) if delta is not None else 0,
        stride_gb, stride_gs, stride_mb, stride_ms,
        h.stride(0) if delta is not None else 0, h.stride(1) if delta is not None else 0,
        normed.stride(0) if write_normed else 0, normed.stride(1) if write_normed else 0,
        codes.stride(0) if quantize else 0,
        HAS_DELTA=delta is not None, HAS_GATE=gate is not None, NORMALIZE=normalize, HAS_AFFINE=weight is not None,
        HAS_MODULATION=scale is not None, WRITE_H=delta is not None, WRITE_NORMED=write_normed, QUANTIZE=quantize,
        BLOCK=block, EMULATE=not x.is_cuda, num_warps=max(4, min(16, block // 512)),
    )
    return h, normed, codes, code_scale


@torch.library.custom_op("genkv::adaln", mutates_args=())
def adaln_op(x: torch.Tensor, delta: Optional[torch.Tensor], gate: Optional[torch.Tensor],
             weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], scale: Optional[torch.Tensor],
             shift: Optional[torch.Tensor], eps: float, normalize: bool, write_normed: bool, quantize: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``genkv::adaln``: :func:`adaln` on CUDA, :func:`adaln_reference` elsewhere. Outputs that were not asked
    for (``h`` without ``delta``, ``normed`` without ``write_normed``, the codes without ``quantize``) are empty
    tensors, never aliases of an input (custom ops must not return their inputs)."""
    if x.is_cuda:
        return adaln(x, delta, gate, weight, bias, scale, shift, eps, normalize, write_normed, quantize)
    return adaln_reference(x, delta, gate, weight, bias, scale, shift, eps, normalize, write_normed, quantize)


@adaln_op.register_fake
def _(x, delta, gate, weight, bias, scale, shift, eps, normalize, write_normed, quantize):
    _check(x, delta, gate, weight, bias, scale, shift)
    rows = x.shape[0] * x.shape[1]
    return (x.new_empty(x.shape) if delta is not None else x.new_empty(0),
            x.new_empty(x.shape) if write_normed else x.new_empty(0),
            x.new_empty((rows, x.shape[-1]) if quantize else (0,), dtype=torch.float8_e4m3fn),
            x.new_empty((rows, 1) if quantize else (0,), dtype=torch.float32))
