"""The Wan VAE decoder's "nearest 2x upsample, then 3x3 convolution" as one stride-2 transposed convolution.

``WanResample`` upsamples space with ``nearest-exact`` (after a round trip through float32) and convolves the 4x
larger image with a 3x3 kernel. Along each axis, output pixel ``2i + a`` of that convolution sees the low-resolution
pixels ``i - 1, i, i`` (``a = 0``) or ``i, i, i + 1`` (``a = 1``) through the kernel's taps ``0, 1, 2``; summing the
taps that land on the same pixel gives a 4-tap kernel ``[w2, w1 + w2, w0 + w1, w0]`` applied as a transposed
convolution with stride 2 and padding 1. So the upsampled image (and its float32 copy) is never built, and the
convolution does 16 multiply-adds per low-resolution pixel and channel pair instead of 36.

The result equals upsample-then-convolve up to the order of the sums (float64: ~1e-15 relative). In bf16 the
merged taps ``w1 + w2`` are rounded once more, the same size of change as any reordering of the decoder's sums.
(``WanUpsample`` itself rounds its input to float32, which is exact for the bf16 / fp16 / fp32 activations it is
given in practice; in float64 the reference below upsamples without that rounding.)

Example:
    >>> import torch
    >>> from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample
    >>> resample = WanResample(4, "upsample2d").double()
    >>> x = torch.randn(3, 4, 5, 6, dtype=torch.float64)  # frames folded into the batch, as WanResample does
    >>> reference = resample.resample[1](F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))
    >>> apply_transposed_upsample(resample)
    1
    >>> torch.allclose(resample.resample(x), reference, rtol=0, atol=1e-12), remove_transposed_upsample(resample)
    (True, 1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanUpsample

from .forward_patch import forward_option, patch_forward, unpatch_forward

# Which of the 3x3 kernel's taps (rows) land on each of the transposed kernel's 4 taps, along one axis.
_TAPS_BY_PHASE = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.float64)


def transposed_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 ``conv2d`` weight (out, in, 3, 3) → the 4x4 ``conv_transpose2d`` weight (in, out, 4, 4) that applies it
    to a nearest-2x-upsampled input; sums in float64, rounded once to ``weight.dtype``."""
    merge = _TAPS_BY_PHASE.to(weight.device)
    merged = torch.einsum("ui,vj,ocij->couv", merge, merge, weight.to(torch.float64))
    return merged.to(weight.dtype).contiguous()


def _eligible(module: torch.nn.Module) -> bool:
    if not (isinstance(module, torch.nn.Sequential) and len(module) == 2):
        return False
    upsample, conv = module[0], module[1]
    return (isinstance(upsample, WanUpsample) and upsample.mode == "nearest-exact"
            and tuple(float(s) for s in upsample.scale_factor) == (2.0, 2.0) and upsample.size is None
            and isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _upsample_by_transposed_conv(self: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``Sequential(WanUpsample(2x nearest-exact), Conv2d(3x3))`` as one ``conv_transpose2d`` (installed by
    :func:`apply_transposed_upsample`)."""
    conv = self[1]
    weight = conv.weight
    if forward_option(self, "channels_last", False):
        # After upsample3d's frame interleave (a torch.stack) the activation is channels-first, so cuDNN would copy
        # it to its own layout anyway; doing it here makes the output, and so every later layer, channels-last.
        x = x.contiguous(memory_format=torch.channels_last)
    # Made once per weight version, dtype and device: inference never changes it, and .to() makes a new tensor.
    key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
    cached = self.__dict__.get("_genkv_transposed_kernel")
    if cached is None or cached[0] != key:
        cached = (key, transposed_kernel(weight.detach()))
        self.__dict__["_genkv_transposed_kernel"] = cached
    return F.conv_transpose2d(x, cached[1].to(x.dtype), conv.bias.to(x.dtype) if conv.bias is not None else None,
                              stride=2, padding=1)


def apply_transposed_upsample(module: torch.nn.Module, channels_last: bool = False) -> int:
    """Compute every 2x nearest upsample + 3x3 convolution under ``module`` (the Wan decoder's ``WanResample``
    up-samplers) as one transposed convolution; returns how many. ``channels_last``: give them (and so the layers
    after them) channels-last inputs, as a channels-last decoder wants. :func:`remove_transposed_upsample` undoes it."""
    return patch_forward(module, _eligible, _upsample_by_transposed_conv, channels_last=channels_last)


def remove_transposed_upsample(module: torch.nn.Module) -> int:
    """Undo :func:`apply_transposed_upsample` under ``module``; returns how many were restored."""
    for child in module.modules():
        child.__dict__.pop("_genkv_transposed_kernel", None)
    return unpatch_forward(module, _upsample_by_transposed_conv)
