"""The decoder half of Infinity's bitwise tokenizer (``infinity_vae_d32reg.pth``; BSQ-VAE, ``MultiScaleBSQ``).

Only what sampling needs: bits → codes and the multi-scale residual sum (:func:`bits_to_codes`,
:class:`BitwiseDecoder.add_scale`), and the convolutional decoder. The encoder (images → bits) is left out:
text-to-image sampling never encodes an image; its weights in the checkpoint are recognised and skipped.

Codes: each bit b becomes ``(2b - 1) / sqrt(d)`` (BSQ's codes lie on the unit sphere). A scale's codes are
upsampled (trilinear, as upstream, on a (B, d, 1, h, w) volume) to the final grid and summed; the next scale's
input is the running sum resized to that scale's grid. Parameter names follow the official ``flux_vqgan``
modules (``Conv`` and ``Normalize`` wrap ``.conv`` / ``.norm``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """Bits (B, h, w, d) in {0, 1} → codes (B, d, 1, h, w) on the unit sphere."""
    d = bits.shape[-1]
    scale = 1 / d**0.5
    codes = F.normalize(bits.float() * (2 * scale) - scale, dim=-1)  # the official l2norm of the +-scale codes
    # Channels stay innermost in memory, as upstream: trilinear resizing of this layout rounds like the official.
    return codes.unsqueeze(1).permute(0, 4, 1, 2, 3)


def resize_codes(codes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Trilinear resize of (B, d, 1, h, w) codes to (B, d, 1, *size) (the quantizer's ``z_interplote_up``)."""
    return F.interpolate(codes, size=(1, *size), mode="trilinear")


class _Conv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Norm(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        groups = 32 if channels % 32 == 0 else 24 if channels % 24 == 0 else 0
        if not groups:
            raise ValueError(f"{channels} channels: the official GroupNorm needs a multiple of 32 or 24")
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _Norm(cin), _Conv(cin, cout, 3, 1)
        self.norm2, self.conv2 = _Norm(cout), _Conv(cout, cout, 3, 1)
        if cin != cout:
            self.nin_shortcut = _Conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _Conv(channels, channels, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class BitwiseDecoder(nn.Module):
    """Codes (B, bits, h, w) → image (B, 3, 16h, 16w) in [-1, 1] (x8 for the 8B's tokenizer).

    ``ch_mult`` lists the channel multipliers from the image side; ``upsample`` which of those levels double
    the resolution (the official rule: levels 1..log2(patch)).

    Example:
        >>> import torch
        >>> vae = BitwiseDecoder(bits=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, upsample=(1,))
        >>> vae.decode(torch.zeros(1, 4, 3, 3)).shape
        torch.Size([1, 3, 6, 6])
    """

    def __init__(self, bits: int = 32, ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4),
                 num_res_blocks: int = 2, upsample: tuple[int, ...] = (1, 2, 3, 4)) -> None:
        super().__init__()
        self.bits = bits
        self.decoder = nn.Module()
        dec = self.decoder
        block_in = ch * ch_mult[-1]
        dec.conv_in = _Conv(bits, block_in, 3, 1)
        dec.mid = nn.Module()
        dec.mid.block_1 = _ResBlock(block_in, block_in)
        dec.mid.block_2 = _ResBlock(block_in, block_in)
        ups = []
        for level in reversed(range(len(ch_mult))):
            up = nn.Module()
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(_ResBlock(block_in, ch * ch_mult[level]))
                block_in = ch * ch_mult[level]
            up.block = nn.ModuleList(blocks)
            if level in upsample:
                up.upsample = _Upsample(block_in)
            ups.insert(0, up)
        dec.up = nn.ModuleList(ups)
        dec.norm_out = _Norm(block_in)
        dec.conv_out = _Conv(block_in, 3, 3, 1)

    @property
    def stride(self) -> int:
        return 2 ** sum(hasattr(up, "upsample") for up in self.decoder.up)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, bits, h, w) summed codes → (B, 3, H, W) in [-1, 1]."""
        dec = self.decoder
        h = dec.mid.block_2(dec.mid.block_1(dec.conv_in(codes)))
        for up in reversed(dec.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return dec.conv_out(F.silu(dec.norm_out(h))).clamp(-1, 1)
