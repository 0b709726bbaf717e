"""KV caches for next-scale (VAR-style) generation: what each layer keeps between scales.

Each scale's queries attend to ``history + current scale`` (no mask). :class:`FullScaleCache` keeps everything,
as upstream VAR does. :class:`BudgetedScaleCache` keeps, after each scale's attention, at most ``caps[layer][scale]``
tokens per (batch, head): the ones the scale's observation window attends to most (ScaleKV's selection). The
kept history is a compact tensor per layer, so memory really shrinks.

Layout: (B, H, L, D), B counting both CFG branches (each keeps its own rows). Keys are l2-normalised and queries
carry the temperature, so attention runs with scale 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class FullScaleCache:
    """Keep every token of every scale (upstream behaviour).

    Example:
        >>> import torch
        >>> cache = FullScaleCache(num_layers=1, patch_nums=(1, 2))
        >>> q = k = v = torch.randn(2, 3, 1, 8)
        >>> cache.attend(0, 0, q, k, v).shape
        torch.Size([2, 3, 1, 8])
    """

    name = "full"

    def __init__(self, num_layers: int, patch_nums: tuple[int, ...]) -> None:
        self.num_layers, self.patch_nums = num_layers, tuple(patch_nums)
        self.reset()

    def reset(self) -> None:
        self.k: list[torch.Tensor | None] = [None] * self.num_layers
        self.v: list[torch.Tensor | None] = [None] * self.num_layers
        #: rows[scale][layer] = (tokens kept per (batch, head), bytes) after that scale's attention
        self.rows: dict[int, list[tuple[int, int]]] = {}

    def attend(self, layer: int, scale: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        if scale < len(self.patch_nums) - 1:  # the last scale's K/V are never read again
            k, v = self.keep(layer, scale, q, k, v)
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = self.v[layer] = None
        kept = 0 if scale == len(self.patch_nums) - 1 else k.shape[2]
        kept_bytes = 2 * k[:, :, :kept].numel() * k.element_size()
        self.rows.setdefault(scale, [(0, 0)] * self.num_layers)[layer] = (kept, kept_bytes)
        return out

    def keep(self, layer: int, scale: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """What stays after this scale's attention (all of it, here)."""
        return k, v

    def stats(self) -> dict:
        """Per scale and layer: tokens kept (per batch row and head) and bytes; the peak over scales."""
        per_scale = {s: {"tokens": [r[0] for r in rows], "bytes": [r[1] for r in rows],
                         "total_bytes": sum(r[1] for r in rows)} for s, rows in sorted(self.rows.items())}
        peak = max((v["total_bytes"] for v in per_scale.values()), default=0)
        return {"method": self.name, "scales": per_scale, "peak_bytes": peak}


def window_attention(q: torch.Tensor, k: torch.Tensor, reduce, slice_elements: int = 2**27) -> torch.Tensor:
    """``reduce(softmax(q @ k^T))`` in float32 for observation queries ``q`` (B, H, w, D) over keys ``k``
    (B, H, n, D), computed in slices of the batch and concatenated: the float32 copy of the keys stays under
    ``slice_elements`` (at VAR-d30's second-to-last scale and 3000 image rows it would be 10 GB)."""
    b, h, n, d = k.shape
    rows = max(1, slice_elements // max(1, h * n * d))
    parts = []
    for i in range(0, b, rows):
        probs = torch.softmax(q[i : i + rows].float() @ k[i : i + rows].float().transpose(-1, -2), dim=-1)
        parts.append(reduce(probs))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def observation_window(scale_side: int, window: int, device: torch.device) -> torch.Tensor:
    """Indices (within the current scale) of a ``sqrt(window)``-square grid of patch-centre tokens, or every token
    when the scale is smaller than the grid."""
    grid = int(math.isqrt(window))
    if scale_side <= grid:
        return torch.arange(scale_side * scale_side, device=device)
    centres = ((torch.arange(grid, device=device) + 0.5) * scale_side / grid).long()
    return (centres.view(-1, 1) * scale_side + centres.view(1, -1)).flatten()


class BudgetedScaleCache(FullScaleCache):
    """Keep at most ``caps[layer][scale]`` tokens per (batch, head) after each scale (ScaleKV's selection):
    score every cached token by the attention of an observation window of the current scale's queries, smooth
    the scores with a max-pool along the sequence, keep the window's own tokens and the top-scoring rest."""

    name = "scalekv"

    def __init__(self, num_layers: int, patch_nums: tuple[int, ...], caps: list[list[int]], window: int = 16,
                 pool_kernel: int = 5) -> None:
        self.caps, self.window, self.pool_kernel = caps, window, pool_kernel
        self._windows: dict[tuple[int, torch.device], torch.Tensor] = {}  # built once per scale, not per layer
        super().__init__(num_layers, patch_nums)

    def keep(self, layer: int, scale: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        cap = self.caps[layer][scale]
        n = k.shape[2]
        if cap >= n:
            return k, v
        side = self.patch_nums[scale]
        current = q.shape[2]
        key = (scale, q.device)
        if key not in self._windows:
            self._windows[key] = observation_window(side, self.window, q.device)
        win = self._windows[key]
        score = window_attention(q.index_select(2, win), k, lambda probs: probs.sum(2))  # (B, H, n)
        if self.pool_kernel > 1:
            score = F.max_pool1d(score.flatten(0, 1)[:, None], self.pool_kernel, stride=1,
                                 padding=self.pool_kernel // 2)[:, 0].view_as(score)
        # The window's own tokens first (they summarise the newest scale), then the best-scored rest.
        score.index_fill_(2, win + (n - current), float("inf"))
        idx = score.topk(cap, dim=-1).indices.sort(dim=-1).values
        gather = idx[..., None].expand(-1, -1, -1, k.shape[-1])
        return k.gather(2, gather), v.gather(2, gather)


def uniform_caps(num_layers: int, patch_nums: tuple[int, ...], budget: float) -> list[list[int]]:
    """``floor(budget x tokens so far)`` for every layer after every scale: the total is at most ``budget`` of
    the full cache at each scale."""
    seen, caps = 0, []
    for p in patch_nums:
        seen += p * p
        caps.append(int(math.floor(budget * seen + 1e-9)))
    return [list(caps) for _ in range(num_layers)]
