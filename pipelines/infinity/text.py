"""Infinity's text conditioning: flan-T5 features → RMS norm → (a) an attentive pool giving the start token and
the AdaLN condition, (b) an MLP giving every block's cross-attention keys/values.

The official code packs prompts of different lengths into one varlen sequence for flash-attn; here they stay
padded (B, L, C) with a key mask, which is the same attention. Like the official code on its only kernel
(flash-attn's varlen kernel takes no float32), a float32 model runs these attentions on bfloat16-rounded
inputs and rounds the output to bfloat16 (``CrossAttention.half_dtype``; None computes in the model's dtype).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` in float32 (the official ``FastRMSNorm`` without flash-attn's fused op)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.promote_types(x.dtype, torch.float32))
        return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


class CrossAttention(nn.Module):
    """Attention from the image tokens (or, with ``pool=True``, from one learned query per head) to the text.

    The text's keys and values depend only on the prompt: :meth:`text_kv` computes them once per generation.
    """

    #: The official code's rounding: float32 inputs go to flash-attn as bfloat16 and come back as bfloat16.
    half_dtype: torch.dtype | None = torch.bfloat16

    def __init__(self, dim: int, text_dim: int, heads: int, pool: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        if pool:
            self.mat_q = nn.Parameter(torch.zeros(1, heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(text_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def text_kv(self, text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed text tokens (N, text_dim), N = ``mask.sum()``, → keys and values (B, H, L, D), zero where
        ``mask`` (B, L) is False. Projecting the packed tokens, as upstream does, skips the padding and gives
        the official rounding."""
        kv = F.linear(text, self.mat_kv.weight, torch.cat([self.zero_k_bias, self.v_bias]))
        k, v = unpack(kv, mask).unflatten(-1, (2, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor | None, kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, l, dim), or None for the pool; ``mask`` (B, L) marks real text tokens. Returns (B, l, dim)."""
        k, v = kv
        b = k.shape[0]
        if x is None:
            q = self.mat_q.to(k.dtype).unsqueeze(2).expand(b, -1, -1, -1)  # (B, H, 1, D)
        else:
            q = self.mat_q(x).view(b, x.shape[1], self.heads, self.head_dim).transpose(1, 2)
        dtype = q.dtype
        if self.half_dtype is not None and dtype == torch.float32:
            q, k, v = (t.to(self.half_dtype).float() for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
                                             scale=1 / math.sqrt(self.head_dim))
        if self.half_dtype is not None and dtype == torch.float32:
            out = out.to(self.half_dtype)
        return self.proj(out.to(dtype).transpose(1, 2).flatten(2))


class TextAttentivePool(nn.Module):
    """The official ``text_proj_for_sos``: one learned query per head pools the prompt into a vector."""

    def __init__(self, dim: int, text_dim: int, heads: int) -> None:
        super().__init__()
        self.ca = CrossAttention(dim, text_dim, heads, pool=True)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Packed text tokens (N, text_dim) of the prompts ``mask`` (B, L) marks → (B, dim)."""
        return self.ca(None, self.ca.text_kv(text, mask), mask)[:, 0]


def unpack(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, ...) rows of the True entries of ``mask`` (B, L), in order → (B, L, ...) with zeros elsewhere."""
    out = packed.new_zeros(*mask.shape, *packed.shape[1:])
    out[mask] = packed
    return out


def pool_heads(dim: int, text_dim: int) -> int:
    """The official rule for the pool's heads: T5 channels over 128 (over 64 when the model is wider than 4096)."""
    return text_dim // (64 if dim > 4096 else 128)
