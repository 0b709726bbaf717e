"""VAR's next-scale transformer (``var_d{16,20,24,30,36}.pth``), written for genkv with the official parameter
names, and with its KV cache factored out so genkv methods can budget it.

A block is AdaLN-conditioned (a class embedding modulates LayerNorm scale/shift and the residual gates),
self-attention uses l2-normalised q/k with a learned per-head temperature (clamped at log 100), positions are
absolute (learned per-token + per-scale embeddings). Each scale's tokens attend to every earlier scale's tokens
through the cache (no mask at sampling time); the cache is the object handed to :meth:`VARTransformer.forward_scale`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VARConfig:
    depth: int = 16
    num_classes: int = 1000
    vocab_size: int = 4096
    z_channels: int = 32
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    shared_aln: bool = False
    mlp_ratio: float = 4.0
    head_dim: int = 64
    width: int | None = None  # default depth * 64 (official rule); heads = width / head_dim

    @property
    def embed_dim(self) -> int:
        return self.width or self.depth * 64

    @property
    def num_heads(self) -> int:
        return self.embed_dim // self.head_dim

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def scale_bounds(self) -> list[tuple[int, int]]:
        bounds, start = [], 0
        for p in self.patch_nums:
            bounds.append((start, start + p * p))
            start += p * p
        return bounds


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.proj = nn.Linear(dim, dim)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, C) → q, k, v as (B, H, L, D); q already carries the per-head temperature (attention scale 1)."""
        b, n, _ = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        temperature = self.scale_mul_1H11.clamp(max=math.log(100.0)).exp()
        return F.normalize(q, dim=-1) * temperature, F.normalize(k, dim=-1), v


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, shared_aln: bool) -> None:
        super().__init__()
        self.dim = dim
        self.attn = SelfAttention(dim, heads)
        self.ffn = FFN(dim, round(dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, dim))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.shared_aln:  # cond is already the shared (B, 1, 6, C) projection
            return (self.ada_gss + cond).unbind(2)
        return self.ada_lin(cond).view(-1, 1, 6, self.dim).unbind(2)


class VARTransformer(nn.Module):
    """The class-conditional next-scale predictor (see the module docstring).

    Example:
        >>> import torch
        >>> model = VARTransformer(VARConfig(depth=2, width=32, head_dim=16, num_classes=4, vocab_size=8,
        ...                                  z_channels=4, patch_nums=(1, 2)))
        >>> sum(p.numel() for p in model.parameters()) > 0
        True
    """

    def __init__(self, config: VARConfig) -> None:
        super().__init__()
        self.config = config
        c, n = config.embed_dim, config.num_tokens
        first = config.patch_nums[0] ** 2
        self.word_embed = nn.Linear(config.z_channels, c)
        self.class_emb = nn.Embedding(config.num_classes + 1, c)  # the last row is the unconditional class
        self.pos_start = nn.Parameter(torch.zeros(1, first, c))
        self.pos_1LC = nn.Parameter(torch.zeros(1, n, c))
        self.lvl_embed = nn.Embedding(len(config.patch_nums), c)
        if config.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.blocks = nn.ModuleList(
            [AdaLNBlock(c, config.num_heads, config.mlp_ratio, config.shared_aln) for _ in range(config.depth)]
        )
        self.head_nm = nn.Module()
        self.head_nm.ln_wo_grad = nn.LayerNorm(c, eps=1e-6, elementwise_affine=False)
        self.head_nm.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))
        self.head = nn.Linear(c, config.vocab_size)
        levels = torch.cat([torch.full((p * p,), i) for i, p in enumerate(config.patch_nums)])
        self.register_buffer("lvl_1L", levels.view(1, n))
        # Training-time block-causal mask of the official model (kept for strict loading; sampling uses the cache).
        mask = torch.where(levels.view(n, 1) >= levels.view(1, n), 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", mask.view(1, 1, n, n))

    def init_random(self, generator: torch.Generator | None = None, std: float = 0.02) -> "VARTransformer":
        """Random weights for tests and speed benchmarks (trunc-normal projections, zero biases, gates ~ 1)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("scale_mul_1H11"):
                    continue
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=generator) * std)
                else:
                    p.zero_()
        return self

    def level_positions(self) -> torch.Tensor:
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def condition(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class embeddings (B, C) and what the blocks take as conditioning."""
        cond = self.class_emb(labels)
        shared = self.shared_ada_lin(cond).view(-1, 1, 6, self.config.embed_dim) if self.config.shared_aln else cond
        return cond, shared

    def first_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        first = self.config.patch_nums[0] ** 2
        return (cond.unsqueeze(1).expand(-1, first, -1) + self.pos_start.expand(cond.shape[0], -1, -1)
                + self.level_positions()[:, :first])

    def forward_scale(self, x: torch.Tensor, cond: torch.Tensor, block_cond: torch.Tensor, scale: int,
                      cache, hidden_only: bool = False) -> torch.Tensor:
        """Run one scale's tokens (B, l, C) through every block, reading and extending ``cache``; return logits
        (B, l, V) in float32, or with ``hidden_only`` the last block's output for :meth:`logits`.
        ``cache.attend(layer, scale, q, k, v)`` gives the attention output (B, H, l, D)."""
        for i, block in enumerate(self.blocks):
            g1, g2, s1, s2, b1, b2 = block.modulation(block_cond)
            h = block.ln_wo_grad(x) * (s1 + 1) + b1
            q, k, v = block.attn.qkv(h)
            out = cache.attend(i, scale, q, k, v)  # (B, H, l, D)
            out = out.transpose(1, 2).reshape(x.shape)
            x = x + block.attn.proj(out) * g1
            x = x + self._ffn_in_slices(block, x, s2, b2) * g2
        return x if hidden_only else self.logits(x, cond)

    #: Above this many hidden-layer elements the FFN runs in slices of rows: at the last scale of a large batch
    #: its 4x-wide hidden layer (and GELU's copy of it) would otherwise outweigh a compressed KV cache.
    ffn_slice_elements: int = 2**30

    def _ffn_in_slices(self, block: AdaLNBlock, x: torch.Tensor, s2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        hidden = block.ffn.fc1.out_features
        rows = max(1, self.ffn_slice_elements // (x.shape[1] * hidden))
        if rows >= x.shape[0]:
            return block.ffn(block.ln_wo_grad(x) * (s2 + 1) + b2)
        out = torch.empty_like(x)
        for i in range(0, x.shape[0], rows):
            j = min(i + rows, x.shape[0])
            s2_i = s2[i:j] if s2.shape[0] > 1 else s2
            b2_i = b2[i:j] if b2.shape[0] > 1 else b2
            out[i:j] = block.ffn(block.ln_wo_grad(x[i:j]) * (s2_i + 1) + b2_i)
        return out

    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The output head: final adaptive norm and vocabulary projection, (B, l, C) → (B, l, V) float32."""
        scale_h, shift_h = self.head_nm.ada_lin(cond).view(-1, 1, 2, self.config.embed_dim).unbind(2)
        h = self.head_nm.ln_wo_grad(x.float()) * (scale_h.float() + 1) + shift_h.float()
        return self.head(h.to(self.head.weight.dtype)).float()
