"""VAR's multi-scale residual VQ-VAE (``vae_ch160v4096z32.pth``): an LDM-style conv encoder/decoder around a
codebook of 4096 x 32 whose scale maps are summed into ``f_hat``, each upsampled and refined by a ``Phi`` conv.

Parameter names follow the official checkpoint (``encoder.*``, ``decoder.*``, ``quantize.embedding``,
``quantize.quant_resi.qresi_ls.{i}``, ``quant_conv``, ``post_quant_conv``) so it loads with strict key checks.
Only what sampling needs is computed here: codebook lookup, the residual accumulation of ``f_hat`` and decoding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32 if channels % 32 == 0 else 1, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a fused 1x1 qkv conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, 3, c, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None],
                                             v.transpose(1, 2)[:, None])
        return x + self.proj_out(out[:, 0].transpose(1, 2).reshape(b, c, h, w))


class _Resample(nn.Module):
    def __init__(self, channels: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(channels, channels, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:  # asymmetric pad then a stride-2 conv, as the LDM encoders
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution of the encoder or decoder: ``block`` / ``attn`` lists and an optional resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        self.resample_name = name if resample is not None else None
        if resample is not None:
            setattr(self, name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return getattr(self, self.resample_name)(h) if self.resample_name else h


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        levels, block_in = [], ch
        for i, mult in enumerate(ch_mult):
            last = i == len(ch_mult) - 1
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
                if last:
                    attns.append(AttnBlock(block_in))
            levels.append(_Level(blocks, attns, None if last else _Resample(block_in, True), "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = _mid(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int) -> None:
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in)
        levels = [None] * len(ch_mult)
        for i in reversed(range(len(ch_mult))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[i]))
                block_in = ch * ch_mult[i]
                if i == len(ch_mult) - 1:
                    attns.append(AttnBlock(block_in))
            levels[i] = _Level(blocks, attns, _Resample(block_in, False) if i else None, "upsample")
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """``(1 - r) h + r conv(h)``: the refinement applied to each upsampled scale map before it joins ``f_hat``."""

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class _SharedPhis(nn.Module):
    """``share_quant_resi`` Phi convs spread over the scales; scale ``k`` of ``K`` uses the nearest tick."""

    def __init__(self, count: int, channels: int, ratio: float) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(channels, ratio) for _ in range(count)])
        margin = 1 / 3 / count if count == 4 else 1 / 2 / count
        # float64 numpy, as the checkpoints were trained with: some scales sit exactly between two ticks, and the
        # tie must break the same way (first minimum of the same rounded distances).
        self._ticks = np.linspace(margin, 1 - margin, count)

    def at(self, position: float) -> Phi:
        return self.qresi_ls[int(np.argmin(np.abs(self._ticks - position)))]


class Quantizer(nn.Module):
    def __init__(self, vocab_size: int, channels: int, patch_nums: tuple[int, ...], share_quant_resi: int,
                 quant_resi: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, channels)
        self.quant_resi = _SharedPhis(share_quant_resi, channels, quant_resi)
        # Usage statistics of VQ-VAE training; kept so the official state dict loads strictly, never read.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(patch_nums), vocab_size))


class MultiScaleVQVAE(nn.Module):
    """The VQ-VAE side of VAR (decode path used for sampling; the encoder is there for the checkpoint).

    Example:
        >>> import torch
        >>> vae = MultiScaleVQVAE(vocab_size=16, z_channels=4, ch=8, ch_mult=(1, 2), patch_nums=(1, 2))
        >>> f_hat = torch.zeros(1, 4, 2, 2)
        >>> h = vae.quantize.embedding(torch.tensor([[3]])).transpose(1, 2).view(1, 4, 1, 1)
        >>> f_hat, nxt = vae.add_scale(0, f_hat, h)
        >>> tuple(vae.decode_fhat(f_hat).shape)
        (1, 3, 4, 4)
    """

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160,
                 ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), share_quant_resi: int = 4,
                 quant_resi: float = 0.5) -> None:
        super().__init__()
        self.vocab_size, self.z_channels, self.patch_nums = vocab_size, z_channels, tuple(patch_nums)
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quantize = Quantizer(vocab_size, z_channels, self.patch_nums, share_quant_resi, quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, padding=1)
        self.downsample = 2 ** (len(ch_mult) - 1)

    def add_scale(self, index: int, f_hat: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale ``index``'s embedded map ``h`` (B, C, pn, pn) to ``f_hat`` (upsampled bicubically to the last
        scale, refined by its Phi); return ``f_hat`` and the next scale's input (``f_hat`` area-pooled)."""
        last = len(self.patch_nums) - 1
        side = self.patch_nums[-1]
        if index != last:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        f_hat = f_hat + self.quantize.quant_resi.at(index / max(last, 1))(h)
        if index == last:
            return f_hat, f_hat
        nxt = self.patch_nums[index + 1]
        return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")

    def decode_fhat(self, f_hat: torch.Tensor) -> torch.Tensor:
        """``f_hat`` → image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)
