"""Block-sparse attention in Triton: each (batch, head, query block) attends to the key blocks listed for it.

Structure of the Triton fused-attention tutorial (FA2 forward): one program per (query block, batch x head),
the query tile kept in registers, an online softmax in base 2 (the ``1/sqrt(d)`` scale and ``log2(e)`` folded
into one multiplier), and a loop over key blocks. The loop runs over the row's *index list*
(``kv_block_indices[b, h, m, :count]``, FlexAttention's ``from_kv_blocks`` convention) instead of all blocks.
Tensors stay in diffusers' ``(B, S, H, D)`` layout: the kernel takes strides, so views of a larger cache buffer
(``buffer[:, :length]``) need no copy. An optional per-key bias ``(B, S_kv, H)`` is added to the logits
(TempCache's ``log(count)``; ``-inf`` marks an empty slot). Rows that see no key produce zeros and an LSE of
``-inf``, never NaN.

With a quantized history (``history=``, a ``QuantizedKV``: fp8 / int8 / int4 codes, ``kernels/quant_kv.py``) the
key positions [0, S_h) are read from the codes and dequantized in registers, tile by tile; K/V hold the current
chunk. An ascending list runs in three branch-free loops: blocks wholly in the history (codes only), the block
straddling S_h (both sources loaded with masks and merged with ``tl.where``), blocks wholly in the current chunk
(the plain tile); an unordered list runs every entry through the merged loop. Dequantization is folded where
it is cheapest: codes convert exactly to q's dtype; the keys' per-channel smoothing factors (powers of two,
loaded once per program) multiply the code tile (exact); the per-token key scale multiplies the logit columns
together with the softmax scale (the one multiply per logit the plain path already does); the per-token value
scale multiplies p before the PV dot, and int4's per-token zero point adds ``sum_j p_j zero_j`` to the
accumulator. Current-chunk columns get scale 1, zero 0.
The plain path (no history) compiles exactly as before (``HIST_KIND = 0`` removes every history op).

Split reads (``num_splits``): a third grid axis cuts each list into contiguous shares, one program each; every
share writes its normalised partial output and LSE in fp32, and ``_merge_split_partials`` combines them
(weights ``exp(lse_s - max lse)``). At head dim 128 one program fills a Hopper SM, so a grid of 444 programs
(Wan's 37 query tiles x 12 heads) runs 3.36 waves on 132 SMs; two shares make it 6.73, and the fourth wave's
idle SMs get work.
"""

from __future__ import annotations

import math
import os

import torch

from genkv.switches import env_flag

from .quant_kv import KIND_IDS

try:  # triton is optional: CPU installs use the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

LOG2E = 1.4426950408889634


def triton_available() -> bool:
    return triton is not None


def _interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``: CPU tensors, no PTX)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


KERNEL_HEAD_DIMS = (16, 32, 64, 128)  # the head dims the kernel is compiled for (one register tile each)


def kernel_fits(q: torch.Tensor) -> bool:
    """Whether the fast path should hand ``q`` (B, S, H, D) to this kernel: Triton installed, fp16 / bf16 (it
    takes fp32 too, but an fp32 model is a reference run, better served exactly elsewhere) and a head dim it is
    compiled for. The device is the caller's to check."""
    return triton is not None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in KERNEL_HEAD_DIMS


