"""Quantize committed tokens straight into a quantized history's slots, in one Triton pass (issue 22).

A commit writes a chunk's keys and values into a :class:`~genkv.kernels.quant_kv.QuantizedKV`: keys divided by
their layer's smoothing factors, then per-(token, head) codes and an fp16 scale (int4 values: a zero point too),
scattered to the slots the keeper chose. TempCache's merges also blend a merged token's value into the value its
group already holds (``old * w + new * (1 - w)``) before quantizing it. Written as torch ops that is ~20 passes
over fp32 temporaries per write (divide, abs, amax, divide, round, clamp, cast, pack, five ``index_copy_``), and on
an H100 the int8 ``fastar`` keeper took 46 ms a chunk against bf16's 23 (`eval/profile_ops.py`, 2026-12-05).

:func:`write_rows` does it in one kernel: each program loads a few (token, head) rows of D channels, computes
exactly what :func:`write_rows_reference` computes (IEEE divisions, round half to even, the same fp16 roundings;
bit-identical codes and scales, tested), and stores codes and scales at the rows' slots. Inputs are
``(B, L, T, H, D)`` views (L layers of T tokens: a chunk's slice of a layer stack's staged keys needs no copy);
slot ``i`` of the flat list takes layer ``i // T``'s token ``i % T``.

On CUDA (or under ``TRITON_INTERPRET=1``) the kernel runs; elsewhere, and for layouts it does not take, the torch
reference.

Example:
    >>> import torch
    >>> from genkv.kernels.quant_kv import QuantizedKV, dequantize
    >>> k, v = torch.randn(1, 2, 3, 2, 16), torch.randn(1, 2, 3, 2, 16)  # 2 layers x 3 tokens
    >>> hist = QuantizedKV.empty("int8", 1, 8, 2, torch.ones(1, 2, 16))
    >>> write_rows(hist, torch.tensor([7, 0, 1, 2, 3, 4]), k, v, torch.ones(1, 2, 2, 16))
    >>> bool((dequantize(hist)[1][:, 7] - v[:, 0, 0]).abs().max() < 0.05)
    True
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .block_sparse import triton_runs_on
from .quant_kv import (KIND_IDS, ZERO_STEPS, QuantizedKV, _as_bytes, _fields, _quantize_smoothed, dequantize_values,
                       select_slots)

_ROWS = 16  # (token, head) rows per program: 16 x 128 channels, a few registers per thread at 4 warps
_ROUND = tl.constexpr(12582912.0)  # 1.5 * 2^23: (x + R) - R rounds an fp32 |x| < 2^22 to the nearest integer, ties to even


@triton.jit
def _scale_for(amax, QMAX: tl.constexpr):
    # (amax / qmax) clamped to fp16's largest, rounded to fp16; 1 where it is 0 (every code is then 0)
    scale = tl.minimum(tl.math.div_rn(amax, QMAX), 65504.0).to(tl.float16)
    return tl.where(scale == 0.0, 1.0, scale.to(tl.float32)).to(tl.float16)


@triton.jit
def _e4m3_bits(x, EMULATE: tl.constexpr):
    # The float8 e4m3fn byte of fp32 x (|x| <= 448), rounded to nearest, ties to even, as torch's cast gives it, -0
    # for a negative value that rounds to zero included. A GPU's conversion does exactly that in one instruction
    # (EMULATE off). The interpreter's rounds twice (through fp16), so EMULATE computes the byte without a float8
    # conversion: plain integer arithmetic once |x| is on e4m3's grid (3 mantissa bits: step 2^(exponent - 3);
    # below 2^-6 the subnormal step 2^-9).
    if not EMULATE:
        return x.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    bits = x.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)
    grid = ((tl.abs(x) * inverse + _ROUND) - _ROUND) * step  # exact: products with powers of two
    grid_bits = grid.to(tl.int32, bitcast=True)
    normal = ((((grid_bits >> 23) & 0xFF) - 120) << 3) | ((grid_bits >> 20) & 0x7)  # e4m3 bias 7 = 127 - 120
    subnormal = (grid * 512.0).to(tl.int32)  # 0..7 steps of 2^-9
    code = tl.where(grid < 0.015625, subnormal, normal) | ((bits >> 24) & 0x80)
    return code.to(tl.uint8)


@triton.jit
def _symmetric_codes(x, scale, KIND: tl.constexpr):
    # int8 codes, or fp8 codes as their bits (the history's fp8 tensors are passed as uint8)
    scaled = tl.math.div_rn(x, scale.to(tl.float32)[:, None])
    if KIND == 1:
        # emulated on every device: the writer's bit-identity with torch is tested (interpreter, H100) this way
        codes = _e4m3_bits(tl.minimum(tl.maximum(scaled, -448.0), 448.0), True)
    else:
        codes = tl.minimum(tl.maximum((scaled + _ROUND) - _ROUND, -127.0), 127.0).to(tl.int8)
    return codes


@triton.jit
def _int4_codes(x, scale, low, LO: tl.constexpr, HI: tl.constexpr):
    # clamp(round((x - low) / scale), LO, HI) (keys: low 0, [-7, 7], stored + 8; values: low = zero, [0, 15])
    rounded = (tl.math.div_rn(x - low[:, None], scale.to(tl.float32)[:, None]) + _ROUND) - _ROUND
    return tl.minimum(tl.maximum(rounded, LO), HI)


@triton.jit
def _write_rows_kernel(
    K, V, Chan, Slots, Weight, Merged,
    KC, KS, VC, VS, VZ,
    stride_kb, stride_kl, stride_kt, stride_kh,
    stride_vb, stride_vl, stride_vt, stride_vh,
    stride_cb, stride_cl, stride_ch,
    stride_qb, stride_qs, stride_qh,  # codes (B, S, H, D or D / 2), last dim contiguous
    stride_sb, stride_ss, stride_sh,  # scales and zero points (B, S, H)
    n_rows, tokens_per_layer, heads,
    KIND: tl.constexpr, HEAD_DIM: tl.constexpr, BLEND: tl.constexpr, ROWS: tl.constexpr,
    ZERO_STEPS: tl.constexpr,  # int4 values' span floor (quant_kv.ZERO_STEPS)
):
    batch = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = rows < n_rows
    token = rows // heads  # flat slot-list entry: layer token // T, its token token % T
    head = (rows % heads).to(tl.int64)
    layer = (token // tokens_per_layer).to(tl.int64)
    tok = (token % tokens_per_layer).to(tl.int64)
    slot = tl.load(Slots + token, mask=valid, other=0).to(tl.int64)
    k_row = K + batch * stride_kb + layer * stride_kl + tok * stride_kt + head * stride_kh
    v_row = V + batch * stride_vb + layer * stride_vl + tok * stride_vt + head * stride_vh
    c_row = Chan + batch * stride_cb + layer * stride_cl + head * stride_ch
    q_row = batch * stride_qb + slot * stride_qs + head * stride_qh
    s_at = batch * stride_sb + slot * stride_ss + head * stride_sh
    if KIND == 3:
        HALF: tl.constexpr = HEAD_DIM // 2
        offs = tl.arange(0, HALF)
        m2 = valid[:, None]
        # keys: both halves of a head (channel j in the low nibble of byte j, channel HALF + j in the high one)
        k_lo = tl.math.div_rn(tl.load(k_row[:, None] + offs[None, :], mask=m2, other=0.0).to(tl.float32),
                              tl.load(c_row[:, None] + offs[None, :], mask=m2, other=1.0))
        k_hi = tl.math.div_rn(tl.load(k_row[:, None] + HALF + offs[None, :], mask=m2, other=0.0).to(tl.float32),
                              tl.load(c_row[:, None] + HALF + offs[None, :], mask=m2, other=1.0))
        k_amax = tl.maximum(tl.max(tl.abs(k_lo), 1), tl.max(tl.abs(k_hi), 1))
        k_scale = _scale_for(k_amax, 7.0)
        zero = tl.zeros([ROWS], dtype=tl.float32)
        n_lo = (_int4_codes(k_lo, k_scale, zero, -7.0, 7.0) + 8.0).to(tl.uint8)
        n_hi = (_int4_codes(k_hi, k_scale, zero, -7.0, 7.0) + 8.0).to(tl.uint8)
        tl.store(KC + q_row[:, None] + offs[None, :], n_lo | (n_hi << 4), mask=m2)
        tl.store(KS + s_at, k_scale, mask=valid)
        v_lo = tl.load(v_row[:, None] + offs[None, :], mask=m2, other=0.0).to(tl.float32)
        v_hi = tl.load(v_row[:, None] + HALF + offs[None, :], mask=m2, other=0.0).to(tl.float32)
        if BLEND:  # the group's value as stored (asymmetric nibbles), weighted with the new one
            old = tl.load(VC + q_row[:, None] + offs[None, :], mask=m2, other=0)
            old_scale = tl.load(VS + s_at, mask=valid, other=1.0).to(tl.float32)[:, None]
            old_zero = tl.load(VZ + s_at, mask=valid, other=0.0).to(tl.float32)[:, None]
            o_lo = (old & 15).to(tl.float32) * old_scale + old_zero
            o_hi = (old >> 4).to(tl.float32) * old_scale + old_zero
            w = tl.load(Weight + token, mask=valid, other=0.0)[:, None]
            merged = tl.load(Merged + token, mask=valid, other=0)[:, None] != 0
            v_lo = tl.where(merged, o_lo * w + v_lo * (1.0 - w), v_lo)
            v_hi = tl.where(merged, o_hi * w + v_hi * (1.0 - w), v_hi)
        v_min = tl.minimum(tl.maximum(tl.minimum(tl.min(v_lo, 1), tl.min(v_hi, 1)), -65504.0), 65504.0)
        v_zero = v_min.to(tl.float16)
        low = v_zero.to(tl.float32)
        span = tl.maximum(tl.max(v_lo, 1), tl.max(v_hi, 1)) - low
        v_scale = _scale_for(tl.maximum(span, tl.abs(low) * (15.0 / ZERO_STEPS)), 15.0)
        n_lo = _int4_codes(v_lo, v_scale, low, 0.0, 15.0).to(tl.uint8)
        n_hi = _int4_codes(v_hi, v_scale, low, 0.0, 15.0).to(tl.uint8)
        tl.store(VC + q_row[:, None] + offs[None, :], n_lo | (n_hi << 4), mask=m2)
        tl.store(VS + s_at, v_scale, mask=valid)
        tl.store(VZ + s_at, v_zero, mask=valid)
    else:
        QMAX: tl.constexpr = 448.0 if KIND == 1 else 127.0
        offs = tl.arange(0, HEAD_DIM)
        m2 = valid[:, None]
        k = tl.math.div_rn(tl.load(k_row[:, None] + offs[None, :], mask=m2, other=0.0).to(tl.float32),
                           tl.load(c_row[:, None] + offs[None, :], mask=m2, other=1.0))
        k_scale = _scale_for(tl.max(tl.abs(k), 1), QMAX)
        tl.store(KC + q_row[:, None] + offs[None, :], _symmetric_codes(k, k_scale, KIND), mask=m2)
        tl.store(KS + s_at, k_scale, mask=valid)
        v = tl.load(v_row[:, None] + offs[None, :], mask=m2, other=0.0).to(tl.float32)
        if BLEND:
            old = tl.load(VC + q_row[:, None] + offs[None, :], mask=m2, other=0)
            if KIND == 1:
                old = old.to(tl.float8e4nv, bitcast=True)
            old = old.to(tl.float32) * tl.load(VS + s_at, mask=valid, other=1.0).to(tl.float32)[:, None]
            w = tl.load(Weight + token, mask=valid, other=0.0)[:, None]
            merged = tl.load(Merged + token, mask=valid, other=0)[:, None] != 0
            v = tl.where(merged, old * w + v * (1.0 - w), v)
        v_scale = _scale_for(tl.max(tl.abs(v), 1), QMAX)
        tl.store(VC + q_row[:, None] + offs[None, :], _symmetric_codes(v, v_scale, KIND), mask=m2)
        tl.store(VS + s_at, v_scale, mask=valid)


def write_rows_reference(hist: QuantizedKV, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         channel: torch.Tensor, blend: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """:func:`write_rows` in torch ops (the definition the kernel is tested against)."""
    smoothed = (k.float() / channel[:, :, None]).flatten(1, 2)  # exact: powers of two
    values = v.float().flatten(1, 2)
    if blend is not None:
        weight, merged = (t.view(1, -1, 1, 1) for t in blend)
        old = dequantize_values(select_slots(hist, slots))
        values = torch.where(merged, old * weight + values * (1 - weight), values)
    new = [t for t in _quantize_smoothed(hist.kind, smoothed, values) if t is not None]
    for target, source in zip(_fields(hist), new):
        _as_bytes(target).index_copy_(1, slots, _as_bytes(source))


def _use_triton(hist: QuantizedKV, k: torch.Tensor, v: torch.Tensor) -> bool:
    if not triton_runs_on(k) or k.dtype == torch.float64:
        return False
    codes_alike = hist.k_codes.stride() == hist.v_codes.stride() and hist.k_codes.stride(-1) == 1
    scales = [t for t in (hist.k_scale, hist.v_scale, hist.v_zero) if t is not None]
    scales_alike = all(t.stride() == hist.k_scale.stride() for t in scales)
    dims = k.stride(-1) == 1 and v.stride(-1) == 1 and hist.head_dim in (16, 32, 64, 128, 256)
    return codes_alike and scales_alike and dims


def write_rows(hist: QuantizedKV, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, channel: torch.Tensor,
               blend: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Quantize keys and values ``(B, L, T, H, D)`` into ``slots`` (``L * T`` int64, layer-major) of ``hist``.

    ``channel`` ``(B, L, H, D)``: each layer's key smoothing factors (powers of two; the keys are divided by them
    before quantizing; ``hist.key_channel_scale`` is not read). ``blend``: ``(weight (L * T,) float32, merged
    (L * T,) bool)``; where ``merged``, the value written is ``stored * weight + v * (1 - weight)`` with
    ``stored`` the slot's value as quantized now (TempCache's running mean), else ``v``. Bit-identical to
    :func:`write_rows_reference`; no host sync, shapes fixed by the inputs, so a CUDA graph can record it.
    """
    if k.shape != v.shape or k.dim() != 5 or slots.numel() != k.shape[1] * k.shape[2]:
        raise ValueError(f"k, v must be (B, L, T, H, D) with L * T slots; got {tuple(k.shape)}, {tuple(v.shape)} "
                         f"and {slots.numel()} slots")
    if slots.numel() == 0:  # nothing to write (and a CUDA launch of an empty grid is an error)
        return
    if not _use_triton(hist, k, v):
        write_rows_reference(hist, slots, k, v, channel, blend)
        return
    batch, layers, tokens, heads, dim = k.shape
    channel = channel.float().expand(batch, layers, heads, dim)
    if channel.stride(-1) != 1:
        channel = channel.contiguous()
    slots = slots.contiguous()
    if blend is not None:
        weight = blend[0].float().contiguous()
        merged = blend[1].contiguous().view(torch.uint8) if blend[1].dtype == torch.bool else blend[1].contiguous()
    else:
        weight, merged = slots, slots  # never read
    zero = hist.v_zero if hist.v_zero is not None else hist.v_scale  # never read unless int4
    n_rows = layers * tokens * heads
    grid = (triton.cdiv(n_rows, _ROWS), batch)
    _write_rows_kernel[grid](
        k, v, channel, slots, weight, merged,
        _as_bytes(hist.k_codes), hist.k_scale, _as_bytes(hist.v_codes), hist.v_scale, zero,
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        channel.stride(0), channel.stride(1), channel.stride(2),
        hist.k_codes.stride(0), hist.k_codes.stride(1), hist.k_codes.stride(2),
        hist.k_scale.stride(0), hist.k_scale.stride(1), hist.k_scale.stride(2),
        n_rows, tokens, heads,
        KIND=KIND_IDS[hist.kind], HEAD_DIM=dim, BLEND=blend is not None, ROWS=_ROWS, ZERO_STEPS=ZERO_STEPS,
        num_warps=4,
        # no fused multiply-adds: the blend and the int4 decode round each product as torch does (bit-identical)
        enable_fp_fusion=False,
    )
