"""Infinity's 2D rotary position embedding for self-attention (``rope2d_normalized_by_hw=2``).

Each head's channels form ``head_dim / 2`` rotation pairs of adjacent channels; the first half of the pairs
rotate with the token's row, the second half with its column, at frequencies ``base ** (-2i / (head_dim / 2))``.
Positions of a smaller grid are spread over the final 1M grid of the same aspect ratio (row ``i`` of an
``h``-row grid sits at row ``round(i * H / h)`` of the ``H``-row final grid), so every scale covers the same
image area. The tables are built once per schedule, in float32 as upstream, and the rotation is applied to the
l2-normalised q and k *before* they enter the KV cache: a cached key keeps its position whatever a cache
policy drops around it.
"""

from __future__ import annotations

import torch

from .schedules import full_schedule


def grid_positions(h: int, w: int, full_h: int, full_w: int, normalized: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column positions (h*w,) of an h x w grid; ``normalized`` spreads them over full_h x full_w."""
    if normalized:
        # float32 arithmetic and round-half-to-even, as the official table does, so positions match exactly.
        rows = (torch.arange(h) * (full_h / h)).round().long()
        cols = (torch.arange(w) * (full_w / w)).round().long()
    else:
        rows, cols = torch.arange(h), torch.arange(w)
    return rows.view(h, 1).expand(h, w).reshape(-1), cols.view(1, w).expand(h, w).reshape(-1)


def rope_tables(schedule: tuple[tuple[int, int], ...], head_dim: int, normalized: bool = True,
                base: float = 10000.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per scale, (cos, sin) tables of shape (h*w, head_dim / 2), float32.

    Example:
        >>> cos, sin = rope_tables(((1, 1), (2, 2)), head_dim=8)[1]
        >>> cos.shape
        torch.Size([4, 4])
    """
    quarter = head_dim // 4
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2)))
    full_h, full_w = full_schedule(schedule)[-1] if normalized else schedule[-1]
    tables = []
    for h, w in schedule:
        rows, cols = grid_positions(h, w, full_h, full_w, normalized)
        angles = torch.cat([rows.float()[:, None] * inv_freq[None, :quarter],
                            cols.float()[:, None] * inv_freq[None, :quarter]], dim=-1)
        tables.append((angles.cos(), angles.sin()))
    return tables


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` (B, H, L, D) by the (L, D/2) angles; computed in float32 (or in
    x's dtype when wider)."""
    pairs = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack([cos * even - sin * odd, sin * even + cos * odd], dim=-1)
    return out.flatten(-2).to(x.dtype)
