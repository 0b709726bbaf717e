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

Status (H100, every block listed, Wan shapes, docs/BENCHMARKS.md twenty-third): correct, but 1.08-1.16x the Triton
kernel's time, so it is opt-in (``DEFAULT_HOPPER`` off). What FlashAttention-3 has and this draft lacks: a producer
warp for the loads and two consumer warpgroups in ping-pong (``gl.warp_specialize``).
"""

from __future__ import annotations

import math

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


def hopper_kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a read with no quantized history and 128 x 128 blocks (the caller checks those) can take the Gluon
    kernel: Gluon present, CUDA tensors on a compute-capability-9 GPU, fp16 / bf16, head dim 64 or 128, and K / V
    rows that TMA can copy (16-byte aligned bases and row strides, unit stride within a head)."""
    if gluon is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if k.dtype != q.dtype or v.dtype != q.dtype or q.shape[-1] not in (64, 128):
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    # Each (batch, head)'s rows are a TMA descriptor's base and row stride: 16-byte aligned.
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and
               all((t.stride(i) * t.element_size()) % 16 == 0 for i in (0, 1, 2)) for t in (q, k, v))


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
):
    """Block-sparse attention on (B, S, H, D) tensors through the Gluon kernel (Hopper; see the module docstring).
    Same lists, counts, key bias, resume (``initial``), split rule and results as ``block_sparse_attention_triton``
    (128 x 128 blocks, no quantized history). Returns ``out`` or ``(out, lse)``.

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
    _block_sparse_hopper_fwd[(n_q, b * h, splits)](
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
        num_warps=8,
    )
    if splits > 1:
        _merge_splits(part_out, part_lse, out, lse, return_lse)
    return (out, lse) if return_lse else out


def compile_for_sm90(head_dim: int = 128, split: bool = False, dtype: str = "bf16", bias: bool = False,
                     resume: bool = False):
    """The kernel compiled for sm_90 on any machine (no GPU needed; run with ``TRITON_INTERPRET=0``), as a Wan-shaped
    launch would build it: its ``metadata.shared`` and ``asm["ptx"]`` tell what it asks of an SM. Example::

        c = compile_for_sm90(128, split=True)
        assert c.metadata.shared <= 232448
    """
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    constexprs = dict(BLOCK_M=128, BLOCK_N=128, HEAD_DIM=head_dim, NUM_BUF=NUM_BUF, RAGGED=True, HAS_BIAS=bias,
                      HAS_INIT=resume, STORE_LSE=split, SPLIT=split, num_warps=8)
    kernel = _block_sparse_hopper_fwd
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
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
