"""TempCache's merge scores in one Triton pass: every staged token against its K candidate slots (issue 20).

At each commit TempCache compares every staged key with the keys of its ``(2r+1)^2`` spatial neighbours one frame
earlier, the new key rotated to the candidate's position first (``match="content"``), and takes the minimum
cosine over heads and batch (``genkv.keep.tempcache.pair_scores``, the reference). Compiled, Inductor turns that
into one looped reduction that gathers each candidate's row with stride-2 loads for the even / odd channels and
recomputes every candidate's norm: 8.2 ms a chunk on an H100 at Wan2.1-1.3B shapes (30 layers x 3 frames x 1560
tokens x 9 candidates x 12 heads x 128; ``eval/profile_ops.py --fp8``, 2026-12-05), a third of the keeper's time.

:func:`pair_scores_triton` runs one program per staged token (all layers and frames at once): it loads the new
key once (per batch row) as a ``(heads, D)`` tile with its norm, and for each candidate loads the candidate's row
contiguously, splits the channel pairs in registers, rotates the new key by the candidate's ``cos`` / ``sin``, and
reduces the per-head dot and the candidate's norm; the score is the minimum over heads (and batch) of
``dot / sqrt(max(|old|^2 |new|^2, 1e-24))``, 1.0 where the rotated new key equals the candidate element for
element. float32 throughout, as the reference; the sums run
in another order, so scores differ from it by float32 rounding.

The kernel runs on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU ones; elsewhere
:func:`genkv.keep.tempcache.pair_scores`.

Example (CPU):
    >>> import torch
    >>> from genkv.kernels.pair_scores import pair_scores_triton
    >>> k = torch.randn(1, 8, 2, 4)
    >>> slots = torch.arange(4).view(1, 4, 1)            # token t of the new frame vs slot t
    >>> pair_scores_triton(k, slots, k[:, :4].unsqueeze(1), None).flatten().tolist()
    [1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse import triton_runs_on

__all__ = ["pair_scores_triton", "pair_scores_applies", "triton_runs_on"]


@triton.jit
def _pair_scores_kernel(K, Slots, KNew, Cos, Sin, Out, n_frames, n_tokens, n_candidates, batch,
                        stride_kb, stride_ks, stride_nb, stride_nl, stride_nf, stride_nt, stride_ct, stride_cc,
                        HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                        ROTATE: tl.constexpr):
    program = tl.program_id(0)  # one staged token of one frame of one layer: (l, f, t) flattened
    t = program % n_tokens
    f = (program // n_tokens) % n_frames
    layer = program // (n_tokens * n_frames)
    head = tl.arange(0, BLOCK_H)[:, None]
    channel = tl.arange(0, HEAD_DIM)[None, :]
    row = head * HEAD_DIM + channel  # a key as (heads, D), read contiguously
    inside = (head < HEADS) & (channel < HEAD_DIM)
    pair = tl.arange(0, HEAD_DIM // 2)[None, :]
    padded_head = tl.arange(0, BLOCK_H) >= HEADS
    candidate = tl.arange(0, BLOCK_K)
    new_base = KNew + layer.to(tl.int64) * stride_nl + f.to(tl.int64) * stride_nf + t.to(tl.int64) * stride_nt
    slot_base = Slots + program.to(tl.int64) * n_candidates
    scores = tl.full([BLOCK_K], float("inf"), tl.float32)  # per candidate, the minimum so far (in registers)
    for b in range(0, batch):
        # the staged key, its channel pairs and its norm once per batch row (a rotation keeps the norm)
        new = tl.load(new_base + b * stride_nb + row, mask=inside, other=0.0).to(tl.float32)
        new_even, new_odd = tl.split(tl.reshape(new, [BLOCK_H, HEAD_DIM // 2, 2]))
        new_norm = tl.sum(new * new, axis=1)
        for c in range(0, n_candidates):
            slot = tl.load(slot_base + c).to(tl.int64)
            old = tl.load(K + b * stride_kb + slot * stride_ks + row, mask=inside, other=0.0).to(tl.float32)
            old_even, old_odd = tl.split(tl.reshape(old, [BLOCK_H, HEAD_DIM // 2, 2]))
            if ROTATE:  # the pair's angle, repeated in Wan's interleaved tables: cos at channel 2j, sin at 2j + 1
                table = t.to(tl.int64) * stride_ct + c * stride_cc
                cos = tl.load(Cos + table + 2 * pair)
                sin = tl.load(Sin + table + 2 * pair + 1)
                moved_even, moved_odd = new_even * cos - new_odd * sin, new_even * sin + new_odd * cos
            else:
                moved_even, moved_odd = new_even, new_odd
            dot = tl.sum(old_even * moved_even + old_odd * moved_odd, axis=1)
            norms = tl.sum(old * old, axis=1) * new_norm
            cosine = tl.math.div_rn(dot, tl.sqrt_rn(tl.maximum(norms, 1e-24)))
            unequal = tl.sum(((old_even != moved_even) | (old_odd != moved_odd)).to(tl.int32), axis=1)
            cosine = tl.where(unequal == 0, 1.0, cosine)
            cosine = tl.where(padded_head, float("inf"), cosine)
            scores = tl.where(candidate == c, tl.minimum(scores, tl.min(cosine, axis=0)), scores)
    tl.store(Out + program.to(tl.int64) * n_candidates + candidate, scores, mask=candidate < n_candidates)


def pair_scores_applies(k: torch.Tensor, k_new: torch.Tensor) -> bool:
    """Whether the kernel takes these keys: float16/bfloat16/float32 (each its own: a quantized history's candidates
    come dequantized in float32, its staged keys in bfloat16; both are read into float32, as the reference casts
    them), ``D / 2`` a power of two (8 to 128)."""
    half = k.shape[-1] // 2
    floats = (torch.float16, torch.bfloat16, torch.float32)
    return k.dtype in floats and k_new.dtype in floats and half in (4, 8, 16, 32, 64) and k.shape[-1] % 2 == 0


def pair_scores_triton(k: torch.Tensor, slots: torch.Tensor, k_new: torch.Tensor,
                       rotation: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """:func:`genkv.keep.tempcache.pair_scores` (same arguments, same float32 ``([L,] F, T, K)`` result) in one
    Triton pass; the reference where the kernel does not run (not CUDA and no ``TRITON_INTERPRET=1``, float64,
    other head dims)."""
    from genkv.keep.tempcache import pair_scores

    if not triton_runs_on(k) or not pair_scores_applies(k, k_new) or slots.numel() == 0:
        return pair_scores(k, slots, k_new, rotation)
    layered = slots.dim() == 4
    if not layered:  # one layer: the same as L = 1
        slots, k_new = slots.unsqueeze(0), k_new.unsqueeze(1)
    layers, frames, tokens, candidates = slots.shape
    batch, heads, dim = k.shape[0], k.shape[2], k.shape[3]
    if k.stride(3) != 1 or k.stride(2) != dim:
        k = k.contiguous()
    if k_new.stride(5) != 1 or k_new.stride(4) != dim:
        k_new = k_new.contiguous()
    slots = slots.contiguous()
    out = torch.empty(layers, frames, tokens, candidates, device=k.device, dtype=torch.float32)
    if rotation is not None:
        cos, sin = (t.float().contiguous() for t in rotation)
        stride_ct, stride_cc = cos.stride(0), cos.stride(1)
    else:
        cos = sin = out  # never read
        stride_ct = stride_cc = 0
    _pair_scores_kernel[(layers * frames * tokens,)](
        k, slots, k_new, cos, sin, out, frames, tokens, candidates, batch,
        k.stride(0), k.stride(1), k_new.stride(0), k_new.stride(1), k_new.stride(2), k_new.stride(3),
        stride_ct, stride_cc,
        HEADS=heads, HEAD_DIM=dim, BLOCK_H=triton.next_power_of_2(heads), BLOCK_K=triton.next_power_of_2(candidates),
        ROTATE=rotation is not None, num_warps=4,
    )
    return out if layered else out[0]
