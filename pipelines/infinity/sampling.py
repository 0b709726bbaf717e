"""Bit sampling as the official ``sample_with_top_k_top_p_also_inplace_modifying_logits_`` does it on Infinity's
(B, l * bits, 2) bit logits: top-k (a no-op for k >= 2), top-p (drop the less likely value of a bit when its
probability is at most ``1 - top_p``), then ``torch.multinomial`` with the caller's generator in the official
order, so a seed draws the official bits."""

from __future__ import annotations

import torch


def sample_bits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One value per row of ``logits`` (B, n, V) (V = 2 for bits) → (B, n) long.

    Example:
        >>> import torch
        >>> sample_bits(torch.tensor([[[0.0, 5.0], [5.0, 0.0]]]), top_k=1).tolist()
        [[1, 0]]
    """
    b, n, v = logits.shape
    logits = logits.clone()
    if top_k > 0:
        kth = logits.topk(min(top_k, v), dim=-1).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        ascending, order = logits.sort(dim=-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False  # the most likely value always stays
        logits.masked_fill_(drop.scatter(-1, order, drop), -torch.inf)
    probs = logits.softmax(-1).view(-1, v)
    return torch.multinomial(probs, 1, replacement=True, generator=generator).view(b, n)
