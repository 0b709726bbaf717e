"""Routing: choose, for every query block, the key blocks it attends to, from cheap block summaries.

Queries and keys are mean-pooled over blocks (``block_m`` queries, ``block_n`` keys); the score of a key block
for a query block is the scaled dot product of the two means (per head), and the selection keeps the
``top_k`` best blocks, or the fewest blocks whose softmax mass reaches ``top_p``, plus the ``always`` blocks
(sinks, the current chunk). Output follows FlexAttention's ``BlockMask.from_kv_blocks`` convention: int32
``(B, H, n_q_blocks, max_blocks)`` indices, ascending, of which the first ``counts`` are used.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def pool_blocks(x: torch.Tensor, block: int, length: int | None = None) -> torch.Tensor:
    """Mean of each block of ``block`` rows of (B, S, H, D) → (B, H, n_blocks, D) in fp32; a ragged last block
    averages only its real rows.

    Sums in fp32 straight from the input's dtype (no fp32 copy of the keys: at 131k cached keys that copy alone
    cost more than the sparse attention it routes).
    """
    length = x.shape[1] if length is None else length
    n_full, tail = divmod(length, block)
    parts = []
    if n_full:
        parts.append(x[:, : n_full * block].unflatten(1, (n_full, block)).sum(2, dtype=torch.float32) / block)
    if tail:
        parts.append(x[:, n_full * block : length].sum(1, keepdim=True, dtype=torch.float32) / tail)
    pooled = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    return pooled.permute(0, 2, 1, 3)


def route_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_m: int = 128,
    block_n: int = 128,
    top_k: int | None = None,
    top_p: float | None = None,
    always: Sequence[int] | torch.Tensor | None = None,
    kv_length: int | None = None,
    key_summary: torch.Tensor | None = None,
    empty_blocks: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, head, query block): the key blocks to attend to.

    ``always``: key block ids every query block keeps (e.g. sink blocks and the current chunk's blocks).
    With ``top_k`` and ``top_p`` both None every block is kept (dense). Deterministic for a fixed input.
    ``key_summary``: the keys' block means ``pool_blocks(k, block_n)`` (B, H, n_blocks, D) when the caller keeps
    them (history keys do not change while a chunk is denoised), so routing does not re-read every cached key;
    over a quantized history, ``pool_quantized_blocks(history, block_n, current_keys=k)`` (``k``: the current chunk).
    ``empty_blocks``: (n_kv_blocks,) bool, key blocks holding no live key (a fixed-layout cache's empty slots):
    never chosen, unless ``always`` lists them.
    ``backend``: ``"triton"`` (fused scoring + top-k, the default on CUDA for top-k routing; ties go to the lower
    block id), ``"torch"`` (anywhere; also the only one for ``top_p``), or None for that choice.

    Example:
        >>> import torch
        >>> q, k = torch.randn(1, 64, 2, 16), torch.randn(1, 256, 2, 16)
        >>> idx, cnt = route_blocks(q, k, block_m=32, block_n=32, top_k=3, always=[0])
        >>> tuple(idx.shape), int(cnt.max())
        ((1, 2, 2, 8), 4)
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    kv_length = k.shape[1] if kv_length is None else kv_length
    qs = pool_blocks(q, block_m)  # (B, H, nQ, D)
    ks = pool_blocks(k, block_n, kv_length) if key_summary is None else key_summary  # (B, H, nK, D)
    n_kv = ks.shape[2]
    forced = torch.zeros(n_kv + 1, dtype=torch.bool, device=q.device)  # the last entry absorbs invalid ids
    if always is not None:
        if isinstance(always, torch.Tensor):
            ids = always.to(device=q.device, dtype=torch.long).flatten()
        else:  # a host list: a pinned, non-blocking copy keeps the host from waiting on the GPU
            ids = torch.tensor(list(always), dtype=torch.long)
            ids = ids.pin_memory().to(q.device, non_blocking=True) if q.is_cuda else ids
        forced.scatter_(0, torch.where((ids >= 0) & (ids < n_kv), ids, n_kv), True)
    forced = forced[:n_kv]
    if empty_blocks is not None and empty_blocks.shape != (n_kv,):
        raise ValueError(f"empty_blocks must be ({n_kv},) bool, one per key block; got {tuple(empty_blocks.shape)}")
    choice = backend or ("triton" if q.is_cuda else "torch")
    if choice not in ("torch", "triton"):
        raise ValueError(f"routing backend {choice!r} is not 'torch' or 'triton'")
    if choice == "triton" and top_p is None and top_k is not None:
        from .routing_triton import route_topk_triton

        return route_topk_triton(qs, ks, top_k, forced, 1.0 / math.sqrt(q.shape[-1]), empty_blocks)
    scores = torch.einsum("bhqd,bhkd->bhqk", qs, ks) / math.sqrt(q.shape[-1])
    if empty_blocks is not None:  # an empty block scores -inf: ranked last, and dropped below
        scores = scores.masked_fill(empty_blocks, -float("inf"))
    if top_k is None and top_p is None:
        keep = torch.ones_like(scores, dtype=torch.bool)
    else:
        keep = torch.zeros_like(scores, dtype=torch.bool)
        if top_p is None and top_k is not None and top_k < n_kv:
            # top-k alone: a partial selection (deterministic for a fixed input), much cheaper than a full sort.
            keep.scatter_(-1, scores.topk(top_k, dim=-1, sorted=False).indices, True)
        elif top_p is None:
            keep.fill_(True)
        else:
            # Rank by score; ties broken by block id (argsort is stable) so the selection is deterministic.
            order = torch.argsort(-scores, dim=-1, stable=True)
        if top_k is not None and top_p is not None:
            rank_ok = torch.arange(n_kv, device=q.device) < top_k
            keep.scatter_(-1, order, rank_ok.expand_as(order))
        if top_p is not None:
            probs = scores.softmax(-1).gather(-1, order)
            before = probs.cumsum(-1) - probs  # mass of the better blocks
            mass_ok = before < top_p
            by_mass = torch.zeros_like(keep).scatter_(-1, order, mass_ok)
            keep = by_mass if top_k is None else keep & by_mass
    if empty_blocks is not None:
        keep = keep & ~empty_blocks
    keep = keep | forced
    counts = keep.sum(-1).to(torch.int32)
    # Ascending block ids first, unused slots after: sort (not-kept, id) keys. Full width, so no host sync.
    key = (~keep).long() * n_kv + torch.arange(n_kv, device=q.device)
    indices = torch.sort(key, dim=-1).values % n_kv
    return indices.to(torch.int32).contiguous(), counts
