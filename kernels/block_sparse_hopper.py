"""Block-sparse attention for Hopper GPUs in Gluon (Triton's explicit-layout dialect): the plain read, written so the
tensor cores and the exp2 units work at the same time.

Why a second kernel: the Triton kernel (``kernels/block_sparse.py``) waits for each tile's logits before its softmax
and for the softmax before the next tile's logits, so the SM's tensor cores idle while its CUDA cores run exp2
(Triton's pipeliner cannot keep a product in flight across the softmax: a dot whose result is read before the loop's
next full wait completes at once; the sm_90 PTX of its loop has only ``wgmma.wait_group 0``). Here one step, list
entry j, holding entry j's probabilities p_j from the step before, is FlashAttention-3's intra-warpgroup order:

1. issue the logits of entry j + 1 (``warpgroup_mma``, asynchronous);
2. rescale the accumulator and issue entry j's PV product (p_j from registers), asynchronous too;
3. wait until one product is left in flight: entry j + 1's logits are done, and their softmax runs on the CUDA cores
   while the tensor cores finish the PV product;
4. wait for the PV product; entry j's slot is refilled (TMA, entry j + 3), and p_{j + 1} converted to the PV
   product's operand layout.

(A first draft that ran the softmax of entry j while entry j + 1's logits were in flight, refilling the ring
between, made ptxas serialise the wgmmas, warning C7514; the CPU suite checks the build for it.)

Keys and values stream through a ring of ``NUM_BUF`` = 3 shared-memory slots, one mbarrier per slot and operand,
so the logits of entry j + 1 start as soon as its keys land. One program per (query block, batch x head, split); at
128 x 128 tiles and head dim 128 the ring and the query tile fill an SM's shared memory (224 KiB), one program per SM.

Scope: plain reads, with a key bias (TempCache's log counts) and resumed from a partial (``initial``: the split
read's history part), head dim 64 or 128, fp16 / bf16, compute capability 9; quantized histories and other launch
shapes take the Triton kernel. Split shares and their merge are the Triton kernel's
(``_merge_split_partials``), so the same list is cut the same way.

Gluon has no CPU interpreter: the kernel is compiled for sm_90 in the CPU suite (``tests/kernel_tests``) and checked
against float64 attention on CUDA machines (all pass on an H100, 2026-12-07).

Status (H100, Wan shapes, docs/BENCHMARKS.md twenty-sixth): this plain kernel is correct but 1.02-1.14x the Triton
kernel's time; the ping-pong variant below is the fastest block-sparse kernel genkv has (0.88-0.96x the Triton
kernel's time at every density; 1.02x cuDNN dense's speed with every block of a 131040-key KV listed, 0.93x at 32760),
so it is the variant taken. Since 2026-12-08 the Gluon kernel serves the reads it covers on Hopper by default
(``DEFAULT_HOPPER`` in ``block_sparse.py``; env ``GENKV_HOPPER_KERNEL=0`` keeps the Triton kernel): ``fastar
--compile`` (CUDA graphs) over 480 frames on an H100 took 0.978x the Triton kernel's chunk time.

Warp-specialised variants (``warp_specialize=True``; ``pingpong=True``, the default; the env rules are
``kernel_variant``'s), FlashAttention-3's division of labour through ``gl.warp_specialize``:

* a producer partition of one warp (``WS_LOAD_REGS`` = 24 registers a thread) makes the TMA descriptors, loads the
  query tile, then each list entry's key and value tiles into the ring of ``NUM_BUF`` slots. Every slot has four
  mbarriers: keys ready / values ready (TMA transaction counts) and keys free / values free (arrived by the
  consumers once the logits, resp. the PV product, that read them are done), so the next keys can land while a
  slot's values are still being read;
* ``warp_specialize``: the consumer is the default partition of 8 warps (two warpgroups, 64 query rows each,
  240 registers a thread after ``setmaxnreg``), running the plain kernel's step order above with every TMA issue
  replaced by an arrive on a free barrier;
* ``pingpong``: two consumer partitions of 4 warps (the default one and a worker), 64 rows each, that also take
  turns issuing their step's two products (a pair of turn mbarriers), so one warpgroup's softmax runs while the
  other's products hold the tensor cores.

Both cover every feature of the plain kernel (key bias, resume, splits, LSE, ragged lengths, head dim 64 / 128,
fp16 / bf16) and build for sm_90 under Triton 3.6 and 3.7 with no spills and no serialised wgmma (CPU suite). Both
pass their float64 checks on an H100 (``tests/kernel_tests``, 2026-12-08). Timed there: WS alone is the Triton
kernel's speed (0.97-1.08x it), ping-pong 1.04-1.14x it, so ``DEFAULT_PINGPONG`` is on. What FlashAttention-3 has and
neither variant does yet: a persistent grid (a program per SM that
walks the query tiles, overlapping one tile's epilogue with the next one's loads) and named hardware barriers for
the ping-pong (an mbarrier turn costs an arrive and a wait where a ``bar.sync`` would do).
"""

from __future__ import annotations