def triton_runs_on(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can take ``tensor``: Triton installed, and a CUDA tensor or the interpreter on."""
    return triton is not None and (tensor.is_cuda or _interpreting())


if triton is not None:

    @triton.jit
    def _masked_logits(qk, bias_base, offs_n, kv_len, stride_bs, HAS_BIAS: tl.constexpr, RAGGED: tl.constexpr):
        """Base-2 logits plus the key bias; columns past kv_len (ragged tiles) become -inf."""
        if HAS_BIAS:
            if RAGGED:
                bias = tl.load(bias_base + offs_n * stride_bs, mask=offs_n < kv_len, other=float("-inf"))
            else:
                bias = tl.load(bias_base + offs_n * stride_bs)
            qk += bias[None, :] * 1.4426950408889634
        elif RAGGED:
            qk = tl.where((offs_n < kv_len)[None, :], qk, float("-inf"))
        return qk

    @triton.jit
    def _softmax_step(qk, m_i, l_i, scale=1.0):
        """Online-softmax update for one tile of base-2 logits ``qk * scale`` (``scale`` > 0; 1 where the caller
        scaled them already): returns (p, alpha, m_new, l_new). The scale commutes with the max, so the row max
        is scaled once and each logit takes one FMA, ``qk * scale - m``, on its way into exp2 (the fused-attention
        tutorial's form)."""
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
        # A row that has seen no finite logit yet (bias -inf holes) keeps m = -inf: subtract 0 there, not -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        return p, alpha, m_new, l_i

    @triton.jit
    def _attend_tile(q, k, v, acc, m_i, l_i, bias_base, offs_n, kv_len, qk_scale, stride_bs,
                     HAS_BIAS: tl.constexpr, RAGGED: tl.constexpr):
        """One key tile of the online softmax (logits in base 2): returns the updated (acc, m_i, l_i)."""
        qk = tl.dot(q, tl.trans(k))
        if HAS_BIAS:
            # Scale in fp32 (not folded into the bf16 q, which would round it twice), then the bias.
            qk = _masked_logits(qk * qk_scale, bias_base, offs_n, kv_len, stride_bs, HAS_BIAS, RAGGED)
            p, alpha, m_new, l_i = _softmax_step(qk, m_i, l_i)
        else:  # unscaled logits: the step scales the row max once and fuses the rest into one FMA a logit
            if RAGGED:
                qk = tl.where((offs_n < kv_len)[None, :], qk, float("-inf"))
            p, alpha, m_new, l_i = _softmax_step(qk, m_i, l_i, qk_scale)
        # The rescaled accumulator goes into the dot as its addend: the tensor cores accumulate in place.
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, m_new, l_i

    @triton.jit
    def _attend_history_tile(q, k, v, k_col, v_col, acc, m_i, l_i, bias_base, offs_n, kv_len, qk_scale,
                             stride_bs, HAS_BIAS: tl.constexpr, RAGGED: tl.constexpr):
        """``_attend_tile`` over a tile whose history columns hold unscaled codes: the per-token key scale
        (``k_col``, 1 on current columns) multiplies the logit columns, together with qk_scale (the same one
        multiply per logit as the plain tile); the per-token value scale (``v_col``) multiplies p before the PV
        dot."""
        qk = tl.dot(q, tl.trans(k)) * (qk_scale * k_col)[None, :]
        qk = _masked_logits(qk, bias_base, offs_n, kv_len, stride_bs, HAS_BIAS, RAGGED)
        p, alpha, m_new, l_i = _softmax_step(qk, m_i, l_i)
        acc = acc * alpha[:, None] + tl.dot((p * v_col[None, :]).to(v.dtype), v)
        return acc, m_new, l_i

    @triton.jit
    def _history_codes(base, offs_n, in_hist, stride_s, HEAD_DIM: tl.constexpr, dtype: tl.constexpr):
        """A (TILE_N, HEAD_DIM) tile of fp8 / int8 codes as ``dtype`` (exact: codes are small integers or fp8);
        rows outside the history are undefined (the caller selects the current chunk's there; fp8 has no
        integer ``other``)."""
        offs_d = tl.arange(0, HEAD_DIM)
        codes = tl.load(base + offs_n[:, None] * stride_s + offs_d[None, :], mask=in_hist[:, None])
        return codes.to(dtype)

    # Four bytes of int4 codes (one 32-bit register: 4 channels' low and high nibbles) to fp16 ``nibble - OFFSET``,
    # two values per instruction: PRMT spreads bytes 0 and 1 (then 2 and 3) to the two 16-bit halves of a word, LOP3
    # sets a nibble as the mantissa of 1024.0 in both halves at once (the low one as 1024 + u, the high one as
    # 1024 + 16u, not shifted), and one packed fp16 subtract (low: x - 1024 - OFFSET) or fma (high: x / 16 - 64 -
    # OFFSET) leaves u - OFFSET, exactly. Outputs: $0 $1 the low nibbles of bytes 0-1 and 2-3, $2 $3 the high ones;
    # $4 the input word.
    _INT4_TO_FP16_ASM = """{{
        .reg .b32 pair, bits, k_low, k_scale, k_high;
        mov.b32 k_low, {low};
        mov.b32 k_scale, 0x2C002C00;
        mov.b32 k_high, {high};
        prmt.b32 pair, $4, 0, 0x4140;
        lop3.b32 bits, pair, 0x000F000F, 0x64006400, 0xEA;
        sub.rn.f16x2 $0, bits, k_low;
        lop3.b32 bits, pair, 0x00F000F0, 0x64006400, 0xEA;
        fma.rn.f16x2 $2, bits, k_scale, k_high;
        prmt.b32 pair, $4, 0, 0x4342;
        lop3.b32 bits, pair, 0x000F000F, 0x64006400, 0xEA;
        sub.rn.f16x2 $1, bits, k_low;
        lop3.b32 bits, pair, 0x00F000F0, 0x64006400, 0xEA;
        fma.rn.f16x2 $3, bits, k_scale, k_high;
    }}"""
    # (fp16 bit patterns: 1024 0x6400, 1032 0x6408, 1/16 0x2C00, -64 0xD400, -72 0xD480)
    _INT4_KEYS_ASM = tl.constexpr(_INT4_TO_FP16_ASM.format(low="0x64086408", high="0xD480D480"))  # OFFSET 8: keys
    _INT4_VALUES_ASM = tl.constexpr(_INT4_TO_FP16_ASM.format(low="0x64006400", high="0xD400D400"))  # OFFSET 0

    @triton.jit
    def _int4_unpack_asm(packed, OFFSET: tl.constexpr):
        """``_int4_halves``' ``ASM`` path: the (low, high) nibbles of a uint8 tile as fp16 ``nibble - OFFSET`` (8 or
        0), four bytes per inline-PTX call (see ``_INT4_TO_FP16_ASM``). CUDA only: the interpreter runs no PTX."""
        asm: tl.constexpr = _INT4_KEYS_ASM if OFFSET == 8.0 else _INT4_VALUES_ASM
        return tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r", [packed], dtype=(tl.float16, tl.float16), is_pure=True,
                                         pack=4)

    @triton.jit
    def _int4_halves(base, offs_n, in_hist, stride_s, HALF: tl.constexpr, dtype: tl.constexpr,
                     OFFSET: tl.constexpr, FAST: tl.constexpr = False, ASM: tl.constexpr = False,
                     MASKED: tl.constexpr = True):
        """The first and second halves of a (TILE_N, 2 * HALF) int4 tile's channels, as two (TILE_N, HALF) tiles
        of ``dtype`` minus ``OFFSET`` (8 for keys, stored offset; 0 for values). Byte j holds channel j in its
        low nibble and channel HALF + j in its high one, so one load feeds both halves and nothing is
        interleaved: the kernel keeps int4 heads as two halves end to end (tl.join + reshape, the interleave,
        scrambled channels on an H200 with Triton 3.6), and the halves of q, of the current chunk's K/V and of
        the output are contiguous rows, loaded and stored without strides. ``FAST``: fp16 tiles built from bits
        (see ``_int8_as_fp16``: nibble ``u`` as the mantissa of 1024.0, then one exact fp16 subtraction of
        ``1024 + OFFSET``), whatever ``dtype``. ``ASM`` (with ``FAST``, CUDA only): the same fp16 tiles from inline
        PTX, two values per instruction (``_int4_unpack_asm``). ``MASKED`` False: a tile wholly inside the
        history, loaded without a mask."""
        offs_h = tl.arange(0, HALF)
        if MASKED:
            packed = tl.load(base + offs_n[:, None] * stride_s + offs_h[None, :], mask=in_hist[:, None], other=0)
        else:
            packed = tl.load(base + offs_n[:, None] * stride_s + offs_h[None, :])
        if ASM:
            return _int4_unpack_asm(packed, OFFSET)
        packed = packed.to(tl.int32)
        if FAST:
            low = ((packed & 15) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - (1024.0 + OFFSET)
            high = (((packed >> 4) & 15) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - (1024.0 + OFFSET)
        else:
            low = ((packed & 15).to(tl.float32) - OFFSET).to(dtype)
            high = (((packed >> 4) & 15).to(tl.float32) - OFFSET).to(dtype)
        return low, high

    @triton.jit
    def _scale_column(base, stride_ss, offs_n, in_hist, other: tl.constexpr, MASKED: tl.constexpr):
        """One per-token column (scales or zero points) as fp32; ``other`` on columns outside the history where
        ``MASKED`` (else every column is read: a tile wholly inside the history)."""
        if MASKED:
            return tl.load(base + offs_n * stride_ss, mask=in_hist, other=other).to(tl.float32)
        return tl.load(base + offs_n * stride_ss).to(tl.float32)

    @triton.jit
    def _token_scales(hks_base, hvs_base, hvz_base, stride_ss, offs_n, in_hist, HAS_ZERO: tl.constexpr,
                      HAS_V: tl.constexpr = True, MASKED: tl.constexpr = True):
        """Per-token key scale, value scale and (int4) value zero point as column vectors: 1, 1 and 0 on
        columns outside the history (the current chunk's full-precision keys). ``HAS_V`` False: the value tiles
        hold their scales already (``_dequantized_values``): the key scales stand in, never read. ``MASKED``
        False: a tile wholly inside the history, loaded without a mask (a per-key mask on a length the kernel
        is not specialised on keeps each load scalar and out of the software pipeline)."""
        k_col = _scale_column(hks_base, stride_ss, offs_n, in_hist, 1.0, MASKED)
        v_col = _scale_column(hvs_base, stride_ss, offs_n, in_hist, 1.0, MASKED) if HAS_V else k_col
        v_zero = _scale_column(hvz_base, stride_ss, offs_n, in_hist, 0.0, MASKED) if HAS_ZERO else v_col
        return k_col, v_col, v_zero

    @triton.jit
    def _attend_history_codes(qc, kc, vc, acc, m_i, l_i, hks_base, hvs_base, stride_ss, bias_base, stride_bs,
                              offs_n, hist_len, qk_scale, HAS_BIAS: tl.constexpr, FAST: tl.constexpr = False,
                              q_step=None, q_rest=None, INT8_QK: tl.constexpr = False,
                              PV_DTYPE: tl.constexpr = None):
        """One fp8 / int8 tile wholly inside the history: bare codes (``kc`` / ``vc``, loaded by the caller
        without masks, since the tile lies inside the history) straight into the dots. ``qc`` is q times the
        keys' smoothing factors (powers of two: exact), so the key tile needs no multiply; the per-token scales
        ride on the logit columns and on p. ``FAST`` (int8): the codes become fp16 from bits (``qc`` is fp16).
        ``INT8_QK`` (int8): ``qc`` / ``q_rest`` hold q as two int8 terms (steps ``q_step`` and ``q_step / 254``
        per row) and the logits come from int8 x int8 dots on the key codes as loaded (exact in int32): no
        converted key tile to write back to shared memory for the tensor cores; p and V then use ``PV_DTYPE``."""
        if INT8_QK:
            kt = tl.trans(kc)
            # 254 high + low, summed in the int32 accumulator: exact (|.| < 2^31 up to head_dim 256), one conversion
            whole = tl.dot(q_rest, kt, tl.dot(qc, kt, out_dtype=tl.int32) * 254, out_dtype=tl.int32)
            qk = whole.to(tl.float32) * (q_step / 254.0)[:, None]
            vc = _int8_as_fp16(vc) if FAST else vc.to(PV_DTYPE)
        else:
            if FAST:
                kc = _int8_as_fp16(kc)
                vc = _int8_as_fp16(vc)
            else:
                kc = kc.to(qc.dtype)
                vc = vc.to(qc.dtype)
            qk = tl.dot(qc, tl.trans(kc))
        k_col = tl.load(hks_base + offs_n * stride_ss).to(tl.float32)
        v_col = tl.load(hvs_base + offs_n * stride_ss).to(tl.float32)
        qk = qk * (qk_scale * k_col)[None, :]
        qk = _masked_logits(qk, bias_base, offs_n, hist_len, stride_bs, HAS_BIAS, False)
        p, alpha, m_new, l_i = _softmax_step(qk, m_i, l_i)
        acc = tl.dot((p * v_col[None, :]).to(vc.dtype), vc, acc * alpha[:, None])
        return acc, m_new, l_i

    @triton.jit
    def _int8_as_fp16(codes):
        """int8 codes as fp16 without an int-to-float conversion (Hopper issues those at 16 results per clock and
        SM, an eighth of its fp16 rate): ``c + 128`` (1..255) set as the mantissa of 1024.0 gives ``1152 + c``
        exactly (fp16's spacing is 1 there), and one fp16 subtraction takes the 1152 back, exactly."""
        return ((codes.to(tl.int32) + 128) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1152.0

    @triton.jit
    def _attend_int4_halves(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, k_col, v_col, v_zero, acc_lo, acc_hi, zsum, m_i,
                            l_i, bias_base, offs_n, kv_len, qk_scale, stride_bs, HAS_BIAS: tl.constexpr,
                            RAGGED: tl.constexpr, ZSUM: tl.constexpr = True, P_SCALED: tl.constexpr = True):
        """One tile of an int4-history head held as two channel halves: logits are the sum of the two halves'
        dots; each half of the output gets its own PV dot. int4 values' zero points add ``sum_j p_j zero_j`` to
        every channel: that goes to ``zsum``, a per-row accumulator rescaled like ``l`` (0 on current columns).
        Added to the dot's accumulator instead, it serialised the wgmmas and spilled registers (ptxas C7515).
        ``ZSUM`` False: the value tiles already hold their zero points (``_zero_in_values``), so only the
        rescale is left. ``P_SCALED`` False: they hold their scales too (``_dequantized_values``), so p goes into
        the PV dots as it is."""
        qk = (tl.dot(q_lo, tl.trans(k_lo)) + tl.dot(q_hi, tl.trans(k_hi))) * (qk_scale * k_col)[None, :]
        qk = _masked_logits(qk, bias_base, offs_n, kv_len, stride_bs, HAS_BIAS, RAGGED)
        p, alpha, m_new, l_i = _softmax_step(qk, m_i, l_i)
        if P_SCALED:
            pw = (p * v_col[None, :]).to(v_lo.dtype)
        else:
            pw = p.to(v_lo.dtype)
        if ZSUM:
            zsum = zsum * alpha + tl.sum(p * v_zero[None, :], 1)
        else:
            zsum = zsum * alpha
        acc_lo = tl.dot(pw, v_lo, acc_lo * alpha[:, None])
        acc_hi = tl.dot(pw, v_hi, acc_hi * alpha[:, None])
        return acc_lo, acc_hi, zsum, m_new, l_i

    @triton.jit
    def _zero_in_values(v_lo, v_hi, hvs_base, hvz_base, stride_ss, offs_n):
        """Whole-history fp16 value tiles (codes ``u``) as ``u + zero / scale`` per key row, so that p times the
        value scale gives ``p (u scale + zero)`` in the PV dot itself and no ``zsum`` is kept. ``zero / scale`` is
        at most ~1024 in size (``quant_kv.ZERO_STEPS``), so the fp16 sum is off by at most half its spacing: 1/256
        of a step where ``|u + zero / scale| < 16``, as in attention values (rows straddle 0)."""
        v_scale = tl.load(hvs_base + offs_n * stride_ss).to(tl.float32)
        v_zero = tl.load(hvz_base + offs_n * stride_ss).to(tl.float32)
        shift = (v_zero / v_scale).to(tl.float16)[:, None]
        return v_lo + shift, v_hi + shift

    @triton.jit
    def _dequantized_values(v_lo, v_hi, hvs_base, hvz_base, stride_ss, offs_n):
        """Whole-history fp16 value tiles (codes ``u``) as ``u * scale + zero`` per key row, one fp16 fma an element:
        the values themselves, so p enters the PV dots unscaled (no multiply per logit, one scale load a tile, not
        two). Two roundings, ``zero`` to fp16 and the fma's result, each within half an fp16 spacing: < 1/128 of a
        step where the values straddle 0 (``|zero| <= 15 scale``), at most half a step where ``quant_kv.ZERO_STEPS``'
        floor binds (``|zero|`` up to 1024 steps), as for ``_zero_in_values``. A value must lie within fp16's range
        (|v| < 65504), as q already must on this path."""
        v_scale = tl.load(hvs_base + offs_n * stride_ss).to(tl.float16)[:, None]
        v_zero = tl.load(hvz_base + offs_n * stride_ss).to(tl.float16)[:, None]
        return v_lo * v_scale + v_zero, v_hi * v_scale + v_zero

    @triton.jit
    def _load_int4_tile(k_base, v_base, stride_ks, stride_vs, hk_base, hv_base, stride_hs, ch_lo, ch_hi, offs_n,
                        hist_len, kv_len, HALF: tl.constexpr, SCALE_KEYS: tl.constexpr, dtype: tl.constexpr,
                        FAST: tl.constexpr = False, ASM: tl.constexpr = False):
        """K/V halves (channels [0, HALF), [HALF, 2 HALF)) of a tile over combined positions, int4 history then
        current chunk. A tile wholly inside the history (``SCALE_KEYS`` False: the caller folded the smoothing
        factors into q) loads codes only; otherwise both sources are loaded with masks and merged, history keys
        times the smoothing factors."""
        in_hist = offs_n < hist_len
        k_lo, k_hi = _int4_halves(hk_base, offs_n, in_hist, stride_hs, HALF, dtype, 8.0, FAST, ASM, SCALE_KEYS)
        v_lo, v_hi = _int4_halves(hv_base, offs_n, in_hist, stride_hs, HALF, dtype, 0.0, FAST, ASM, SCALE_KEYS)
        if SCALE_KEYS:
            in_cur = (offs_n >= hist_len) & (offs_n < kv_len)
            cur_n = offs_n - hist_len
            offs_h = tl.arange(0, HALF)
            rows_k = k_base + cur_n[:, None] * stride_ks + offs_h[None, :]
            rows_v = v_base + cur_n[:, None] * stride_vs + offs_h[None, :]
            k_lo = tl.where(in_hist[:, None], k_lo * ch_lo[None, :], tl.load(rows_k, mask=in_cur[:, None], other=0.0))
            k_hi = tl.where(in_hist[:, None], k_hi * ch_hi[None, :],
                            tl.load(rows_k + HALF, mask=in_cur[:, None], other=0.0))
            v_lo = tl.where(in_hist[:, None], v_lo, tl.load(rows_v, mask=in_cur[:, None], other=0.0))
            v_hi = tl.where(in_hist[:, None], v_hi, tl.load(rows_v + HALF, mask=in_cur[:, None], other=0.0))
        return k_lo, k_hi, v_lo, v_hi

    @triton.jit
    def _load_history_tile(k_base, v_base, stride_ks, stride_vs, hk_base, hv_base, stride_hs, hks_base, hvs_base,
                           stride_ss, channel, offs_n, hist_len, kv_len, HEAD_DIM: tl.constexpr):
        """K/V tile over combined positions: [0, hist_len) from the quantized history, [hist_len, kv_len) from
        the current chunk. Both loads are masked and merged with tl.where, so a tile straddling the boundary
        needs no branch (the loop stays branch-free and pipelined). Returns (k, v, k_col, v_col) for fp8 / int8:
        history keys as codes times the smoothing factors (powers of two: exact), values as bare codes; the
        per-token scales come back as column vectors (1 on current columns) for _attend_history_tile."""
        offs_d = tl.arange(0, HEAD_DIM)
        in_hist = offs_n < hist_len
        in_cur = (offs_n >= hist_len) & (offs_n < kv_len)
        cur_n = offs_n - hist_len
        k_cur = tl.load(k_base + cur_n[:, None] * stride_ks + offs_d[None, :], mask=in_cur[:, None], other=0.0)
        v_cur = tl.load(v_base + cur_n[:, None] * stride_vs + offs_d[None, :], mask=in_cur[:, None], other=0.0)
        k_hist = _history_codes(hk_base, offs_n, in_hist, stride_hs, HEAD_DIM, k_cur.dtype)
        k = tl.where(in_hist[:, None], k_hist * channel[None, :], k_cur)
        v = tl.where(in_hist[:, None], _history_codes(hv_base, offs_n, in_hist, stride_hs, HEAD_DIM, v_cur.dtype),
                     v_cur)
        k_col, v_col, _ = _token_scales(hks_base, hvs_base, hvs_base, stride_ss, offs_n, in_hist, False)
        return k, v, k_col, v_col

    @triton.jit
    def _int4_blocks(idx_row, first, last, q_lo, q_hi, ch_lo, ch_hi, acc_lo, acc_hi, zsum, m_i, l_i, k_base, v_base,
                     stride_ks, stride_vs, hk_base, hv_base, stride_hs, hks_base, hvs_base, hvz_base, stride_ss,
                     bias_base, stride_bs, offs_n0, hist_len, kv_len, qk_scale, MASK_BLOCK_N: tl.constexpr,
                     TILE_N: tl.constexpr, HALF: tl.constexpr, HAS_BIAS: tl.constexpr, MERGED: tl.constexpr,
                     RAGGED: tl.constexpr, STAGES: tl.constexpr, FAST: tl.constexpr = False,
                     ASM: tl.constexpr = False, ZERO_IN_V: tl.constexpr = False,
                     SCALE_IN_V: tl.constexpr = False):
        """List entries [first, last) of an int4-history head. ``MERGED`` False: blocks wholly inside the
        history, q already times the smoothing factors, no ragged mask; True: any block, both sources merged.
        ``STAGES``: the loop's software-pipelining depth. ``FAST`` (whole-history blocks only): codes built as
        fp16 from bits, q in fp16; ``ASM``: those bits set by inline PTX (see ``_int4_halves``); ``ZERO_IN_V``
        (with ``FAST``): the zero points added to the value tiles (``_zero_in_values``) instead of ``zsum``;
        ``SCALE_IN_V`` (with ``ZERO_IN_V``): the value tiles dequantized whole (``_dequantized_values``), p unscaled."""
        for i in tl.range(first, last, num_stages=STAGES):
            block = tl.load(idx_row + i)
            for sub in tl.static_range(0, MASK_BLOCK_N // TILE_N):
                offs_n = block * MASK_BLOCK_N + sub * TILE_N + offs_n0
                k_lo, k_hi, v_lo, v_hi = _load_int4_tile(k_base, v_base, stride_ks, stride_vs, hk_base, hv_base,
                                                         stride_hs, ch_lo, ch_hi, offs_n, hist_len, kv_len, HALF,
                                                         MERGED, q_lo.dtype, FAST, ASM)
                if SCALE_IN_V:
                    v_lo, v_hi = _dequantized_values(v_lo, v_hi, hvs_base, hvz_base, stride_ss, offs_n)
                elif ZERO_IN_V:
                    v_lo, v_hi = _zero_in_values(v_lo, v_hi, hvs_base, hvz_base, stride_ss, offs_n)
                k_col, v_col, v_zero = _token_scales(hks_base, hvs_base, hvz_base, stride_ss, offs_n,
                                                     offs_n < hist_len, not ZERO_IN_V, not SCALE_IN_V, MERGED)
                acc_lo, acc_hi, zsum, m_i, l_i = _attend_int4_halves(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, k_col,
                                                                     v_col, v_zero, acc_lo, acc_hi, zsum, m_i, l_i,
                                                                     bias_base, offs_n, kv_len, qk_scale, stride_bs,
                                                                     HAS_BIAS, RAGGED, not ZERO_IN_V, not SCALE_IN_V)
        return acc_lo, acc_hi, zsum, m_i, l_i

    @triton.jit
    def _current_tile(base, stride_s, offs_n, offs_d, hist_len, kv_len, RAGGED: tl.constexpr):
        """Rows of a tile wholly past the history (combined positions ``offs_n`` >= hist_len) from the current
        chunk's full-precision K or V, columns ``offs_d``; rows past kv_len read as zeros when ``RAGGED``."""
        ptrs = base + (offs_n - hist_len)[:, None] * stride_s + offs_d[None, :]
        if RAGGED:
            return tl.load(ptrs, mask=(offs_n < kv_len)[:, None], other=0.0)
        return tl.load(ptrs)

    @triton.jit
    def _current_blocks(idx_row, first, last, q, acc, m_i, l_i, k_base, v_base, stride_ks, stride_vs, bias_base,
                        stride_bs, offs_n0, hist_len, kv_len, qk_scale, MASK_BLOCK_N: tl.constexpr,
                        TILE_N: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, RAGGED: tl.constexpr):
        """List entries [first, last) of an fp8 / int8-history head whose blocks lie wholly in the current chunk:
        the plain kernel's tile (no codes, no scales), K/V rows offset by hist_len."""
        offs_d = tl.arange(0, HEAD_DIM)
        for i in tl.range(first, last):
            block = tl.load(idx_row + i)
            for sub in tl.static_range(0, MASK_BLOCK_N // TILE_N):
                offs_n = block * MASK_BLOCK_N + sub * TILE_N + offs_n0
                k = _current_tile(k_base, stride_ks, offs_n, offs_d, hist_len, kv_len, RAGGED)
                v = _current_tile(v_base, stride_vs, offs_n, offs_d, hist_len, kv_len, RAGGED)
                acc, m_i, l_i = _attend_tile(q, k, v, acc, m_i, l_i, bias_base, offs_n, kv_len, qk_scale, stride_bs,
                                             HAS_BIAS, RAGGED)
        return acc, m_i, l_i

    @triton.jit
    def _int4_current_blocks(idx_row, first, last, q_lo, q_hi, acc_lo, acc_hi, zsum, m_i, l_i, k_base, v_base,
                             stride_ks, stride_vs, bias_base, stride_bs, offs_n0, hist_len, kv_len, qk_scale,
                             MASK_BLOCK_N: tl.constexpr, TILE_N: tl.constexpr, HALF: tl.constexpr,
                             HAS_BIAS: tl.constexpr, RAGGED: tl.constexpr):
        """``_current_blocks`` for an int4-history head, whose q and accumulator are held as two channel halves:
        contiguous half-row loads of the current chunk's K/V, no codes, no scales (the zero points' ``zsum`` is
        only rescaled)."""
        offs_h = tl.arange(0, HALF)
        for i in tl.range(first, last):
            block = tl.load(idx_row + i)
            for sub in tl.static_range(0, MASK_BLOCK_N // TILE_N):
                offs_n = block * MASK_BLOCK_N + sub * TILE_N + offs_n0
                k_lo = _current_tile(k_base, stride_ks, offs_n, offs_h, hist_len, kv_len, RAGGED)
                k_hi = _current_tile(k_base + HALF, stride_ks, offs_n, offs_h, hist_len, kv_len, RAGGED)
                v_lo = _current_tile(v_base, stride_vs, offs_n, offs_h, hist_len, kv_len, RAGGED)
                v_hi = _current_tile(v_base + HALF, stride_vs, offs_n, offs_h, hist_len, kv_len, RAGGED)
                qk = (tl.dot(q_lo, tl.trans(k_lo)) + tl.dot(q_hi, tl.trans(k_hi))) * qk_scale
                qk = _masked_logits(qk, bias_base, offs_n, kv_len, stride_bs, HAS_BIAS, RAGGED)
                p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i)
                pv = p.to(v_lo.dtype)
                zsum = zsum * alpha
                acc_lo = tl.dot(pv, v_lo, acc_lo * alpha[:, None])
                acc_hi = tl.dot(pv, v_hi, acc_hi * alpha[:, None])
        return acc_lo, acc_hi, zsum, m_i, l_i

    @triton.jit
    def _initial_acc(rows, cols, seen, HAS_INIT: tl.constexpr, TILE_M: tl.constexpr, WIDTH: tl.constexpr):
        """The (TILE_M, WIDTH) accumulator's start, columns ``cols``: the partial output being resumed (zeros
        where it saw no key), or zeros."""
        if HAS_INIT:
            return tl.load(rows + cols[None, :], mask=seen[:, None], other=0.0).to(tl.float32)
        return tl.zeros([TILE_M, WIDTH], dtype=tl.float32)

    # Lengths change every chunk: without do_not_specialize, Triton would compile a new variant whenever one
    # crosses a multiple of 16 (seconds of JIT inside a rollout).
    @triton.jit(do_not_specialize=["q_len", "kv_len", "hist_len"])
    def _block_sparse_fwd(
        Q, K, V, Bias, Out, Lse, Idx, Cnt,
        HK, HV, HKS, HVS, HVZ, HC, Init, InitLse,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ob, stride_os, stride_oh,
        stride_bb, stride_bs, stride_bh,
        stride_ib, stride_ih, stride_iq,
        stride_cb, stride_ch,
        stride_lb, stride_lh,
        stride_hb, stride_hs, stride_hh,
        stride_sb, stride_ss, stride_sh,
        stride_xb, stride_xh,
        stride_zb, stride_zs, stride_zh,
        stride_yb, stride_yh,
        stride_op, stride_lp,
        num_heads, q_len, kv_len, hist_len, qk_scale,
        HAS_BIAS: tl.constexpr,
        STORE_LSE: tl.constexpr,
        MASK_BLOCK_M: tl.constexpr,
        MASK_BLOCK_N: tl.constexpr,
        TILE_M: tl.constexpr,
        TILE_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        RAGGED: tl.constexpr,
        WARP_SPECIALIZE: tl.constexpr,
        USE_TMA: tl.constexpr,
        HIST_KIND: tl.constexpr,
        HAS_INIT: tl.constexpr,
        FAST_DEQUANT: tl.constexpr,
        INT8_QK: tl.constexpr,
        INT4_ASM: tl.constexpr,
        INT4_ZERO_IN_V: tl.constexpr,
        INT4_SCALE_IN_V: tl.constexpr,
        LIST_WIDTH: tl.constexpr,
        NUM_STAGES: tl.constexpr,
        SPLIT: tl.constexpr = False,
    ):
        # One program per (query tile, batch x head, split). The block lists are at the mask's granularity
        # (MASK_BLOCK_M x MASK_BLOCK_N); tiles may be smaller, so the kernel's shape is tuned independently.
        # With several splits, split s reads the s-th contiguous share of each list and writes its partial
        # (normalised output, LSE) to slot s of Out / Lse (fp32 workspaces, stride_op / stride_lp apart), which
        # _merge_split_partials combines.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2) if SPLIT else 0
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        offs_m = pid_m * TILE_M + tl.arange(0, TILE_M)
        offs_n0 = tl.arange(0, TILE_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < q_len

        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

        m_i = tl.full([TILE_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([TILE_M], dtype=tl.float32)
        init_rows = Init + b * stride_zb + h * stride_zh + offs_m[:, None] * stride_zs
        seen = row_ok
        if HAS_INIT:
            # Resume from a partial attention over other keys (out0, lse0; e.g. cuDNN over the chunk's own keys):
            # in base 2, m = lse0 * log2(e) and l = 1 make acc / l = out0 and m + log2(l) = lse0, so the loop
            # continues that softmax exactly. Rows the partial saw nothing in (lse0 = -inf) start empty.
            # Only the first split resumes; the others start empty and are merged with it afterwards.
            first_share = row_ok & (pid_s == 0) if SPLIT else row_ok
            lse0 = tl.load(InitLse + b * stride_yb + h * stride_yh + offs_m, mask=first_share, other=float("-inf"))
            seen = lse0 > float("-inf")
            m_i = tl.where(seen, lse0 * 1.4426950408889634, float("-inf"))
            l_i = tl.where(seen, 1.0, 0.0)
        acc = _initial_acc(init_rows, offs_d, seen, HAS_INIT, TILE_M, HEAD_DIM)

        mask_row = (pid_m * TILE_M) // MASK_BLOCK_M
        count = tl.load(Cnt + b * stride_cb + h * stride_ch + mask_row)
        # This split's share of the list: entries [first, last). One split compiles as before the split axis
        # existed (SPLIT constexpr): the int4 path sits at 255 registers, where a few more live values made ptxas
        # serialise its wgmmas (C7515).
        first = 0
        last = count
        if SPLIT:
            share = tl.cdiv(count, tl.num_programs(2))
            first = tl.minimum(pid_s * share, count)
            last = tl.minimum(first + share, count)
        idx_row = Idx + b * stride_ib + h * stride_ih + mask_row * stride_iq
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        bias_base = Bias + b * stride_bb + h * stride_bh
        # Branch-free loop bodies so Triton software-pipelines the K/V loads (control flow inside a loop would
        # stop it): RAGGED (kv_len not a multiple of the tile) masks every tile, decided once at launch.
        if HIST_KIND == 0:
            if USE_TMA:
                # Hopper bulk copies: rows past kv_len read as zeros (their logits are masked to -inf below).
                k_desc = tl.make_tensor_descriptor(k_base, shape=[kv_len, HEAD_DIM], strides=[stride_ks, 1],
                                                   block_shape=[TILE_N, HEAD_DIM])
                v_desc = tl.make_tensor_descriptor(v_base, shape=[kv_len, HEAD_DIM], strides=[stride_vs, 1],
                                                   block_shape=[TILE_N, HEAD_DIM])
            for i in tl.range(first, last, warp_specialize=WARP_SPECIALIZE):
                block = tl.load(idx_row + i)
                for sub in tl.static_range(0, MASK_BLOCK_N // TILE_N):
                    start_n = block * MASK_BLOCK_N + sub * TILE_N
                    offs_n = start_n + offs_n0
                    if USE_TMA:
                        k = k_desc.load([start_n, 0])
                        v = v_desc.load([start_n, 0])
                    elif RAGGED:
                        col_ok = offs_n < kv_len
                        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=col_ok[:, None],
                                    other=0.0)
                        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=col_ok[:, None],
                                    other=0.0)
                    else:
                        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :])
                        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :])
                    acc, m_i, l_i = _attend_tile(q, k, v, acc, m_i, l_i, bias_base, offs_n, kv_len, qk_scale,
                                                 stride_bs, HAS_BIAS, RAGGED)
        else:
            # A quantized history (HIST_KIND 1 fp8, 2 int8, 3 int4) holds key/value positions [0, hist_len);
            # K/V hold [hist_len, kv_len). An ascending list (what routing and dense lists are) is three runs: the
            # blocks wholly inside the history, at most one block straddling hist_len, then the blocks wholly in
            # the current chunk. Each run has a loop of its own: the history's loads codes only, with the keys'
            # smoothing factors folded into q once per program; the straddling block's loads both sources and
            # merges them; the current chunk's is the plain kernel's tile (in a routed list most blocks are the
            # chunk's own: 36 of 53 at Wan shapes with top-16). Every entry of an unordered list runs the merged
            # loop. The merged loop is not software-pipelined (one stage): it runs at most one block of an ordered
            # list, and its tiles (codes and the chunk's K/V) are what overflowed shared memory at 3 stages.
            hk_base = HK + b * stride_hb + h * stride_hh
            hv_base = HV + b * stride_hb + h * stride_hh
            hks_base = HKS + b * stride_sb + h * stride_sh
            hvs_base = HVS + b * stride_sb + h * stride_sh
            hvz_base = HVZ + b * stride_sb + h * stride_sh
            offs_l = tl.arange(0, LIST_WIDTH)
            listed = offs_l < count
            ids = tl.load(idx_row + offs_l, mask=listed, other=0)
            following = tl.load(idx_row + offs_l + 1, mask=offs_l + 1 < count, other=0)
            unordered = tl.sum(((offs_l + 1 < count) & (following <= ids)).to(tl.int32), 0)
            whole = tl.sum((listed & ((ids + 1) * MASK_BLOCK_N <= hist_len)).to(tl.int32), 0)
            current = tl.sum((listed & (ids * MASK_BLOCK_N >= hist_len)).to(tl.int32), 0)
            n_whole = tl.where(unordered == 0, whole, 0)
            merged_end = tl.where(unordered == 0, count - current, count)
            # The three runs [0, n_whole), [n_whole, merged_end), [merged_end, count), cut to this split's share.
            if SPLIT:
                n_whole = tl.minimum(tl.maximum(n_whole, first), last)
                merged_end = tl.minimum(tl.maximum(merged_end, first), last)
            if HIST_KIND == 3:
                # int4: the head is held as two channel halves end to end (see _int4_halves).
                offs_h = tl.arange(0, HEAD_DIM // 2)
                channel_row = HC + b * stride_xb + h * stride_xh
                ch_lo = tl.load(channel_row + offs_h).to(q.dtype)
                ch_hi = tl.load(channel_row + HEAD_DIM // 2 + offs_h).to(q.dtype)
                q_rows = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_h[None, :]
                q_lo = tl.load(q_rows, mask=row_ok[:, None], other=0.0)
                q_hi = tl.load(q_rows + HEAD_DIM // 2, mask=row_ok[:, None], other=0.0)
                acc_lo = _initial_acc(init_rows, offs_h, seen, HAS_INIT, TILE_M, HEAD_DIM // 2)
                acc_hi = _initial_acc(init_rows + HEAD_DIM // 2, offs_h, seen, HAS_INIT, TILE_M, HEAD_DIM // 2)
                qc_lo = q_lo * ch_lo[None, :]
                qc_hi = q_hi * ch_hi[None, :]
                if FAST_DEQUANT:  # the codes become fp16: so does q (exact for a bf16 q within fp16's range)
                    qc_lo = qc_lo.to(tl.float16)
                    qc_hi = qc_hi.to(tl.float16)
                zsum = tl.zeros([TILE_M], dtype=tl.float32)  # sum_j p_j zero_j (see _attend_int4_halves)
                acc_lo, acc_hi, zsum, m_i, l_i = _int4_blocks(
                    idx_row, first, n_whole, qc_lo, qc_hi, ch_lo, ch_hi, acc_lo, acc_hi, zsum, m_i, l_i, k_base, v_base,
                    stride_ks, stride_vs, hk_base, hv_base, stride_hs, hks_base, hvs_base, hvz_base, stride_ss,
                    bias_base, stride_bs, offs_n0, hist_len, kv_len, qk_scale, MASK_BLOCK_N, TILE_N, HEAD_DIM // 2,
                    HAS_BIAS, False, False, NUM_STAGES, FAST_DEQUANT, INT4_ASM, INT4_ZERO_IN_V,
                    INT4_SCALE_IN_V)
                acc_lo, acc_hi, zsum, m_i, l_i = _int4_blocks(
                    idx_row, n_whole, merged_end, q_lo, q_hi, ch_lo, ch_hi, acc_lo, acc_hi, zsum, m_i, l_i, k_base,
                    v_base, stride_ks, stride_vs, hk_base, hv_base, stride_hs, hks_base, hvs_base, hvz_base,
                    stride_ss, bias_base, stride_bs, offs_n0, hist_len, kv_len, qk_scale, MASK_BLOCK_N, TILE_N,
                    HEAD_DIM // 2, HAS_BIAS, True, RAGGED, 1)
                acc_lo, acc_hi, zsum, m_i, l_i = _int4_current_blocks(
                    idx_row, merged_end, last, q_lo, q_hi, acc_lo, acc_hi, zsum, m_i, l_i, k_base, v_base, stride_ks,
                    stride_vs, bias_base, stride_bs, offs_n0, hist_len, kv_len, qk_scale, MASK_BLOCK_N, TILE_N,
                    HEAD_DIM // 2, HAS_BIAS, RAGGED)
            else:
                channel = tl.load(HC + b * stride_xb + h * stride_xh + offs_d).to(q.dtype)
                qc = q * channel[None, :]
                q_step = tl.full([TILE_M], 1.0, tl.float32)
                q_rest = qc  # (a placeholder unless INT8_QK)
                if INT8_QK:  # q as two int8 terms per row: codes, then the codes of what they left (~15 bits)
                    qc32 = qc.to(tl.float32)
                    q_amax = tl.max(tl.abs(qc32), 1)
                    q_step = tl.where(q_amax > 0.0, q_amax / 127.0, 1.0)
                    q_high = tl.floor(qc32 / q_step[:, None] + 0.5)
                    rest = (qc32 - q_high * q_step[:, None]) / (q_step[:, None] / 254.0)  # |rest| <= 127
                    qc_codes = q_high.to(tl.int8)
                    q_rest = tl.minimum(tl.maximum(tl.floor(rest + 0.5), -127.0), 127.0).to(tl.int8)
                else:
                    qc_codes = qc.to(tl.float16) if FAST_DEQUANT else qc  # int8 only (fp8 converts in hardware)
                for i in tl.range(first, n_whole):
                    block = tl.load(idx_row + i)
                    for sub in tl.static_range(0, MASK_BLOCK_N // TILE_N):
                        offs_n = block * MASK_BLOCK_N + sub * TILE_N + offs_n0
                        kc = tl.load(hk_base + offs_n[:, None] * stride_hs + offs_d[None, :])
                        vc = tl.load(hv_base + offs_n[:, None] * stride_hs + offs_d[None, :])
                        acc, m_i, l_i = _attend_history_codes(qc_codes, kc, vc, acc, m_i, l_i, hks_base, hvs_base,
                                                              stride_ss, bias_base, stride_bs, offs_n, hist_len,
                                                              qk_scale, HAS_BIAS, FAST_DEQUANT, q_step, q_rest,
                                                              INT8_QK, q.dtype)
                for i in tl.range(n_whole, merged_end, num_stages=1):
                    block = tl.load(idx_row + i)
                    for sub in tl.static_range(0, MASK_BLOCK_N // TILE_N):
                        offs_n = block * MASK_BLOCK_N + sub * TILE_N + offs_n0
                        k, v, k_col, v_col = _load_history_tile(k_base, v_base, stride_ks, stride_vs, hk_base,
                                                                hv_base, stride_hs, hks_base, hvs_base, stride_ss,
                                                                channel, offs_n, hist_len, kv_len, HEAD_DIM)
                        acc, m_i, l_i = _attend_history_tile(q, k, v, k_col, v_col, acc, m_i, l_i, bias_base,
                                                             offs_n, kv_len, qk_scale, stride_bs, HAS_BIAS, RAGGED)
                acc, m_i, l_i = _current_blocks(idx_row, merged_end, last, q, acc, m_i, l_i, k_base, v_base,
                                                stride_ks, stride_vs, bias_base, stride_bs, offs_n0, hist_len, kv_len,
                                                qk_scale, MASK_BLOCK_N, TILE_N, HEAD_DIM, HAS_BIAS, RAGGED)

        denom = tl.where(l_i == 0.0, 1.0, l_i)
        o_rows = Out + (pid_s * stride_op if SPLIT else 0) + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os
        if HIST_KIND == 3:
            acc_lo += zsum[:, None]
            acc_hi += zsum[:, None]
            tl.store(o_rows + offs_h[None, :], (acc_lo / denom[:, None]).to(Out.dtype.element_ty),
                     mask=row_ok[:, None])
            tl.store(o_rows + HEAD_DIM // 2 + offs_h[None, :], (acc_hi / denom[:, None]).to(Out.dtype.element_ty),
                     mask=row_ok[:, None])
        else:
            tl.store(o_rows + offs_d[None, :], (acc / denom[:, None]).to(Out.dtype.element_ty),
                     mask=row_ok[:, None])
        if STORE_LSE:
            lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(denom)) / 1.4426950408889634)
            lse_rows = Lse + (pid_s * stride_lp if SPLIT else 0) + b * stride_lb + h * stride_lh + offs_m
            tl.store(lse_rows, lse, mask=row_ok)

    @triton.jit(do_not_specialize=["q_len"])
    def _merge_split_partials(
        PartOut, PartLse, Out, Lse,
        stride_pp, stride_pb, stride_ps, stride_ph,
        stride_lp, stride_lb, stride_lh,
        stride_ob, stride_os, stride_oh,
        stride_yb, stride_yh,
        num_heads, q_len,
        N_SPLITS: tl.constexpr,
        TILE_M: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        STORE_LSE: tl.constexpr,
    ):
        """Softmax-weighted sum of the splits' normalised partial outputs: weights exp(lse_s - max_s lse_s);
        the result's LSE is max + log(sum of weights). Rows no split saw (every lse -inf) get zeros and -inf."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        offs_m = pid_m * TILE_M + tl.arange(0, TILE_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < q_len
        lse_rows = PartLse + b * stride_lb + h * stride_lh + offs_m
        m = tl.full([TILE_M], float("-inf"), dtype=tl.float32)
        for s in tl.static_range(N_SPLITS):
            m = tl.maximum(m, tl.load(lse_rows + s * stride_lp, mask=row_ok, other=float("-inf")))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        total = tl.zeros([TILE_M], dtype=tl.float32)
        acc = tl.zeros([TILE_M, HEAD_DIM], dtype=tl.float32)
        out_rows = PartOut + b * stride_pb + h * stride_ph + offs_m[:, None] * stride_ps + offs_d[None, :]
        for s in tl.static_range(N_SPLITS):
            weight = tl.exp(tl.load(lse_rows + s * stride_lp, mask=row_ok, other=float("-inf")) - m_safe)
            total += weight
            acc += weight[:, None] * tl.load(out_rows + s * stride_pp, mask=row_ok[:, None], other=0.0)
        denom = tl.where(total == 0.0, 1.0, total)
        o_rows = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
        tl.store(o_rows, (acc / denom[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None])
        if STORE_LSE:
            lse = tl.where(total == 0.0, float("-inf"), m + tl.log(denom))
            tl.store(Lse + b * stride_yb + h * stride_yh + offs_m, lse, mask=row_ok)


def _tma_usable(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Device-side tensor descriptors: Hopper or newer (or the interpreter), 16-byte aligned bases and rows."""
    interpreting = _interpreting()
    if not interpreting and not (k.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9):
        return False
    size = k.element_size()
    aligned = all(t.data_ptr() % 16 == 0 and (t.stride(1) * size) % 16 == 0 and (t.stride(2) * size) % 16 == 0
                  for t in (k, v))
    if aligned and not interpreting:
        _install_descriptor_allocator()
    return aligned


_ALLOCATOR_SET = False


def _install_descriptor_allocator() -> None:
    """Device-side descriptors need scratch memory; Triton asks for it through a process-wide allocator."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device="cuda", dtype=torch.int8))
        _ALLOCATOR_SET = True


def _check(q, k, v, kv_block_indices, kv_block_counts, key_bias, block_m, block_n, hist_len: int = 0) -> None:
    interpreting = _interpreting()
    if not interpreting and not all(t.is_cuda for t in (q, k, v, kv_block_indices, kv_block_counts)):
        raise ValueError("triton block-sparse attention needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernel "
                         "on the CPU); use backend='gather' for CPU tensors")
    allowed = (torch.float16, torch.float32) if interpreting else (torch.float16, torch.bfloat16, torch.float32)
    if q.dtype not in allowed or k.dtype != q.dtype or v.dtype != q.dtype:
        hint = " (the Triton interpreter computes bf16 wrongly)" if interpreting else ""
        raise TypeError(f"triton block-sparse attention takes {', '.join(map(str, allowed))} q/k/v{hint}; "
                        f"got {q.dtype}")
    d = q.shape[-1]
    if d not in KERNEL_HEAD_DIMS:
        dims = ", ".join(map(str, KERNEL_HEAD_DIMS))
        raise ValueError(f"triton block-sparse attention supports head_dim {dims}; got {d} "
                         "(use backend='torch')")
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
    s_kv = hist_len + k.shape[1]
    if key_bias is not None and key_bias.shape != (b, s_kv, h):
        raise ValueError(f"key_bias must be (B, S_kv, H) = {(b, s_kv, h)}, got {tuple(key_bias.shape)}")


_HIST_KINDS = KIND_IDS


def _initial_args(initial, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Kernel arguments for a partial attention to resume from: 2 pointers and 5 strides (placeholders for
    none)."""
    if initial is None:
        return q, q, (0,) * 5
    out0, lse0 = initial
    b, s_q, h, d = q.shape
    if tuple(out0.shape) != (b, s_q, h, d) or tuple(lse0.shape) != (b, h, s_q):
        raise ValueError(f"initial must be (out (B, S_q, H, D), lse (B, H, S_q)) = {(b, s_q, h, d)}, {(b, h, s_q)}; "
                         f"got {tuple(out0.shape)}, {tuple(lse0.shape)}")
    if out0.stride(-1) != 1 or lse0.stride(-1) != 1 or out0.device != q.device or lse0.device != q.device:
        raise ValueError("initial's out and lse must be contiguous in their last dimension and on q's device")
    if lse0.dtype != torch.float32:
        lse0 = lse0.float()
    return out0, lse0, (out0.stride(0), out0.stride(1), out0.stride(2), lse0.stride(0), lse0.stride(1))


def _history_args(history, q: torch.Tensor) -> tuple[tuple, tuple, int]:
    """Kernel arguments for a quantized history: 6 pointers, 8 strides and its kind (placeholders for none).

    The kernel walks keys and values with one set of strides: codes of K and V must share their layout, and
    so must the scales (true of everything ``quantize_kv`` / ``QuantizedKV.empty`` build, and of their views).
    """
    if history is None:
        return (q,) * 6, (0,) * 8, 0
    codes, scales = (history.k_codes, history.v_codes), (history.k_scale, history.v_scale)
    if history.v_zero is not None:
        scales += (history.v_zero,)
    b, _, h, d = q.shape
    if history.k_codes.shape[0] != b or history.k_codes.shape[2] != h or history.head_dim != d:
        raise ValueError(f"history (B, S_h, H, D) = {tuple(history.k_codes.shape[:3]) + (history.head_dim,)} does "
                         f"not match q's (B, H, D) = {(b, h, d)}")
    if any(t.stride() != codes[0].stride() for t in codes) or any(t.stride() != scales[0].stride() for t in scales):
        raise ValueError("the history's key and value codes (and scales) must share their strides")
    if codes[0].stride(-1) != 1 or history.key_channel_scale.stride(-1) != 1 or codes[0].device != q.device:
        raise ValueError("the history's codes and smoothing factors must be contiguous in the head dimension "
                         "and on q's device")
    channel = history.key_channel_scale.float().expand(b, h, d)
    zero = history.v_zero if history.v_zero is not None else history.v_scale  # placeholder, never read
    pointers = (history.k_codes, history.v_codes, history.k_scale, history.v_scale, zero, channel)
    strides = (*codes[0].stride()[:3], *scales[0].stride(), channel.stride(0), channel.stride(1))
    return pointers, strides, _HIST_KINDS[history.kind]


def _use_fast_dequant(requested: bool | None, hist_kind: int, q_dtype: torch.dtype) -> bool:
    """Whether whole-history tiles build their codes from bits (see ``fast_dequant`` below).

    Only int8 (kind 2) and int4 (kind 3) codes: fp8 converts in hardware. Only for a 16-bit q: those dots then
    take q in fp16, which is exact for bf16 / fp16 but would round an fp32 q. Default (``None``): env
    ``GENKV_FAST_DEQUANT`` (``1`` / ``0``) if set, else on for int4 alone, as timed on an H100 (top-16 lists at Wan
    shapes, 3 stages: int4 0.93 ms vs 1.05 without; int8 0.93 vs 0.84, slower)."""
    if hist_kind not in (_HIST_KINDS["int8"], _HIST_KINDS["int4"]) or q_dtype not in (torch.float16, torch.bfloat16):
        return False
    return _switch(requested, "GENKV_FAST_DEQUANT", default=hist_kind == _HIST_KINDS["int4"])


def _default_tile_n(hist_kind: int, block_n: int) -> int:
    """The key tile of a launch that names none: the mask's block, but at most 64 keys for an int4 history (kind
    3): 0.802 vs 0.849 ms on top-16 lists and 6.16 vs 6.46 ms with every block listed (H200, Wan shapes,
    ``bench_quant_kv.py --launch-sweep`` under ``do_bench``), and its sm_90 build spills 296 bytes, not 664."""
    return min(block_n, 64) if hist_kind == _HIST_KINDS["int4"] else block_n


def _use_int8_qk(requested: bool | None, hist_kind: int, q_dtype: torch.dtype) -> bool:
    """Whether whole-history int8 tiles take their logits from int8 x int8 dots (see ``int8_qk`` below): int8
    histories (kind 2) with a 16-bit q only; default (``None``) env ``GENKV_INT8_QK`` (``1`` / ``0``) if set, else
    on, as timed on an H100 (Wan shapes, 3 stages: every block listed 5.16 ms vs 5.57 without; top-16 lists 0.87
    vs 0.87-0.91)."""
    if hist_kind != _HIST_KINDS["int8"] or q_dtype not in (torch.float16, torch.bfloat16):
        return False
    return _switch(requested, "GENKV_INT8_QK", default=True)


def _use_int4_asm(requested: bool | None, hist_kind: int, fast_dequant: bool, device: torch.device) -> bool:
    """Whether whole-history int4 tiles unpack their nibbles with inline PTX (see ``int4_asm`` below): int4
    histories (kind 3) on ``fast_dequant``'s path (its fp16 tiles, its q in fp16), on a CUDA device, not under the
    interpreter (it runs no PTX). Default (``None``): env ``GENKV_INT4_ASM`` (``1`` / ``0``) if set, else on, as
    timed on an H100 (Wan shapes, split read: top-16 lists 0.639 ms vs 0.654 without, fastar's 1.001 vs 1.050)."""
    if hist_kind != _HIST_KINDS["int4"] or not fast_dequant or device.type != "cuda" or _interpreting():
        return False
    return _switch(requested, "GENKV_INT4_ASM", default=True)


def _use_int4_zero_in_v(requested: bool | None, hist_kind: int, fast_dequant: bool) -> bool:
    """Whether whole-history int4 tiles carry their zero points in the value tiles (see ``int4_zero_in_v``
    below): int4 histories (kind 3) on ``fast_dequant``'s path (fp16 value tiles). Default (``None``): env
    ``GENKV_INT4_ZERO_IN_V`` (``1`` / ``0``) if set, else on, as timed on an H100 (Wan shapes, the split read:
    ``fastar``'s lists 0.958 ms vs 1.002 without, top-16 0.625 vs 0.636; one call on top-16 lists, not the CUDA
    default, 0.798 vs 0.779)."""
    if hist_kind != _HIST_KINDS["int4"] or not fast_dequant:
        return False
    return _switch(requested, "GENKV_INT4_ZERO_IN_V", default=True)


def _use_int4_scale_in_v(requested: bool | None, hist_kind: int, zero_in_v: bool) -> bool:
    """Whether whole-history int4 tiles carry their scales in the value tiles too (see ``int4_scale_in_v``
    below): on ``int4_zero_in_v``'s path only. Default (``None``): env ``GENKV_INT4_SCALE_IN_V`` (``1`` / ``0``)
    if set, else on, as timed on an H100 (Wan shapes, one run, 2026-12-06): on ``fastar``'s lists the split read (the
    CUDA default) 0.896 ms vs 0.967 without, one kernel call 1.232 vs 1.289; on top-16 lists 0.599 vs 0.629 and
    0.746 vs 0.787; the compiled ``fastar`` rollout's int4 chunk 354.5 ms vs 359.5 (1.055x vs 1.073x its bf16
    chunk; 1.057x over 2000 frames)."""
    if hist_kind != _HIST_KINDS["int4"] or not zero_in_v:
        return False
    return _switch(requested, "GENKV_INT4_SCALE_IN_V", default=True)


MAX_SPLITS = 4
# What a launch that names no split count gets (env GENKV_NUM_SPLITS overrides it): "auto" (the wave rule of
# _num_splits) or a count.
DEFAULT_SPLITS: int | str = "auto"
_SM_COUNTS: dict[int, tuple[int, int]] = {}  # device index -> (SM count, compute capability major)


def _num_splits(requested: int | str | None, programs: int, list_width: int, head_dim: int,
                device: torch.device, short_reads: bool = False, out_elements: int = 0) -> int:
    """How many contiguous shares each block list is read in (see ``num_splits`` below).

    ``requested`` None: env ``GENKV_NUM_SPLITS`` (a count or ``auto``) if set, else ``DEFAULT_SPLITS``. ``"auto"``
    chooses from the launch's shape alone (no device sync, so CUDA graphs and compiled code can record it): at
    head dim 128 a program takes a whole Hopper SM (its 3-stage K/V ring fills shared memory:
    ``eval/kernel_resources.py``), so the grid runs in waves of one program per SM, and a grid of 444 programs
    (Wan's 37 query tiles x 12 heads) on 132 SMs leaves its fourth wave a third full (84% busy). Each split
    count n in 1..4 gives ``programs * n`` programs; the one whose waves are fullest wins, less 3 points per
    extra split for the merge pass, with at least 2 list entries per split, and the partials (``out_elements``
    fp32 values each) within int32 offsets. 1 off CUDA (the interpreter), off Hopper (compute capability 9) and
    at other head dims, whose occupancy this rule does not model, for an empty grid, and for ``short_reads``: the
    history part of a split read (a resumed call; the chunk's own keys went to SDPA) lists ~30 blocks, too few
    to pay for the merge pass and the per-program prologue run once per split (H100, ``fastar``'s lists, one
    call split / not: bf16 0.666 / 0.656 ms, int8 0.923 / 0.879; int4 0.870 / 0.912, yet its compiled rollout's
    chunk 358.1 / 357.1 ms, so no kind splits there)."""
    if requested is None:
        requested = os.environ.get("GENKV_NUM_SPLITS", "") or DEFAULT_SPLITS
    if isinstance(requested, str):
        requested = requested.strip().lower()
        requested = int(requested) if requested.isascii() and requested.isdigit() else requested
    if requested != "auto":
        if isinstance(requested, bool) or not isinstance(requested, int) or not 1 <= requested <= MAX_SPLITS:
            raise ValueError(f"num_splits must be 'auto' or a count from 1 to {MAX_SPLITS}, got {requested!r} "
                             "(argument or GENKV_NUM_SPLITS)")
        if requested > 1 and requested * out_elements >= 2**31:
            raise ValueError(f"num_splits={requested}: the fp32 partials ({requested} x {out_elements} elements) "
                             "pass int32 offsets; use num_splits=1")
        return requested
    if device.type != "cuda" or _interpreting() or head_dim != 128 or short_reads or programs == 0:
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        props = torch.cuda.get_device_properties(index)
        _SM_COUNTS[index] = (props.multi_processor_count, props.major)
    sms, major = _SM_COUNTS[index]
    if major != 9:
        return 1

    def busy(n: int) -> float:  # the fraction of SM slots the grid's waves fill
        units = programs * n
        return units / (sms * math.ceil(units / sms))

    best, best_score = 1, busy(1)
    for n in range(2, MAX_SPLITS + 1):
        if list_width < 2 * n or n * out_elements >= 2**31:
            break
        score = busy(n) - 0.03 * (n - 1)
        if score > best_score:
            best, best_score = n, score
    return best


# The Gluon kernel in its ping-pong form: 1.04-1.14x the Triton kernel's speed on an H100 at every density, 1.02x
# cuDNN dense with every block of 131040 keys listed, and 0.978x the chunk time of `fastar --compile` (BENCHMARKS,
# 2026-12-08). GENKV_HOPPER_KERNEL=0 keeps the Triton kernel.
DEFAULT_HOPPER = True


def _takes_hopper_kernel(requested, q, k, v, history, block_m, block_n, tile_m, tile_n, num_warps, num_stages,
                         warp_specialize, tma) -> bool:
    """Whether a call goes to the Gluon kernel: switched on, no quantized history, the default launch shape, and
    ``hopper_kernel_applies`` (Gluon, compute capability 9, fp16 / bf16, head dim 64 / 128, TMA-copyable rows)."""
    if _interpreting() or not _switch(requested, "GENKV_HOPPER_KERNEL", DEFAULT_HOPPER):
        return False
    plain = history is None and tma is not False and not warp_specialize
    default_shape = (block_m, block_n) == (128, 128) and tile_m in (None, 128) and tile_n in (None, 128) and \
        num_warps in (None, 8) and num_stages is None
    if not (plain and default_shape):
        return False
    from .block_sparse_hopper import hopper_kernel_applies

    return hopper_kernel_applies(q, k, v)


def _checked_scale(scale: float | None, head_dim: int) -> float:
    """The logit scale, 1 / sqrt(head_dim) by default; positive and finite (the kernels scale the row max, not each
    logit)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    return scale


def _switch(requested: bool | None, env: str, default: bool) -> bool:
    """A launch switch: the argument if given, else env ``env`` (``1`` / ``0``) if set, else ``default``."""
    return bool(requested) if requested is not None else env_flag(env, default)


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
    tile_m: int | None = None,
    tile_n: int | None = None,
    warp_specialize: bool = False,
    tma: bool | None = None,
    out: torch.Tensor | None = None,
    history=None,
    initial: tuple[torch.Tensor, torch.Tensor] | None = None,
    fast_dequant: bool | None = None,
    int8_qk: bool | None = None,
    int4_asm: bool | None = None,
    int4_zero_in_v: bool | None = None,
    int4_scale_in_v: bool | None = None,
    num_splits: int | str | None = None,
    hopper: bool | None = None,
):
    """Launch the kernel on (B, S, H, D) tensors; see the module docstring. Returns ``out`` or ``(out, lse)``.

    ``history`` (a :class:`~genkv.kernels.quant_kv.QuantizedKV` of ``S_h`` tokens): key/value positions
    [0, S_h) are read from its codes and dequantized in registers, tile by tile; ``k`` / ``v`` then hold only
    positions [S_h, S_h + S_cur) (the current chunk, full precision). Block lists, counts and ``key_bias``
    (B, S_h + S_cur, H) index the combined sequence; S_h need not be a multiple of the block size.

    ``tile_m`` / ``tile_n`` / ``num_warps`` / ``num_stages`` shape the launch (tiles divide the mask's
    ``block_m`` / ``block_n``; defaults are the block sizes, 64-key tiles for an int4 history, 8 warps at head_dim
    128, 3 stages), tuned by ``eval/bench_kernels.py`` and ``eval/bench_quant_kv.py --launch-sweep``. ``out``
    (optional) is written in place: tests pass a NaN-filled tensor to catch unwritten elements.

    ``fast_dequant`` (int8 / int4 histories with a bf16 / fp16 q; default: env ``GENKV_FAST_DEQUANT`` = ``1`` /
    ``0`` if set, else on for int4 only, the faster choice on an H100 by ``eval/bench_quant_kv.py --launch-sweep``):
    blocks wholly inside the history build their codes as fp16 ``offset + code`` from bits and subtract the offset
    in fp16 (exact), instead of converting every code: the compiler emits int-to-float conversions (I2F, at an
    eighth of the fp16 rate on Hopper) for int4's nibbles, while int8 codes it already converts with byte permutes
    (the sm_90 SASS), so int8 gains nothing. q (times the smoothing factors) and p then enter those dots in fp16:
    exact for a bf16 q within fp16's range. An fp32 q ignores it (it would be rounded).

    ``int8_qk`` (int8 histories with a bf16 / fp16 q; default: env ``GENKV_INT8_QK`` = ``1`` / ``0`` if set, else
    on, the faster choice on an H100 by ``eval/bench_quant_kv.py --launch-sweep``): blocks wholly
    inside the history compute their logits as int8 x int8 dots (int32, exact) of q's own int8 codes with the key
    codes as loaded, so the key tile goes to the tensor cores without being converted and written back to shared
    memory (the values still are). q (times the smoothing factors) is held as two int8 terms per row: codes at
    step ``s = max |row| / 127``, then the codes of the remainder at step ``s / 254`` (an error of at most
    ``max |row| / 64516`` per entry, below a bf16 q's own rounding for entries above 1/126 of the row's largest),
    for two int8 dots, which Hopper runs at twice the bf16 rate.

    ``int4_asm`` (int4 histories on ``fast_dequant``'s path, CUDA only; default: env ``GENKV_INT4_ASM`` = ``1`` /
    ``0`` if set, else on): the whole-history tiles' nibbles become fp16 two per instruction in inline PTX (byte
    permutes, then one LOP3 and one packed fp16 subtract or fma per pair, the high nibble unshifted), the same
    values as ``fast_dequant``'s per-element bit operations.

    ``int4_zero_in_v`` (int4 histories on ``fast_dequant``'s path; default: env ``GENKV_INT4_ZERO_IN_V`` = ``1`` /
    ``0`` if set, else on): the whole-history tiles add each key's ``zero / scale`` to its value codes in fp16,
    so the PV dot carries the zero points and the per-row ``sum_j p_j zero_j`` (a multiply and a row reduction
    per logit, and the zero points' loads in the logits' layout) goes. Off the exact path by at most half an
    fp16 spacing of ``u + zero / scale`` per value (see ``quant_kv.ZERO_STEPS``).

    ``int4_scale_in_v`` (with ``int4_zero_in_v``; default: env ``GENKV_INT4_SCALE_IN_V`` = ``1`` / ``0`` if set,
    else on): the whole-history value tiles become the values themselves, ``u * scale + zero`` in one fp16 fma
    an element (which replaces ``int4_zero_in_v``'s add), so p enters the PV dots unscaled: no multiply per
    logit, and one load of the value scales a tile instead of two. Off the exact path by the same bound (half an
    fp16 spacing of the value, ``zero`` itself rounded to fp16); the values must lie within fp16's range.

    ``num_splits`` (1-4 or ``"auto"``; default: env ``GENKV_NUM_SPLITS`` if set, else ``DEFAULT_SPLITS``;
    ``"auto"`` chooses from the grid's size and the GPU's SM count, see ``_num_splits``): each list is read in
    that many contiguous shares by as many programs, whose fp32 partials (output, LSE) one more small kernel
    merges. It fills the last wave of a grid that is a few waves long; the result equals one program's read up
    to fp32 rounding.

    ``initial`` (optional): ``(out0 (B, S_q, H, D), lse0 (B, H, S_q))``, a partial attention of the same queries
    over keys *not* in the lists (natural-log LSE, ``-inf`` for rows that saw nothing). The kernel resumes its
    softmax and returns the attention over both key sets, as :func:`merge_attention_partials` would, with no
    merge pass. ``out`` may be ``out0`` itself (each program reads its rows before writing them).

    ``hopper`` (default: env ``GENKV_HOPPER_KERNEL`` = ``1`` / ``0`` if set, else ``DEFAULT_HOPPER``): a read with
    no quantized history (a key bias and ``initial`` are fine) at 128 x 128 blocks and the default launch shape, on
    a compute-capability-9 GPU, takes the Gluon kernel of ``kernels/block_sparse_hopper.py`` instead, whose tensor
    cores run the PV product while the next tile's softmax runs; same lists, shares and results.
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use backend='torch'")
    if history is not None and history.length == 0:
        history = None  # nothing committed yet: the plain kernel over the current chunk
    if history is not None and k.shape[1] == 0:
        k = v = q[:, :0]  # no current keys: a valid (non-null) pointer for the masked loads that never happen
    hist_len = 0 if history is None else history.length
    _check(q, k, v, kv_block_indices, kv_block_counts, key_bias, block_m, block_n, hist_len)
    if _takes_hopper_kernel(hopper, q, k, v, history, block_m, block_n, tile_m, tile_n, num_warps, num_stages,
                            warp_specialize, tma):
        from .block_sparse_hopper import block_sparse_attention_hopper

        return block_sparse_attention_hopper(q, k, v, kv_block_indices, kv_block_counts, key_bias=key_bias,
                                             scale=scale, return_lse=return_lse, out=out, num_splits=num_splits,
                                             initial=initial)
    hist_pointers, hist_strides, hist_kind = _history_args(history, q)
    init_out, init_lse, init_strides = _initial_args(initial, q)
    fast_dequant = _use_fast_dequant(fast_dequant, hist_kind, q.dtype)
    int8_qk = _use_int8_qk(int8_qk, hist_kind, q.dtype)
    int4_asm = _use_int4_asm(int4_asm, hist_kind, fast_dequant, q.device)
    int4_zero_in_v = _use_int4_zero_in_v(int4_zero_in_v, hist_kind, fast_dequant)
    int4_scale_in_v = _use_int4_scale_in_v(int4_scale_in_v, hist_kind, int4_zero_in_v)
    b, s_q, h, d = q.shape
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(b, h, s_q, device=q.device, dtype=torch.float32) if return_lse else out
    bias = key_bias if key_bias is not None else q  # placeholder pointer, never read
    if key_bias is not None and key_bias.dtype != torch.float32:
        bias = key_bias.float()
    bias_strides = (bias.stride(0), bias.stride(1), bias.stride(2)) if key_bias is not None else (0, 0, 0)
    scale = _checked_scale(scale, d)
    tile_m = min(tile_m or block_m, block_m)
    tile_n = min(tile_n or _default_tile_n(hist_kind, block_n), block_n)
    if block_m % tile_m or block_n % tile_n or tile_m < 16 or tile_n < 16:
        raise ValueError(f"tiles ({tile_m}, {tile_n}) must be powers of two >= 16 dividing the blocks "
                         f"({block_m}, {block_n})")
    if history is not None and tma:
        raise ValueError("tma=True does not apply with a quantized history (its tiles are loaded with masks)")
    use_tma = history is None and (_tma_usable(k, v) if tma is None else tma)
    if use_tma and not _tma_usable(k, v):
        raise ValueError("tma=True needs a Hopper-class GPU (or the interpreter) and 16-byte aligned K/V rows")
    idx = kv_block_indices if kv_block_indices.stride(-1) == 1 else kv_block_indices.contiguous()
    splits = _num_splits(num_splits, math.ceil(s_q / tile_m) * b * h, idx.shape[-1], d, q.device,
                         short_reads=initial is not None, out_elements=q.numel())
    grid = (math.ceil(s_q / tile_m), b * h, splits)
    # Where the kernel writes: the output itself, or (split) slot 0 of fp32 partials for the merge, one slot per
    # split, split_strides apart.
    part_out, part_lse, kernel_out, kernel_lse, split_strides = _split_workspace(splits, q, out, lse)
    # 3 stages with a history too, now that its merged loop runs unpipelined (it fits shared memory): top-16 lists
    # at Wan shapes, int8 0.84 ms at 3 stages vs 0.93 at 2 (H100, `bench_quant_kv.py --launch-sweep`).
    stages = num_stages or 3
    # The kernel walks a row's list and the counts with unit stride (other strides may be 0: broadcast lists).
    cnt = kv_block_counts if kv_block_counts.stride(-1) == 1 else kv_block_counts.contiguous()
    store_lse = return_lse or splits > 1
    _block_sparse_fwd[grid](
        q, k, v, bias, kernel_out, kernel_lse, idx, cnt,
        *hist_pointers, init_out, init_lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kernel_out.stride(0), kernel_out.stride(1), kernel_out.stride(2),
        *bias_strides,
        idx.stride(0), idx.stride(1), idx.stride(2),
        cnt.stride(0), cnt.stride(1),
        kernel_lse.stride(0) if store_lse else 0, kernel_lse.stride(1) if store_lse else 0,
        *hist_strides,
        *init_strides,
        *split_strides,
        h, s_q, hist_len + k.shape[1], hist_len, scale * LOG2E,
        HAS_BIAS=key_bias is not None,
        STORE_LSE=store_lse,
        MASK_BLOCK_M=block_m,
        MASK_BLOCK_N=block_n,
        TILE_M=tile_m,
        TILE_N=tile_n,
        HEAD_DIM=d,
        RAGGED=(hist_len + k.shape[1]) % block_n != 0,  # also covers tiles of the last block wholly past kv_len
        WARP_SPECIALIZE=warp_specialize,
        USE_TMA=use_tma,
        HIST_KIND=hist_kind,
        HAS_INIT=initial is not None,
        FAST_DEQUANT=fast_dequant,
        INT8_QK=int8_qk,
        INT4_ASM=int4_asm,
        INT4_ZERO_IN_V=int4_zero_in_v,
        INT4_SCALE_IN_V=int4_scale_in_v,
        LIST_WIDTH=triton.next_power_of_2(max(idx.shape[-1], 1)),  # the history's entry sort reads whole lists
        NUM_STAGES=stages,
        SPLIT=splits > 1,
        num_warps=num_warps or (8 if d >= 128 else 4),
        num_stages=stages,
    )
    if splits > 1:
        _merge_splits(part_out, part_lse, out, lse, return_lse)
    return (out, lse) if return_lse else out


def _split_workspace(splits: int, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> tuple:
    """Where a split launch writes: fp32 partials (output, LSE), one slot per split, ``split_strides`` apart, the
    kernel given slot 0; one split writes ``out`` / ``lse`` themselves. Returns (part_out, part_lse, kernel_out,
    kernel_lse, split_strides)."""
    if splits == 1:
        return None, None, out, lse, (0, 0)
    b, s_q, h, d = q.shape
    part_out = torch.empty(splits, b, s_q, h, d, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(splits, b, h, s_q, device=q.device, dtype=torch.float32)
    return part_out, part_lse, part_out[0], part_lse[0], (part_out.stride(0), part_lse.stride(0))


def _merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  return_lse: bool) -> None:
    """Launch ``_merge_split_partials``: the splits' partials into ``out`` (and ``lse`` if ``return_lse``)."""
    splits, b, s_q, h, d = part_out.shape
    merge_tile = 64 if d >= 128 else 128
    _merge_split_partials[(math.ceil(s_q / merge_tile), b * h)](
        part_out, part_lse, out, lse,
        *part_out.stride()[:4],
        *part_lse.stride()[:3],
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0) if return_lse else 0, lse.stride(1) if return_lse else 0,
        h, s_q,
        N_SPLITS=splits, TILE_M=merge_tile, HEAD_DIM=d, STORE_LSE=return_lse,
        num_warps=4,
    )
