"""Infinity's text-to-image next-scale transformer (``infinity_2b_reg.pth``, the 8B), written for genkv with the
official parameter names, and with its self-attention KV cache factored out so genkv methods can budget it.

A block is AdaLN-conditioned through one shared projection of the pooled prompt (``shared_ada_lin``) plus a
per-block learned offset (``ada_gss``); self-attention is cosine attention (q and k l2-normalised, q times a
learned per-head ``scale_mul`` clamped at log 100, attention scale 1) with 2D RoPE; then cross-attention to the
T5 tokens (not cached: the text's keys and values are computed once per generation) and an FFN. Each scale's
tokens attend to every earlier scale's tokens through the cache given to :meth:`InfinityTransformer.forward_scale`.
The head predicts two logits per bit of the bitwise (BSQ) tokenizer's code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from genkv.pipelines.var.model import FFN, SelfAttention

from .rope import apply_rope
from .text import CrossAttention, RMSNorm, TextAttentivePool, pool_heads


@dataclass
class InfinityConfig:
    depth: int = 32
    embed_dim: int = 2048
    num_heads: int = 16
    text_channels: int = 2048  # flan-t5-xl
    text_maxlen: int = 512  # rows of the learned unconditional text (cfg_uncond)
    bits: int = 32  # inputs per token: the VAE's code bits (x4 with spatial patchify, the 8B)
    mlp_hidden: int = 8192
    block_chunks: int = 8  # the official checkpoints group blocks as block_chunks.{i}.module.{j}
    pool_heads: int | None = None  # heads of the text pool; None = the official rule
    add_lvl_embed_only_first_block: bool = True  # the released models' setting
    rope_normalized: bool = True  # rope2d_normalized_by_hw=2 (the released models); False = 0
    norm_eps: float = 1e-6
    num_levels: int = 15  # rows of lvl_embed

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def vocab_size(self) -> int:
        return 2 * self.bits  # two logits per bit


class CrossAttnBlock(nn.Module):
    def __init__(self, config: InfinityConfig) -> None:
        super().__init__()
        c = config.embed_dim
        self.sa = SelfAttention(c, config.num_heads)
        self.ca = CrossAttention(c, c, config.num_heads)
        self.ffn = FFN(c, config.mlp_hidden)
        self.ln_wo_grad = nn.LayerNorm(c, eps=config.norm_eps, elementwise_affine=False)
        self.ca_norm = nn.LayerNorm(c, eps=config.norm_eps)
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, c))

    def adaln(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.ln_wo_grad(x) * (scale + 1) + shift


class _Chunk(nn.Module):
    """The official ``MultipleLayers``: a group of blocks (only the names matter here)."""

    def __init__(self, blocks: list[CrossAttnBlock]) -> None:
        super().__init__()
        self.module = nn.ModuleList(blocks)


class InfinityTransformer(nn.Module):
    """The text-conditional next-scale predictor (see the module docstring).

    Example:
        >>> model = InfinityTransformer(InfinityConfig(depth=2, embed_dim=64, num_heads=2, text_channels=128,
        ...                                            text_maxlen=16, bits=4, mlp_hidden=128, block_chunks=2))
        >>> sorted(model.state_dict())[:2]
        ['block_chunks.0.module.0.ada_gss', 'block_chunks.0.module.0.ca.mat_kv.weight']
    """

    def __init__(self, config: InfinityConfig) -> None:
        super().__init__()
        if config.depth % config.block_chunks:
            raise ValueError(f"depth {config.depth} is not a multiple of block_chunks {config.block_chunks}")
        self.config = config
        c, t = config.embed_dim, config.text_channels
        self.cfg_uncond = nn.Parameter(torch.zeros(config.text_maxlen, t))
        self.text_norm = RMSNorm(t, config.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(c, t, config.pool_heads or pool_heads(c, t))
        self.text_proj_for_ca = nn.Sequential(nn.Linear(t, c), nn.GELU(approximate="tanh"), nn.Linear(c, c))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.lvl_embed = nn.Embedding(config.num_levels, c)
        self.word_embed = nn.Linear(config.bits, c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        blocks = [CrossAttnBlock(config) for _ in range(config.depth)]
        if config.block_chunks > 1:
            per = config.depth // config.block_chunks
            self.block_chunks = nn.ModuleList(_Chunk(blocks[i : i + per]) for i in range(0, config.depth, per))
        else:
            self.blocks = nn.ModuleList(blocks)
        self.head_nm = nn.Module()
        self.head_nm.ln_wo_grad = nn.LayerNorm(c, eps=config.norm_eps, elementwise_affine=False)
        self.head_nm.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))
        self.head = nn.Linear(c, config.vocab_size)

    @property
    def layers(self) -> list[CrossAttnBlock]:
        """The blocks in order, whichever way the checkpoint groups them."""
        if self.config.block_chunks > 1:
            return [b for chunk in self.block_chunks for b in chunk.module]
        return list(self.blocks)

    def init_random(self, generator: torch.Generator | None = None, std: float = 0.02) -> "InfinityTransformer":
        """Random weights for tests and benchmarks (normal matrices, zero vectors, temperatures at log 4)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("scale_mul_1H11"):
                    p.fill_(torch.tensor(4.0).log().item())
                elif p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=generator) * std)
                elif name.endswith("weight"):  # norms
                    p.fill_(1.0)
                else:
                    p.zero_()
        return self

    # -- text -----------------------------------------------------------------------------------------------

    def encode_text(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list, torch.Tensor]:
        """T5 features (B, L, text_channels) and their mask → the pooled condition (B, C), every block's
        cross-attention keys/values, and the start tokens (B, 1, C) before the level embedding. The text
        layers run on the packed real tokens only (the official varlen layout)."""
        text = self.text_norm(features[mask])
        cond = self.text_proj_for_sos(text, mask)
        projected = self.text_proj_for_ca(text)
        kv = [block.ca.text_kv(projected, mask) for block in self.layers]
        start = cond.unsqueeze(1) + self.pos_start
        return cond, kv, start

    def unconditional_text(self, mask: torch.Tensor) -> torch.Tensor:
        """The learned unconditional features in place of each prompt, same lengths (official CFG)."""
        n = mask.shape[1]
        if n > self.cfg_uncond.shape[0]:
            raise ValueError(f"prompts of {n} tokens are longer than this model's {self.cfg_uncond.shape[0]}")
        return self.cfg_uncond[:n].unsqueeze(0).expand(mask.shape[0], -1, -1)

    @property
    def wide_dtype(self) -> torch.dtype:
        """Residual stream and norms: float32, or the weights' dtype when wider (a float64 reference model)."""
        return torch.promote_types(self.head.weight.dtype, torch.float32)

    def block_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The shared AdaLN projection (B, 1, 6, C), in :attr:`wide_dtype`."""
        gss = self.shared_ada_lin(cond.to(self.head.weight.dtype))
        return gss.view(-1, 1, 6, self.config.embed_dim).to(self.wide_dtype)

    # -- one scale -------------------------------------------------------------------------------------------

    def level(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        return x + self.lvl_embed.weight[scale].to(x.dtype)

    def forward_scale(self, x: torch.Tensor, gss: torch.Tensor, text_kv: list, text_mask: torch.Tensor,
                      scale: int, rope: tuple[torch.Tensor, torch.Tensor], cache,
                      mix: tuple[int, float] | None = None) -> torch.Tensor:
        """Run one scale's tokens (B, l, C) through every block, reading and extending ``cache``; return the last
        block's output. ``cache.attend(layer, scale, q, k, v)`` gives the self-attention output (B, H, l, D);
        q and k arrive normalised, scaled and rotated. ``mix=(layer, cfg)``: after that block, the first half of
        the batch becomes ``cfg * cond + (1 - cfg) * uncond`` for both halves (the official negative
        ``cfg_insertion_layer``)."""
        config = self.config
        per_chunk = config.depth // config.block_chunks
        cos, sin = (t.to(x.device) for t in rope)
        dtype, wide = self.head.weight.dtype, self.wide_dtype
        x = x.to(wide)  # the residual stream stays float32, as upstream (its blocks run in bf16 under autocast)
        for i, block in enumerate(self.layers):
            if i == 0 or (not config.add_lvl_embed_only_first_block and i % per_chunk == 0):
                x = self.level(x, scale)
            g1, g2, s1, s2, b1, b2 = (block.ada_gss + gss).to(wide).unbind(2)
            q, k, v = block.sa.qkv(block.adaln(x, s1, b1).to(dtype))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            # contiguous v, as upstream: the CPU attention kernel gives other last bits on a strided v
            out = cache.attend(i, scale, q, k, v.contiguous()).transpose(1, 2).flatten(2)
            x = x + block.sa.proj(out).to(wide) * g1
            x = x + block.ca(block.ca_norm(x.to(dtype)), text_kv[i], text_mask).to(wide)
            x = x + block.ffn(block.adaln(x, s2, b2).to(dtype)).to(wide) * g2
            if mix is not None and mix[0] == i:
                half = x.shape[0] // 2
                mixed = mix[1] * x[:half] + (1 - mix[1]) * x[half:]
                x = torch.cat([mixed, mixed])
        return x

    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The output head: final adaptive norm and bit projection, (B, l, C) → (B, l, 2 * bits) float32 (or
        :attr:`wide_dtype`)."""
        wide = self.wide_dtype
        scale, shift = self.head_nm.ada_lin(cond.to(self.head.weight.dtype)).to(wide).view(
            -1, 1, 2, self.config.embed_dim).unbind(2)
        h = self.head_nm.ln_wo_grad(x.to(wide)) * (scale + 1) + shift
        return self.head(h.to(self.head.weight.dtype)).to(wide)