import functools
import math
import re

import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
except ImportError:  # pragma: no cover - a Triton without Gluon: the Triton kernel serves every call
    gluon = None

LOG2E = 1.4426950408889634
NUM_BUF = 3  # key / value slots: entry j + 1's keys land while entry j is read; entry j + 2's load is in flight
# The warp-specialised variant: registers per thread of the producer warp's warpgroup (setmaxnreg; it holds a few
# scalars). 12 warps share the SM's 64K registers (168 a thread at launch); what the producer's warpgroup gives up
# goes to the consumers: 168 + (168 - 24) / 2 = 240 each.
WS_LOAD_REGS = 24
# Ping-pong: 4 default warps, a 4-warp consumer and the producer (12 warps again): each consumer warpgroup asks 240.
WS_CONSUMER_REGS = 240
DEFAULT_WS = False  # the single 8-warp consumer: no faster than the Triton kernel on an H100 (module docstring)
DEFAULT_PINGPONG = True  # two consumer warpgroups taking turns: 1.04-1.14x the Triton kernel (H100, 2026-12-08)


def gluon_available() -> bool:
    return gluon is not None


if gluon is not None:

    @gluon.jit
    def _load_entry(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, idx_row, e, n, slot, BLOCK_N: gl.constexpr,
                    HEAD_DIM: gl.constexpr):
        """TMA copies of list entry e's key and value tiles into ring slot ``slot`` (nothing past the share)."""
        has = e < n
        block = gl.load(idx_row + e, mask=has, other=0)
        tile_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * 2
        mbarrier.expect(k_bars.index(slot), tile_bytes, pred=has)
        tma.async_copy_global_to_shared(k_desc, [block * BLOCK_N, 0], k_bars.index(slot), k_smem.index(slot), pred=has)
        mbarrier.expect(v_bars.index(slot), tile_bytes, pred=has)
        tma.async_copy_global_to_shared(v_desc, [block * BLOCK_N, 0], v_bars.index(slot), v_smem.index(slot), pred=has)

    @gluon.jit
    def _softmax_step(qk, m_i, l_i, cols, kv_len, qk_scale, bias_base, stride_bs, MASKED: gl.constexpr,
                      HAS_BIAS: gl.constexpr):
        """Online softmax over one tile of unscaled logits, base 2: returns (p, alpha, m_new, l_new). Without a
        bias the row max is scaled once (one FMA a logit); with one, the logits are scaled, then the key bias
        added. MASKED: columns from ``kv_len`` on become -inf (before the bias: stale logits may be NaN). A row
        with no finite logit yet keeps m = -inf and subtracts 0, not -inf."""
        ok = cols < kv_len
        if MASKED:
            qk = gl.where(ok[None, :], qk, float("-inf"))
        if HAS_BIAS:
            bias = gl.load(bias_base + cols * stride_bs, mask=ok, other=float("-inf"))
            qk = qk * qk_scale + bias[None, :] * 1.4426950408889634
            m_new = gl.maximum(m_i, gl.max(qk, 1))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(qk - m_safe[:, None])
        else:
            m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(qk * qk_scale - m_safe[:, None])
        alpha = gl.exp2(m_i - m_safe)
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit(do_not_specialize=["q_len", "kv_len"])
    def _block_sparse_hopper_fwd(
        Q, K, V, Bias, Out, Lse, Idx, Cnt, Init, InitLse,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ob, stride_os, stride_oh,
        stride_bb, stride_bs, stride_bh,
        stride_ib, stride_ih, stride_iq,
        stride_cb, stride_ch,
        stride_lb, stride_lh,
        stride_zb, stride_zs, stride_zh,
        stride_yb, stride_yh,
        stride_op, stride_lp,
        num_heads, q_len, kv_len, qk_scale,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        NUM_BUF: gl.constexpr,
        RAGGED: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        HAS_INIT: gl.constexpr,
        STORE_LSE: gl.constexpr,
        SPLIT: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        dtype: gl.constexpr = Q.dtype.element_ty

        # Layouts: the logits (BLOCK_M x BLOCK_N) and the output (BLOCK_M x HEAD_DIM) are wgmma accumulators with the
        # warps stacked along the rows, so a row's softmax statistics live in one warp and p feeds the PV product
        # from registers without a shuffle.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        tile_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

        # Device-side descriptors over this (batch, head)'s rows: rows past the length read as zeros.
        q_desc = tma.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, shape=[q_len, HEAD_DIM],
                                            strides=[stride_qs, 1], block_shape=[BLOCK_M, HEAD_DIM],
                                            layout=tile_layout)
        k_desc = tma.make_tensor_descriptor(K + b * stride_kb + h * stride_kh, shape=[kv_len, HEAD_DIM],
                                            strides=[stride_ks, 1], block_shape=[BLOCK_N, HEAD_DIM],
                                            layout=tile_layout)
        v_desc = tma.make_tensor_descriptor(V + b * stride_vb + h * stride_vh, shape=[kv_len, HEAD_DIM],
                                            strides=[stride_vs, 1], block_shape=[BLOCK_N, HEAD_DIM],
                                            layout=tile_layout)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], tile_layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, HEAD_DIM], tile_layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, HEAD_DIM], tile_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for s in gl.static_range(NUM_BUF):
            mbarrier.init(k_bars.index(s), count=1)
            mbarrier.init(v_bars.index(s), count=1)

        # This split's share of the list (the Triton kernel's cut): entries [first, last), n of them.
        count = gl.load(Cnt + b * stride_cb + h * stride_ch + pid_m)
        first = 0
        last = count
        if SPLIT:
            share = gl.cdiv(count, gl.num_programs(2))
            first = gl.minimum(gl.program_id(2) * share, count)
            last = gl.minimum(first + share, count)
        n = last - first
        idx_row = Idx + b * stride_ib + h * stride_ih + pid_m * stride_iq + first

        mbarrier.expect(q_bar, BLOCK_M * HEAD_DIM * 2)
        tma.async_copy_global_to_shared(q_desc, [pid_m * BLOCK_M, 0], q_bar, q_smem)
        for e in gl.static_range(NUM_BUF):  # the ring's first fill: entries 0 .. NUM_BUF - 1
            _load_entry(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, idx_row, e, n, e, BLOCK_N, HEAD_DIM)

        o_rows_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
        offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=o_rows_layout)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        row_ok = offs_m < q_len
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
        l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=row_layout)
        acc = gl.full([BLOCK_M, HEAD_DIM], 0.0, gl.float32, layout=o_layout)
        if HAS_INIT:
            # Resume from a partial attention over other keys (out0, lse0): in base 2, m = lse0 * log2(e) and
            # l = 1 continue that softmax exactly. Only the first split resumes; rows it saw nothing in start empty.
            first_share = row_ok
            if SPLIT:
                first_share = row_ok & (gl.program_id(2) == 0)
            lse0 = gl.load(InitLse + b * stride_yb + h * stride_yh + offs_m, mask=first_share, other=float("-inf"))
            seen = lse0 > float("-inf")
            acc = gl.load(Init + b * stride_zb + h * stride_zh + offs_m[:, None] * stride_zs + offs_d[None, :],
                          mask=seen[:, None], other=0.0).to(gl.float32)
            m_i = gl.convert_layout(gl.where(seen, lse0 * 1.4426950408889634, float("-inf")), row_layout)
            l_i = gl.convert_layout(gl.where(seen, 1.0, 0.0), row_layout)
        bias_base = Bias + b * stride_bb + h * stride_bh
        s_zero = gl.full([BLOCK_M, BLOCK_N], 0.0, gl.float32, layout=s_layout)
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))

        # Entry 0's logits and softmax before the loop; each step then holds entry j's probabilities (p_op, alpha).
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bars.index(0), 0, pred=n > 0)
        qk = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
        block = gl.load(idx_row, mask=n > 0, other=0)
        # (masked whatever RAGGED says: an empty share's logits are of stale shared memory, and its rows stay empty)
        p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, block * BLOCK_N + cols, gl.where(n > 0, kv_len, 0),
                                           qk_scale, bias_base, stride_bs, True, HAS_BIAS)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        for j in range(0, n - 1):
            # 1. the next entry's logits
            slot_next = (j + 1) % NUM_BUF
            mbarrier.wait(k_bars.index(slot_next), ((j + 1) // NUM_BUF) & 1)
            qk_next = warpgroup_mma(q_smem, k_smem.index(slot_next).permute((1, 0)), s_zero, use_acc=False,
                                    is_async=True)
            # 2. entry j's PV product on the rescaled accumulator (done at step 4 of the step before)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            slot = j % NUM_BUF
            mbarrier.wait(v_bars.index(slot), (j // NUM_BUF) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(slot), acc, is_async=True)
            # 3. the next logits are done (the PV product may still run): their softmax overlaps it
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk_next, ))
            block = gl.load(idx_row + j + 1)
            p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, block * BLOCK_N + cols, kv_len, qk_scale, bias_base,
                                               stride_bs, RAGGED, HAS_BIAS)
            # 4. the PV product is done: entry j's slot takes entry j + NUM_BUF, and p may be overwritten
            # (p_op in the deps: its registers stay the product's until this wait. The refill below must stay after
            # the wait: the other warpgroup's half of the product may still read the slot until then.)
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            _load_entry(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, idx_row, j + NUM_BUF, n, slot, BLOCK_N,
                        HEAD_DIM)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        if n > 0:  # the last entry's PV product (an empty share reads no slot: its smem was never written)
            last_slot = (n - 1) % NUM_BUF
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            mbarrier.wait(v_bars.index(last_slot), ((n - 1) // NUM_BUF) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(last_slot), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

        mbarrier.invalidate(q_bar)
        for s in gl.static_range(NUM_BUF):
            mbarrier.invalidate(k_bars.index(s))
            mbarrier.invalidate(v_bars.index(s))

        l_o = gl.convert_layout(l_i, o_rows_layout)
        denom = gl.where(l_o == 0.0, 1.0, l_o)
        split_offset = 0
        if SPLIT:
            split_offset = gl.program_id(2) * stride_op
        o_ptrs = Out + split_offset + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
        gl.store(o_ptrs, (acc / denom[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None])
        if STORE_LSE:
            m_o = gl.convert_layout(m_i, o_rows_layout)
            lse = gl.where(l_o == 0.0, float("-inf"), (m_o + gl.log2(denom)) / 1.4426950408889634)
            lse_offset = 0
            if SPLIT:
                lse_offset = gl.program_id(2) * stride_lp
            gl.store(Lse + lse_offset + b * stride_lb + h * stride_lh + offs_m, lse, mask=row_ok)


    # ---- The warp-specialised variant (``warp_specialize=True``): a producer warp and a consumer partition ----

    @gluon.jit
    def _ws_load_partition(q_ptr, k_ptr, v_ptr, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                           idx_row, n, q_row, q_len, kv_len, stride_qs, stride_ks, stride_vs, BLOCK_M: gl.constexpr,
                           BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_BUF: gl.constexpr):
        """The producer (one warp): the query tile, then list entry e's key and value tiles into ring slot
        e % NUM_BUF as soon as the consumers have released that slot's previous tenant (entry e - NUM_BUF). Keys and
        values have barriers of their own both ways: entry e's logits start when its keys land, and its keys' slot
        is refilled once its logits are done, while its values may still be read."""
        # The descriptors are made here, by the only warp that uses them (each one a 128-byte global write and a
        # tensormap fence; ``ptr`` already points at this (batch, head)'s rows; rows past a length read as zeros).
        tile_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        q_desc = tma.make_tensor_descriptor(q_ptr, shape=[q_len, HEAD_DIM], strides=[stride_qs, 1],
                                            block_shape=[BLOCK_M, HEAD_DIM], layout=tile_layout)
        k_desc = tma.make_tensor_descriptor(k_ptr, shape=[kv_len, HEAD_DIM], strides=[stride_ks, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM], layout=tile_layout)
        v_desc = tma.make_tensor_descriptor(v_ptr, shape=[kv_len, HEAD_DIM], strides=[stride_vs, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM], layout=tile_layout)
        tile_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * 2
        mbarrier.expect(q_bar, BLOCK_M * HEAD_DIM * 2)
        tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
        for e in range(n):
            slot = e % NUM_BUF
            # A fresh barrier counts as having completed the phase before its first, so the first NUM_BUF waits
            # (parity 1) pass at once: the ring starts empty.
            free_phase = ((e // NUM_BUF) & 1) ^ 1
            block = gl.load(idx_row + e)
            mbarrier.wait(k_empty.index(slot), free_phase)
            mbarrier.expect(k_ready.index(slot), tile_bytes)
            tma.async_copy_global_to_shared(k_desc, [block * BLOCK_N, 0], k_ready.index(slot), k_smem.index(slot))
            mbarrier.wait(v_empty.index(slot), free_phase)
            mbarrier.expect(v_ready.index(slot), tile_bytes)
            tma.async_copy_global_to_shared(v_desc, [block * BLOCK_N, 0], v_ready.index(slot), v_smem.index(slot))

    @gluon.jit
    def _ws_softmax_partition(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, idx_row, n,
                              bias_base, stride_bs, o_base, stride_os, lse_base, init_base, stride_zs, init_lse_base,
                              resumes, q_row, q_len, kv_len, qk_scale, my_turn, next_turn, BLOCK_M: gl.constexpr,
                              BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_BUF: gl.constexpr,
                              RAGGED: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_INIT: gl.constexpr,
                              STORE_LSE: gl.constexpr, CONSUMER_WARPS: gl.constexpr, PINGPONG: gl.constexpr,
                              LEADS: gl.constexpr):
        """A consumer: ``BLOCK_M`` query rows (``q_smem``, from row ``q_row``) over the list, in the plain kernel's
        step order (entry j + 1's logits issued, entry j's PV product issued, the softmax of entry j + 1 under the
        PV product) with every TMA issue replaced by an arrive on the slot's empty barrier, so no load instruction
        sits between the wgmmas and their waits. ``resumes``: whether this program continues ``Init`` (the first
        split only).

        One consumer of 8 warps (the whole 128-row tile) or, ``PINGPONG``, two of 4 warps (64 rows each) that take
        turns issuing their products: a consumer waits on ``my_turn`` before its step's two wgmmas and arrives on
        ``next_turn`` once they are issued, so one warpgroup's softmax runs while the other's products hold the
        tensor cores (FlashAttention-3's ping-pong; the ``LEADS`` one issues first)."""
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_rows_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

        offs_m = q_row + gl.arange(0, BLOCK_M, layout=o_rows_layout)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        row_ok = offs_m < q_len
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
        l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=row_layout)
        acc = gl.full([BLOCK_M, HEAD_DIM], 0.0, gl.float32, layout=o_layout)
        if HAS_INIT:
            # as in the plain kernel: m = lse0 * log2(e), l = 1 continue the partial's softmax exactly
            lse0 = gl.load(init_lse_base + offs_m, mask=row_ok & resumes, other=float("-inf"))
            seen = lse0 > float("-inf")
            acc = gl.load(init_base + offs_m[:, None] * stride_zs + offs_d[None, :], mask=seen[:, None],
                          other=0.0).to(gl.float32)
            m_i = gl.convert_layout(gl.where(seen, lse0 * 1.4426950408889634, float("-inf")), row_layout)
            l_i = gl.convert_layout(gl.where(seen, 1.0, 0.0), row_layout)
        s_zero = gl.full([BLOCK_M, BLOCK_N], 0.0, gl.float32, layout=s_layout)
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))

        # Entry 0's logits and softmax (an empty share reads slot 0's stale memory, all of it masked, and
        # releases nothing: the producer loads nothing for it).
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_ready.index(0), 0, pred=n > 0)
        qk = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
        mbarrier.arrive(k_empty.index(0), pred=n > 0)
        block = gl.load(idx_row, mask=n > 0, other=0)
        p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, block * BLOCK_N + cols, gl.where(n > 0, kv_len, 0),
                                           qk_scale, bias_base, stride_bs, True, HAS_BIAS)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        for j in range(0, n - 1):
            slot_next = (j + 1) % NUM_BUF
            # (the next entry's block index, for its mask / bias, read before the wgmmas: off the softmax's path)
            block_next = gl.load(idx_row + j + 1)
            mbarrier.wait(k_ready.index(slot_next), ((j + 1) // NUM_BUF) & 1)
            if PINGPONG:
                # Step j's turn: the leader's k-th wait is for the other's (k - 1)-th arrive (its first passes: a
                # fresh barrier's parity 1), the follower's for the leader's k-th.
                if LEADS:
                    mbarrier.wait(my_turn, (j & 1) ^ 1)
                else:
                    mbarrier.wait(my_turn, j & 1)
            qk_next = warpgroup_mma(q_smem, k_smem.index(slot_next).permute((1, 0)), s_zero, use_acc=False,
                                    is_async=True)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            slot = j % NUM_BUF
            mbarrier.wait(v_ready.index(slot), (j // NUM_BUF) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(slot), acc, is_async=True)
            if PINGPONG:  # both products issued: the other consumer's turn
                mbarrier.arrive(next_turn)
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk_next, ))
            # Entry j + 1's keys are read: the producer may refill their slot. (An arrive synchronises the
            # partition's warps first, so both warpgroups' halves of the product are done.)
            mbarrier.arrive(k_empty.index(slot_next))
            p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, block_next * BLOCK_N + cols, kv_len, qk_scale,
                                               bias_base, stride_bs, RAGGED, HAS_BIAS)
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            mbarrier.arrive(v_empty.index(slot))
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        if n > 0:  # the last entry's PV product (its slot is never refilled: no release)
            last_slot = (n - 1) % NUM_BUF
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            mbarrier.wait(v_ready.index(last_slot), ((n - 1) // NUM_BUF) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(last_slot), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

        l_o = gl.convert_layout(l_i, o_rows_layout)
        denom = gl.where(l_o == 0.0, 1.0, l_o)
        gl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :],
                 (acc / denom[:, None]).to(o_base.dtype.element_ty), mask=row_ok[:, None])
        if STORE_LSE:
            m_o = gl.convert_layout(m_i, o_rows_layout)
            lse = gl.where(l_o == 0.0, float("-inf"), (m_o + gl.log2(denom)) / 1.4426950408889634)
            gl.store(lse_base + offs_m, lse, mask=row_ok)

    @gluon.jit(do_not_specialize=["q_len", "kv_len"])
    def _block_sparse_hopper_ws_fwd(
        Q, K, V, Bias, Out, Lse, Idx, Cnt, Init, InitLse,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ob, stride_os, stride_oh,
        stride_bb, stride_bs, stride_bh,
        stride_ib, stride_ih, stride_iq,
        stride_cb, stride_ch,
        stride_lb, stride_lh,
        stride_zb, stride_zs, stride_zh,
        stride_yb, stride_yh,
        stride_op, stride_lp,
        num_heads, q_len, kv_len, qk_scale,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        NUM_BUF: gl.constexpr,
        RAGGED: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        HAS_INIT: gl.constexpr,
        STORE_LSE: gl.constexpr,
        SPLIT: gl.constexpr,
        LOAD_REGS: gl.constexpr,
        PINGPONG: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """Same arguments and results as ``_block_sparse_hopper_fwd``, the work split between a one-warp producer
        (``LOAD_REGS`` registers a thread) and consumers: the ``num_warps`` (8) default warps, or, ``PINGPONG``, the
        default 4 warps and a 4-warp worker (``CONSUMER_REGS``), 64 query rows each."""
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        dtype: gl.constexpr = Q.dtype.element_ty
        tile_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], tile_layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, HEAD_DIM], tile_layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, HEAD_DIM], tile_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for s in gl.static_range(NUM_BUF):
            mbarrier.init(k_ready.index(s), count=1)
            mbarrier.init(v_ready.index(s), count=1)
            # one arrive per consumer partition, each after its own warps' sync
            mbarrier.init(k_empty.index(s), count=2 if PINGPONG else 1)
            mbarrier.init(v_empty.index(s), count=2 if PINGPONG else 1)

        # This split's share of the list (the plain kernel's cut): entries [first, last), n of them.
        count = gl.load(Cnt + b * stride_cb + h * stride_ch + pid_m)
        first = 0
        last = count
        split_offset = 0
        lse_offset = 0
        resumes = True
        if SPLIT:
            pid_s = gl.program_id(2)
            share = gl.cdiv(count, gl.num_programs(2))
            first = gl.minimum(pid_s * share, count)
            last = gl.minimum(first + share, count)
            split_offset = pid_s * stride_op
            lse_offset = pid_s * stride_lp
            resumes = pid_s == 0  # only the first split continues the partial
        n = last - first
        idx_row = Idx + b * stride_ib + h * stride_ih + pid_m * stride_iq + first
        q_row = pid_m * BLOCK_M

        # Scalars, pointers and shared memory only cross into the partitions (a worker takes no tensors).
        bias_base = Bias + b * stride_bb + h * stride_bh
        o_base = Out + split_offset + b * stride_ob + h * stride_oh
        lse_base = Lse + lse_offset + b * stride_lb + h * stride_lh
        init_base = Init + b * stride_zb + h * stride_zh
        init_lse_base = InitLse + b * stride_yb + h * stride_yh
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        if PINGPONG:
            HALF: gl.constexpr = BLOCK_M // 2
            turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            mbarrier.init(turns.index(0), count=1)
            mbarrier.init(turns.index(1), count=1)
            gl.warp_specialize([
                (_ws_softmax_partition,
                 (q_smem.slice(0, HALF), k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, idx_row, n,
                  bias_base, stride_bs, o_base, stride_os, lse_base, init_base, stride_zs, init_lse_base, resumes,
                  q_row, q_len, kv_len, qk_scale, turns.index(0), turns.index(1), HALF, BLOCK_N, HEAD_DIM, NUM_BUF,
                  RAGGED, HAS_BIAS, HAS_INIT, STORE_LSE, num_warps, True, True)),
                (_ws_softmax_partition,
                 (q_smem.slice(HALF, HALF), k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, idx_row, n,
                  bias_base, stride_bs, o_base, stride_os, lse_base, init_base, stride_zs, init_lse_base, resumes,
                  q_row + HALF, q_len, kv_len, qk_scale, turns.index(1), turns.index(0), HALF, BLOCK_N, HEAD_DIM,
                  NUM_BUF, RAGGED, HAS_BIAS, HAS_INIT, STORE_LSE, num_warps, True, False)),
                (_ws_load_partition,
                 (q_base, k_base, v_base, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, idx_row,
                  n, q_row, q_len, kv_len, stride_qs, stride_ks, stride_vs, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_BUF)),
            ], [num_warps, 1], [CONSUMER_REGS, LOAD_REGS])
        else:
            gl.warp_specialize([
                (_ws_softmax_partition,
                 (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, idx_row, n, bias_base,
                  stride_bs, o_base, stride_os, lse_base, init_base, stride_zs, init_lse_base, resumes, q_row, q_len,
                  kv_len, qk_scale, q_bar, q_bar, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_BUF, RAGGED, HAS_BIAS, HAS_INIT,
                  STORE_LSE, num_warps, False, True)),
                (_ws_load_partition,
                 (q_base, k_base, v_base, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, idx_row,
                  n, q_row, q_len, kv_len, stride_qs, stride_ks, stride_vs, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_BUF)),
            ], [1], [LOAD_REGS])


