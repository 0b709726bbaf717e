"""Top-k block routing: scores from one batched GEMM, then selection in one Triton kernel (no sort).

One program per (query block, batch x head). Each fp32 score is read as an order-preserving int32 key; a
33-step bisection over that integer domain finds the exact k-th largest score. A last pass writes the kept block ids
ascending (ties at the threshold go to the lower id, so the choice is deterministic), then the others, in the
full-width ``(B, H, n_q, n_kv)`` layout of :func:`genkv.kernels.route_blocks`. ``forced`` blocks (sinks, the
current chunk) are kept on top of the top-k.
"""

from __future__ import annotations


import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


if triton is not None:

    @triton.jit
    def _order_key(score):
        """fp32 → int32 with the same order (negative floats have their magnitude bits flipped)."""
        bits = score.to(tl.int32, bitcast=True)
        return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)

    #: ``_order_key(-inf)``: the bits of -inf (0xFF800000, as int32 -8388608) with the magnitude bits flipped
    _NEG_INF_KEY = tl.constexpr(-8388608 ^ 0x7FFFFFFF)

    @triton.jit
    def _row_key(row, offs, n_kv):
        return _order_key(tl.load(row + offs, mask=offs < n_kv, other=float("-inf"))).to(tl.int64)

    @triton.jit
    def _selected(row, Forced, offs, n_kv, threshold, ties_seen, ties_allowed):
        """Which of this chunk's blocks are kept (above the threshold, the first ``ties_allowed`` ties in id
        order, or forced), and how many ties the chunk holds."""
        ok = offs < n_kv
        key = _row_key(row, offs, n_kv)
        tie = ok & (key == threshold)
        tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), 0) - 1
        forced = tl.load(Forced + offs, mask=ok, other=0) != 0
        # a -inf score marks an empty block (no dot product of finite summaries gives one): never kept unless forced
        scored = key > _NEG_INF_KEY
        keep = ok & ((((key > threshold) | (tie & (tie_rank < ties_allowed))) & scored) | forced)
        return keep, tl.sum(tie.to(tl.int32), 0)

    @triton.jit(do_not_specialize=["n_kv", "top_k"])  # they change every chunk: no recompiles
    def _route_topk_fwd(
        Scores, Forced, Idx, Cnt,
        stride_sb, stride_sh, stride_sm,
        stride_ib, stride_ih, stride_im,
        stride_cb, stride_ch,
        num_heads, n_kv, top_k,
        CHUNK: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        offs_c = tl.arange(0, CHUNK)
        row = Scores + b * stride_sb + h * stride_sh + pid_m * stride_sm
        idx_row = Idx + b * stride_ib + h * stride_ih + pid_m * stride_im

        # The bisection's bounds. Scores are re-read from L2 in each pass (a row is a few KiB).
        lo = tl.full([], 2147483647, tl.int64)
        hi = tl.full([], -2147483648, tl.int64)
        for start in range(0, n_kv, CHUNK):
            offs = start + offs_c
            key = _row_key(row, offs, n_kv)
            ok = offs < n_kv
            lo = tl.minimum(lo, tl.min(tl.where(ok, key, 2147483647), 0))
            hi = tl.maximum(hi, tl.max(tl.where(ok, key, -2147483648), 0))

        # Bisection: the largest threshold t with count(key >= t) >= top_k is the k-th largest key (exact).
        for _ in range(33):
            mid = lo + (hi - lo + 1) // 2
            count = 0
            for start in range(0, n_kv, CHUNK):
                offs = start + offs_c
                count += tl.sum(((_row_key(row, offs, n_kv) >= mid) & (offs < n_kv)).to(tl.int32), 0)
            go_up = count >= top_k
            lo = tl.where(go_up, mid, lo)
            hi = tl.where(go_up, hi, mid - 1)
        threshold = lo

        count_above = 0
        for start in range(0, n_kv, CHUNK):
            offs = start + offs_c
            count_above += tl.sum(((_row_key(row, offs, n_kv) > threshold) & (offs < n_kv)).to(tl.int32), 0)
        ties_allowed = top_k - count_above

        # Kept ids ascending, then the rest (so the row is a permutation of 0..n_kv-1).
        kept = 0
        ties_seen = 0
        for start in range(0, n_kv, CHUNK):
            offs = start + offs_c
            keep, ties = _selected(row, Forced, offs, n_kv, threshold, ties_seen, ties_allowed)
            pos = kept + tl.cumsum(keep.to(tl.int32), 0) - 1
            tl.store(idx_row + pos, offs, mask=keep)
            kept += tl.sum(keep.to(tl.int32), 0)
            ties_seen += ties
        tl.store(Cnt + b * stride_cb + h * stride_ch + pid_m, kept)
        dropped = 0
        ties_seen = 0
        for start in range(0, n_kv, CHUNK):
            offs = start + offs_c
            keep, ties = _selected(row, Forced, offs, n_kv, threshold, ties_seen, ties_allowed)
            rest = (offs < n_kv) & ~keep
            pos = kept + dropped + tl.cumsum(rest.to(tl.int32), 0) - 1
            tl.store(idx_row + pos, offs, mask=rest)
            dropped += tl.sum(rest.to(tl.int32), 0)
            ties_seen += ties


def route_topk_triton(
    query_summary: torch.Tensor, key_summary: torch.Tensor, top_k: int, forced: torch.Tensor, scale: float,
    empty_blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k selection from block summaries (B, H, n_q, D) and (B, H, n_kv, D): one batched GEMM for the scores
    (fp32), one Triton kernel for the selection.

    ``forced``: (n_kv,) bool, blocks always kept; ``empty_blocks``: (n_kv,) bool, blocks never kept unless
    forced. Returns int32 ``(B, H, n_q, n_kv)`` ids (kept ones first,
    ascending) and ``(B, H, n_q)`` counts, like :func:`genkv.kernels.route_blocks`.
    """
    if triton is None:
        raise RuntimeError("triton is not installed; route with the torch path")
    b, h, n_q, _ = query_summary.shape
    n_kv = key_summary.shape[2]
    scores = torch.matmul(query_summary.float(), key_summary.float().transpose(-1, -2)).mul_(scale)
    if empty_blocks is not None:
        scores.masked_fill_(empty_blocks, float("-inf"))
    idx = torch.empty(b, h, n_q, n_kv, device=scores.device, dtype=torch.int32)
    cnt = torch.empty(b, h, n_q, device=scores.device, dtype=torch.int32)
    forced_i8 = forced.to(device=scores.device, dtype=torch.int8).contiguous()
    chunk = 256  # fixed: a size per n_kv would recompile the kernel as the cache grows
    _route_topk_fwd[(n_q, b * h)](
        scores, forced_i8, idx, cnt,
        scores.stride(0), scores.stride(1), scores.stride(2),
        idx.stride(0), idx.stride(1), idx.stride(2),
        cnt.stride(0), cnt.stride(1),
        h, n_kv, min(top_k, n_kv),
        CHUNK=chunk, num_warps=4,
    )
    return idx, cnt
