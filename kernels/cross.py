"""Sparse cross-attention: each group of queries (a latent frame) attends to its own subset of prompt tokens.

``select_prompt_tokens`` picks, per group and head, the ``top_k`` real prompt tokens whose keys score highest
against the group's mean query; ``sparse_cross_attention`` gathers them (plus an optional extra key per group,
e.g. the folded padding key) and runs one batched attention over all groups.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def select_prompt_tokens(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    tokens_per_group: int,
    top_k: int,
    valid_length: torch.Tensor | None = None,
    score_bias: torch.Tensor | None = None,
    need_valid: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top-k prompt tokens per (batch, group, head), never a padding token.

    Which tokens are real comes from ``valid_length`` (B,) or, made once per prompt by the caller, from
    ``score_bias`` (B, L) float32: 0 for a real token, ``-inf`` for padding. Returns ``indices`` (B, G, H, k)
    int64 and ``valid`` (B, G, H, k) bool (False where the prompt has fewer than ``top_k`` real tokens; those
    picks must be masked), or ``None`` for ``valid`` with ``need_valid=False`` (every prompt has ``top_k`` real
    tokens: the caller knows it from the host-side lengths).

    Example:
        >>> import torch
        >>> q, k = torch.randn(1, 6, 2, 8), torch.randn(1, 10, 2, 8)
        >>> idx, ok = select_prompt_tokens(q, k, tokens_per_group=3, top_k=4, valid_length=torch.tensor([7]))
        >>> tuple(idx.shape), bool((idx[ok] < 7).all())
        ((1, 2, 2, 4), True)
    """
    b, s, h, _ = q.shape
    length = k.shape[1]
    if s % tokens_per_group:
        raise ValueError(f"query length {s} is not a multiple of tokens_per_group={tokens_per_group}")
    groups = s // tokens_per_group
    if score_bias is None:
        if valid_length is None:
            raise ValueError("pass valid_length or score_bias")
        is_real = torch.arange(length, device=k.device)[None, :] < valid_length.to(k.device)[:, None]
        score_bias = torch.zeros(b, length, device=k.device).masked_fill(~is_real, -float("inf"))
    mean_q = q.unflatten(1, (groups, tokens_per_group)).mean(2, dtype=torch.float32)  # (B, G, H, D)
    scores = torch.einsum("bghd,blhd->bghl", mean_q, k.float()) + score_bias[:, None, None, :]
    indices = scores.topk(min(top_k, length), dim=-1).indices
    if not need_valid:
        return indices, None
    valid = (score_bias == 0)[:, None, None, :].expand_as(scores).gather(-1, indices)
    return indices, valid


def sparse_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_bias: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of each query group over its gathered prompt tokens (and one optional extra key per batch).

    q (B, S, H, D) with S = G x tokens; k, v (B, L, H, D); ``indices``/``valid`` (B, G, H, k) from
    :func:`select_prompt_tokens` (``valid=None``: every pick is real); ``extra_k``/``extra_v`` (B, H, D) with
    logit bias ``extra_bias`` (B,) (``log(n)`` for a key standing for n identical ones, ``-inf`` for none).
    ``attn_bias`` (B, 1, 1, n), made once per prompt by a caller whose picks are all real, replaces the bias
    built here from ``valid`` and ``extra_bias``. Returns (B, S, H, D).
    """
    b, s, h, d = q.shape
    groups = indices.shape[1]
    length = k.shape[1]

    def gather(t: torch.Tensor) -> torch.Tensor:  # (B, L, H, D) -> (B, G, H, k, D)
        src = t.permute(0, 2, 1, 3)[:, None].expand(b, groups, h, length, d)
        return src.gather(3, indices[..., None].expand(*indices.shape, d))

    keys, values = gather(k), gather(v)
    if extra_k is not None:
        keys = torch.cat([keys, extra_k[:, None, :, None, :].expand(b, groups, h, 1, d)], dim=3)
        values = torch.cat([values, extra_v[:, None, :, None, :].expand(b, groups, h, 1, d)], dim=3)
    n = keys.shape[3]
    if attn_bias is not None:
        mask = attn_bias.to(q.dtype)[:, None].expand(b, groups, 1, 1, n).reshape(b * groups, 1, 1, n)
    else:
        bias = torch.zeros(indices.shape, device=q.device, dtype=torch.float32)
        if valid is not None:
            bias = bias.masked_fill(~valid, -float("inf"))
        if extra_k is not None:
            bias = torch.cat([bias, extra_bias.float().view(b, 1, 1, 1).expand(b, groups, h, 1)], dim=3)
        mask = bias.reshape(b * groups, h, 1, n).to(q.dtype)
    # (B, S, H, D) -> (B*G, H, T, D) as a view: SDPA takes the strides, no copy of the queries.
    qf = q.reshape(b * groups, s // groups, h, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        qf, keys.reshape(b * groups, h, n, d), values.reshape(b * groups, h, n, d), attn_mask=mask,
        scale=scale if scale is not None else 1.0 / math.sqrt(d),
    )
    return out.transpose(1, 2).reshape(b, s, h, d)
