"""The Wan VAE decoder's residual blocks with their elementwise passes folded into their neighbours.

``WanResidualBlock`` runs norm, SiLU, conv, norm, SiLU, conv, then adds the shortcut. On a full-resolution
activation (96 channels x 12 frames x 480 x 832, bf16: 0.9 GB) each SiLU and the final add is one more read and
write of the whole tensor. :func:`apply_fused_blocks` computes the same block with

- each norm and its SiLU as one pass (``vae_norm.norm_silu``; compiled on CUDA when the norms are fused), and
- the shortcut added inside the second convolution's one-pass tap sum (``vae_conv``, ``fused_sum``),

keeping the block's causal cache exactly as diffusers does (the last ``CACHE_T`` activated frames before each conv).
Each fusion applies only where its pieces are patched (``apply_fused_norms``, ``apply_conv2d_taps(fused_sum=True)``);
elsewhere the block computes as the original. Output equals the original up to the order of roundings (float64: to
~1e-15).

Example (every decoder fusion on, through the streaming decoder, against the plain one in float64):
    >>> import torch
    >>> from genkv.pipelines import StreamingVAEDecoder
    >>> from genkv.testing import tiny_wan_vae
    >>> z = torch.randn(1, 16, 3, 4, 4, dtype=torch.float64)
    >>> plain = StreamingVAEDecoder(tiny_wan_vae().double()).decode(z)
    >>> fused = StreamingVAEDecoder(tiny_wan_vae().double(), conv2d_taps=True, fused_tap_sum=True, fused_norms=True,
    ...                             fused_blocks=True).decode(z)
    >>> torch.allclose(fused, plain, rtol=0, atol=1e-12)
    True
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import CACHE_T, WanResidualBlock

from .forward_patch import patch_forward, unpatch_forward
from .vae_conv import computed_by_taps
from .vae_norm import norm_silu


def _conv_with_cache(conv, x: torch.Tensor, feat_cache, feat_idx, residual: torch.Tensor | None = None):
    """One of the block's causal convs, reading and then updating its slot of the decoder's frame cache (as
    diffusers' block does); ``residual`` is added to its output (inside the tap sum when ``conv`` allows)."""
    if feat_cache is None:
        cached = None
    else:
        idx = feat_idx[0]
        cached = feat_cache[idx]
        cache_x = x[:, :, -CACHE_T:].clone()
        if cache_x.shape[2] < 2 and cached is not None:  # a 1-frame call: keep the last frame of the one before
            cache_x = torch.cat([cached[:, :, -1:].to(cache_x.device), cache_x], dim=2)
        feat_cache[idx] = cache_x
        feat_idx[0] += 1
    if computed_by_taps(conv):
        return conv(x, cached, residual=residual)
    out = conv(x, cached)
    return out if residual is None else out + residual


def _fused_block_forward(self: WanResidualBlock, x: torch.Tensor, feat_cache=None, feat_idx=[0]) -> torch.Tensor:  # noqa: B006 - diffusers' signature
    shortcut = self.conv_shortcut(x)
    x = norm_silu(self.norm1, x)
    x = _conv_with_cache(self.conv1, x, feat_cache, feat_idx)
    x = self.dropout(norm_silu(self.norm2, x))
    return _conv_with_cache(self.conv2, x, feat_cache, feat_idx, residual=shortcut)


def _eligible(module: torch.nn.Module) -> bool:
    return isinstance(module, WanResidualBlock) and isinstance(module.nonlinearity, torch.nn.SiLU)


def apply_fused_blocks(module: torch.nn.Module) -> int:
    """Compute every ``WanResidualBlock`` under ``module`` with its norm + SiLU pairs and its shortcut add fused
    where the norms / convolutions allow (see the module docstring); returns how many blocks.
    :func:`remove_fused_blocks` restores them."""
    return patch_forward(module, _eligible, _fused_block_forward)


def remove_fused_blocks(module: torch.nn.Module) -> int:
    """Undo :func:`apply_fused_blocks` under ``module``; returns how many blocks were restored."""
    return unpatch_forward(module, _fused_block_forward)