#: The oldest Triton whose Gluon has what the kernel uses (``tma.make_tensor_descriptor``, ``gl.warp_specialize``'s
#: list form): 3.5's Gluon imports but cannot compile it. Built and checked on 3.6 (GPU) and 3.7 (sm_90 builds).
MIN_TRITON = (3, 6)


def gluon_supported(version: str | None = None) -> bool:
    """Whether this Triton can build the Gluon kernel (Gluon importable, Triton >= MIN_TRITON); a ``version`` given
    is judged by the version alone.

    Example:
        >>> gluon_supported("3.5.1"), gluon_supported("3.6.0"), gluon_supported("3.7.1+git1a2b")
        (False, True, True)
    """
    if version is None:  # (asked on every read: this Triton's answer is worked out once)
        return _this_triton_builds_it()
    parts = [int(m.group()) if (m := re.match(r"\d+", piece)) else 0 for piece in version.split("+")[0].split(".")[:2]]
    return tuple(parts) >= MIN_TRITON


@functools.cache
def _this_triton_builds_it() -> bool:
    return gluon is not None and gluon_supported(triton.__version__)


def hopper_kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a read with no quantized history and 128 x 128 blocks (the caller checks those) can take the Gluon
    kernel: a Triton whose Gluon builds it (:func:`gluon_supported`), CUDA tensors on an NVIDIA compute-capability-9
    GPU (ROCm reports 9.x for some AMD GPUs), fp16 / bf16, head dim 64 or 128, and K / V rows that TMA can copy
    (16-byte aligned bases and row strides, unit stride within a head)."""
    if not gluon_supported() or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if k.dtype != q.dtype or v.dtype != q.dtype or q.shape[-1] not in (64, 128):
        return False
    if torch.version.hip is not None or torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    # Each (batch, head)'s rows are a TMA descriptor's base and row stride: 16-byte aligned.
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and
               all((t.stride(i) * t.element_size()) % 16 == 0 for i in (0, 1, 2)) for t in (q, k, v))


def kernel_variant(warp_specialize: bool | None = None, pingpong: bool | None = None) -> str:
    """Which kernel a call takes: ``"plain"``, ``"ws"`` (warp-specialised, one 8-warp consumer) or ``"pingpong"``
    (warp-specialised, two 4-warp consumers taking turns). Each switch is its argument if given, else its env
    (``GENKV_HOPPER_WS`` / ``GENKV_HOPPER_PINGPONG`` = ``1`` / ``0``) if set, else ``DEFAULT_WS`` /
    ``DEFAULT_PINGPONG``; ping-pong implies warp specialisation. Warp specialisation switched off (the argument
    ``False``, or ``GENKV_HOPPER_WS=0`` where nothing asks for ping-pong at the same level) wins over a ping-pong
    default or env: plain; asked for together with ping-pong at the same level it is an error. So, by env:
    ``GENKV_HOPPER_WS=0`` or ``GENKV_HOPPER_PINGPONG=0`` the plain kernel, ``GENKV_HOPPER_PINGPONG=0
    GENKV_HOPPER_WS=1`` the single consumer.

    Example:
        >>> kernel_variant(warp_specialize=True, pingpong=False), kernel_variant(False, None)
        ('ws', 'plain')
    """
    from genkv.switches import env_flag

    if warp_specialize is False and pingpong is None:  # the argument wins over a ping-pong env or default
        return "plain"
    # env values: None where unset or unclear (env_flag's rule: the default applies)
    ws = warp_specialize if warp_specialize is not None else env_flag("GENKV_HOPPER_WS", None)
    env_pingpong = env_flag("GENKV_HOPPER_PINGPONG", None)
    if ws is False and pingpong is None and env_pingpong is None:  # GENKV_HOPPER_WS=0 wins over the default
        return "plain"
    if pingpong if pingpong is not None else (env_pingpong if env_pingpong is not None else DEFAULT_PINGPONG):
        # (an argument wins over the env: only switches of one level contradict each other)
        if warp_specialize is False or (pingpong is None and ws is False):
            raise ValueError("pingpong is a warp-specialised kernel: it cannot run with warp_specialize=False")
        return "pingpong"
    return "ws" if (ws if ws is not None else DEFAULT_WS) else "plain"


def _ws_constexprs(pingpong: bool) -> dict:
    """The warp-specialised kernel's own launch constants (``num_warps``: its default partition's warps)."""
    return dict(LOAD_REGS=WS_LOAD_REGS, PINGPONG=pingpong, CONSUMER_REGS=WS_CONSUMER_REGS,
                num_warps=4 if pingpong else 8)


def block_sparse_attention_hopper(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    *,
    key_bias: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    num_splits: int | str | None = None,
    initial: tuple[torch.Tensor, torch.Tensor] | None = None,
    warp_specialize: bool | None = None,
    pingpong: bool | None = None,
):
    """Block-sparse attention on (B, S, H, D) tensors through the Gluon kernel (Hopper; see the module docstring).
    Same lists, counts, key bias, resume (``initial``), split rule and results as ``block_sparse_attention_triton``
    (128 x 128 blocks, no quantized history). Returns ``out`` or ``(out, lse)``.

    ``warp_specialize`` (default: env ``GENKV_HOPPER_WS`` = ``1`` / ``0`` if set, else ``DEFAULT_WS``, off): the
    warp-specialised kernel (a producer warp issuing the TMA loads, the consumer warps only waiting on barriers),
    same arguments and results, every feature covered. ``pingpong`` (env ``GENKV_HOPPER_PINGPONG``, else
    ``DEFAULT_PINGPONG``, on): that kernel with two consumer warpgroups taking turns at the tensor cores; pass
    ``pingpong=False`` (or ``warp_specialize=False``) for the others (``kernel_variant``).

    Example (an H100 or H200)::

        q = k = v = torch.randn(1, 256, 2, 128, device="cuda", dtype=torch.bfloat16)
        idx = torch.arange(2, device="cuda", dtype=torch.int32).expand(1, 2, 2, 2).contiguous()
        counts = torch.full((1, 2, 2), 2, device="cuda", dtype=torch.int32)
        out = block_sparse_attention_hopper(q, k, v, idx, counts)  # dense attention over all 256 keys
    """
    from .block_sparse import _check, _checked_scale, _initial_args, _install_descriptor_allocator, _merge_splits
    from .block_sparse import _num_splits, _split_workspace

    if not hopper_kernel_applies(q, k, v):
        raise ValueError("the Hopper kernel needs fp16/bf16 CUDA tensors on a compute-capability-9 GPU, head dim 64 "
                         "or 128 and 16-byte aligned rows; use block_sparse_attention_triton")
    _check(q, k, v, kv_block_indices, kv_block_counts, key_bias, 128, 128)
    b, s_q, h, d = q.shape
    block = 128
    scale = _checked_scale(scale, d)
    _install_descriptor_allocator()
    init_out, init_lse, init_strides = _initial_args(initial, q)
    bias = q if key_bias is None else key_bias.float()  # (q: a placeholder pointer, never read)
    bias_strides = (bias.stride(0), bias.stride(1), bias.stride(2)) if key_bias is not None else (0, 0, 0)
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(b, h, s_q, device=q.device, dtype=torch.float32) if return_lse else out
    idx = kv_block_indices if kv_block_indices.stride(-1) == 1 else kv_block_indices.contiguous()
    cnt = kv_block_counts if kv_block_counts.stride(-1) == 1 else kv_block_counts.contiguous()
    n_q = math.ceil(s_q / block)
    splits = _num_splits(num_splits, n_q * b * h, idx.shape[-1], d, q.device, short_reads=initial is not None,
                         out_elements=q.numel())
    part_out, part_lse, kernel_out, kernel_lse, split_strides = _split_workspace(splits, q, out, lse)
    store_lse = return_lse or splits > 1
    kv_len = k.shape[1]
    variant = kernel_variant(warp_specialize, pingpong)
    kernel = _block_sparse_hopper_fwd if variant == "plain" else _block_sparse_hopper_ws_fwd
    launch = dict(num_warps=8) if variant == "plain" else _ws_constexprs(variant == "pingpong")
    kernel[(n_q, b * h, splits)](
        q, k, v, bias, kernel_out, kernel_lse, idx, cnt, init_out, init_lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kernel_out.stride(0), kernel_out.stride(1), kernel_out.stride(2),
        *bias_strides,
        idx.stride(0), idx.stride(1), idx.stride(2),
        cnt.stride(0), cnt.stride(1),
        kernel_lse.stride(0) if store_lse else 0, kernel_lse.stride(1) if store_lse else 0,
        *init_strides,
        *split_strides,
        h, s_q, kv_len, scale * LOG2E,
        BLOCK_M=block, BLOCK_N=block, HEAD_DIM=d, NUM_BUF=NUM_BUF, RAGGED=kv_len % block != 0,
        HAS_BIAS=key_bias is not None, HAS_INIT=initial is not None, STORE_LSE=store_lse, SPLIT=splits > 1,
        **launch,
    )
    if splits > 1:
        _merge_splits(part_out, part_lse, out, lse, return_lse)
    return (out, lse) if return_lse else out


def compile_for_sm90(head_dim: int = 128, split: bool = False, dtype: str = "bf16", bias: bool = False,
                     resume: bool = False, warp_specialize: bool = False, pingpong: bool = False):
    """The kernel (the warp-specialised one if ``warp_specialize``, in ping-pong if ``pingpong`` too) compiled for
    sm_90 on any machine (no GPU needed; run with ``TRITON_INTERPRET=0``), as a Wan-shaped launch would build it: its
    ``metadata.shared`` and ``asm["ptx"]`` tell what it asks of an SM. Example::

        c = compile_for_sm90(128, split=True)
        assert c.metadata.shared <= 232448
    """
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    constexprs = dict(BLOCK_M=128, BLOCK_N=128, HEAD_DIM=head_dim, NUM_BUF=NUM_BUF, RAGGED=True, HAS_BIAS=bias,
                      HAS_INIT=resume, STORE_LSE=split, SPLIT=split, num_warps=8)
    kernel = _block_sparse_hopper_fwd
    if warp_specialize or pingpong:
        kernel = _block_sparse_hopper_ws_fwd
        constexprs.update(_ws_constexprs(pingpong))
    names = list(kernel.arg_names)
    pointers = {"Q": dtype, "K": dtype, "V": dtype, "Bias": "fp32", "Out": "fp32" if split else dtype, "Lse": "fp32",
                "Idx": "i32", "Cnt": "i32", "Init": dtype, "InitLse": "fp32"}
    sig = {n: "*" + pointers[n] if n in pointers else "constexpr" if n in constexprs else
           "fp32" if n == "qk_scale" else "i32" for n in names}
    # Pointers and the row strides of q / K / V / out are multiples of 16 at Wan shapes (12 heads x 128), as the
    # launcher marks them on the GPU.
    rows = {"stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs",
            "stride_vh", "stride_ob", "stride_os", "stride_oh", "stride_zb", "stride_zs", "stride_zh"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*") or n in rows}
    src = GluonASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                         attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=constexprs["num_warps"]))
