"""Block means of a quantized history's keys, read straight from the codes in one Triton pass (issue 22).

Routing scores query blocks against key-block means (``pool_quantized_blocks``). Over a bf16 cache that is one
reduction over the keys. Over codes, the torch path dequantizes a few thousand tokens at a time (convert, times the
token scales, times the smoothing factors, mean: five passes over fp32 temporaries per slab); at Wan shapes, with a
21-frame history routed once per chunk in each of 30 layers, that and the commit's torch-op quantization were ~1000
small kernels and ~38 ms a chunk on an H100 (`eval/profile_ops.py`, int8 ``fastar``, 2026-12-05), where the codes
themselves are ~50 MB a layer.

:func:`pool_code_blocks` reads each code once: a program sums ``code * token scale`` over one block of one head in
fp32 and multiplies by the head's smoothing factors (powers of two, so multiplying the sum equals summing the
products) and by ``1 / block_n``. It equals the torch path up to the order of the fp32 sum.

Example:
    >>> import torch
    >>> from genkv.kernels.quant_kv import quantize_kv, dequantize_keys
    >>> k = torch.randn(1, 64, 2, 16)
    >>> hist = quantize_kv(k, k, "int4")
    >>> means = pool_code_blocks(hist, 2, 32)                      # (B, n_blocks, H, D)
    >>> bool((means - dequantize_keys(hist).unflatten(1, (2, 32)).mean(2)).abs().max() < 1e-5)
    True
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .block_sparse import triton_runs_on
from .quant_kv import KIND_IDS, QuantizedKV, _as_bytes, dequantize_keys

_ROWS = 32  # tokens per step of a program's loop over its block


@triton.jit
def _pool_codes_kernel(
    KC, KS, Chan, Out,
    stride_qb, stride_qs, stride_qh,
    stride_sb, stride_ss, stride_sh,
    stride_cb, stride_ch,
    stride_ob, stride_on, stride_oh,
    heads,
    KIND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) // heads
    h = tl.program_id(1) % heads
    codes_base = KC + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    scale_base = KS + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
    rows = tl.arange(0, ROWS)
    WIDTH: tl.constexpr = HEAD_DIM // 2 if KIND == 3 else HEAD_DIM
    cols = tl.arange(0, WIDTH)
    # (ROWS, WIDTH) partial sums, reduced over rows once after the loop: a reduction per step synchronised the
    # program's warps through shared memory at every step (4 per block); at Wan shapes (220 blocks x 12 heads) one
    # layer took 61.8 us (int8) / 74.1 us (int4) that way and takes 34.1 / 31.0 now (H100, 2026-12-06)
    acc = tl.zeros([ROWS, WIDTH], dtype=tl.float32)
    acc_hi = tl.zeros([ROWS, WIDTH], dtype=tl.float32)  # int4: channels HEAD_DIM / 2 + j (the high nibbles)
    for start in tl.static_range(0, BLOCK_N, ROWS):
        token = block * BLOCK_N + start + rows
        codes = tl.load(codes_base + token[:, None] * stride_qs + cols[None, :])
        scale = tl.load(scale_base + token * stride_ss).to(tl.float32)[:, None]
        if KIND == 3:  # symmetric keys stored + 8
            acc += ((codes & 15).to(tl.float32) - 8.0) * scale
            acc_hi += ((codes >> 4).to(tl.float32) - 8.0) * scale
        elif KIND == 1:  # fp8 codes arrive as their bits
            acc += codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale
        else:
            acc += codes.to(tl.float32) * scale
    chan_base = Chan + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
    out_base = Out + b.to(tl.int64) * stride_ob + block * stride_on + h.to(tl.int64) * stride_oh
    tl.store(out_base + cols, tl.sum(acc, 0) * tl.load(chan_base + cols) / BLOCK_N)
    if KIND == 3:
        tl.store(out_base + WIDTH + cols, tl.sum(acc_hi, 0) * tl.load(chan_base + WIDTH + cols) / BLOCK_N)


def pool_code_blocks_reference(hist: QuantizedKV, n_blocks: int, block_n: int, chunk_tokens: int = 8192
                               ) -> torch.Tensor:
    """:func:`pool_code_blocks` in torch ops, ``chunk_tokens`` tokens dequantized at a time (whole blocks)."""
    step = max(1, chunk_tokens // block_n) * block_n
    parts = [dequantize_keys(hist, start, min(start + step, n_blocks * block_n)).unflatten(1, (-1, block_n)).mean(2)
             for start in range(0, n_blocks * block_n, step)]
    if not parts:
        b, _, h, _ = hist.k_codes.shape
        return hist.key_channel_scale.new_zeros(b, 0, h, hist.head_dim)
    return torch.cat(parts, 1)


def _use_triton(hist: QuantizedKV, block_n: int) -> bool:
    if not triton_runs_on(hist.k_codes):
        return False
    return (hist.k_codes.stride(-1) == 1 and hist.key_channel_scale.stride(-1) == 1 and block_n % _ROWS == 0
            and hist.head_dim in (16, 32, 64, 128, 256))


def pool_code_blocks(hist: QuantizedKV, n_blocks: int, block_n: int, chunk_tokens: int = 8192) -> torch.Tensor:
    """Means (B, n_blocks, H, D) fp32 of the dequantized keys (smoothing undone) of the history's first
    ``n_blocks`` whole blocks of ``block_n`` tokens: one Triton pass over the codes on CUDA (and under the
    interpreter), :func:`pool_code_blocks_reference` elsewhere (``chunk_tokens`` at a time)."""
    if n_blocks * block_n > hist.length:
        raise ValueError(f"{n_blocks} blocks of {block_n} tokens exceed the history's {hist.length}")
    if n_blocks == 0 or not _use_triton(hist, block_n):
        return pool_code_blocks_reference(hist, n_blocks, block_n, chunk_tokens)
    b, _, h, _ = hist.k_codes.shape
    out = torch.empty(b, n_blocks, h, hist.head_dim, device=hist.k_codes.device, dtype=torch.float32)
    channel = hist.key_channel_scale.float().expand(b, h, hist.head_dim)
    codes = _as_bytes(hist.k_codes)
    _pool_codes_kernel[(n_blocks, b * h)](
        codes, hist.k_scale, channel, out,
        codes.stride(0), codes.stride(1), codes.stride(2),
        hist.k_scale.stride(0), hist.k_scale.stride(1), hist.k_scale.stride(2),
        channel.stride(0), channel.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        h,
        KIND=KIND_IDS[hist.kind], HEAD_DIM=hist.head_dim, BLOCK_N=block_n, ROWS=_ROWS,
        num_warps=4,
    )
    return out
