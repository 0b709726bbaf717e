"""The Wan VAE's causal 3-D convolutions computed as sums of 2-D convolutions, one per temporal tap.

A causal ``k_t x k_h x k_w`` convolution over frames ``t - k_t + 1 .. t`` is the sum over the temporal taps ``j``
of a 2-D ``k_h x k_w`` convolution of frame ``t - k_t + 1 + j`` with the weight slice ``W[:, :, j]``. Each tap is
one ``conv2d`` over all output frames at once (frames folded into the batch), so the decoder runs on cuDNN's 2-D
kernels, which are tuned far more than its 3-D ones. With channels-last-3d activations (``NDHWC``) folding the
frames into the batch and unfolding them again are views, not copies.

The result equals ``WanCausalConv3d`` up to the order of the sum (float64: ~1e-15 relative): same padding rules
(cached frames first, then zeros), same bias. Convolutions strided or dilated in time keep their own forward.

With ``fused_sum=True`` the taps are convolved without bias and summed with the bias in one pass
(``genkv.kernels.tap_sum``: float32 accumulation, one rounding) instead of an ``add_`` per tap plus cuDNN's separate
bias add: each of those is a full read-modify-write of the activation.

Example:
    >>> import torch
    >>> from genkv.testing import tiny_wan_vae
    >>> vae = tiny_wan_vae().double()
    >>> z = torch.randn(1, 16, 3, 4, 4, dtype=torch.float64)
    >>> reference = vae.decode(z).sample
    >>> patched = apply_conv2d_taps(vae.decoder)
    >>> torch.allclose(vae.decode(z).sample, reference, rtol=0, atol=1e-12)
    True
    >>> remove_conv2d_taps(vae.decoder) == patched
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from genkv.kernels.tap_sum import same_layout, sum_partials

from .forward_patch import forward_option, is_patched, patch_forward, unpatch_forward


def _causal_conv_by_taps(self: WanCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None = None,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
    """``WanCausalConv3d.forward`` as ``k_t`` frame-batched ``conv2d`` calls (installed by :func:`apply_conv2d_taps`);
    ``residual`` (the output's shape) is added to the result, in the taps' one-pass sum where it can be."""
    front = self._padding[4]  # zero frames in front, before any cached ones are used
    if cache_x is not None and front > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        front -= cache_x.shape[2]
    if front != 0:  # as F.pad in the original: zeros in front (or, negative, a crop)
        x = F.pad(x, (0, 0, 0, 0, front, 0))
    taps = self.kernel_size[0]
    batch, channels, frames, height, width = x.shape
    out_frames = frames - taps + 1
    # (B, C, T, H, W) -> (B, T, C, H, W): with channels-last-3d strides the (B*T, C, H, W) fold below is a view.
    by_frame = x.transpose(1, 2)
    padding = (self._padding[2], self._padding[0])  # (h, w): symmetric zero padding, as the original's F.pad
    fused = forward_option(self, "fused_sum", False) and (taps > 1 or residual is not None)
    out = None
    partials = []
    for j in range(taps):
        frames_j = by_frame[:, j : j + out_frames].reshape(batch * out_frames, channels, height, width)
        bias = self.bias if j == 0 and not fused else None
        y = F.conv2d(frames_j, self.weight[:, :, j], bias, stride=self.stride[1:], padding=padding)
        if fused:
            partials.append(y)
        else:
            out = y if out is None else out.add_(y)
    if fused:
        folded = _folded_like(residual, partials[0]) if residual is not None else None
        if folded is not None:
            partials.append(folded)
            residual = None
        out = sum_partials(partials, self.bias)
    out = out.view(batch, out_frames, *out.shape[1:]).transpose(1, 2)
    return out if residual is None else out + residual


def _folded_like(residual: torch.Tensor, partial: torch.Tensor) -> torch.Tensor | None:
    """``residual`` (B, C, T, H, W) as a (B*T, C, H, W) view laid out exactly as ``partial``, or None."""
    folded = residual.transpose(1, 2)
    try:
        folded = folded.view(-1, *folded.shape[2:])
    except RuntimeError:  # not foldable without a copy
        return None
    return folded if same_layout(folded, partial) else None


def _convertible(module: torch.nn.Module) -> bool:
    return (isinstance(module, WanCausalConv3d) and module.stride[0] == 1 and module.dilation == (1, 1, 1)
            and module.groups == 1 and module._padding[0] == module._padding[1]
            and module._padding[2] == module._padding[3] and module._padding[5] == 0)


def apply_conv2d_taps(module: torch.nn.Module, fused_sum: bool = False) -> int:
    """Compute every eligible ``WanCausalConv3d`` under ``module`` as per-tap ``conv2d`` calls; returns how many.

    ``fused_sum``: add the taps and the bias in one pass (float32, one rounding) rather than one ``add_`` each.
    Weights are untouched (they stay the checkpoint's); :func:`remove_conv2d_taps` restores the original forward.
    """
    return patch_forward(module, _convertible, _causal_conv_by_taps, fused_sum=fused_sum)


def computed_by_taps(conv: torch.nn.Module) -> bool:
    """Whether ``conv`` runs as per-tap ``conv2d`` calls (:func:`apply_conv2d_taps`), whose forward also takes a
    ``residual`` to add."""
    return is_patched(conv, _causal_conv_by_taps)


def remove_conv2d_taps(module: torch.nn.Module) -> int:
    """Undo :func:`apply_conv2d_taps` under ``module``; returns how many convolutions were restored."""
    return unpatch_forward(module, _causal_conv_by_taps)
