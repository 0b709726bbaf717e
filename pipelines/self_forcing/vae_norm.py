"""The Wan VAE decoder's RMS norms as one fused pass (compiled on CUDA).

``WanRMS_norm`` computes ``F.normalize(x.float()).to(dtype) * scale * gamma + bias``: on a bf16 full-resolution
activation (96 channels x 12 frames x 480 x 832) that is an fp32 copy, a norm, a divide, a cast and three more
elementwise passes, ~35 ms of a 206 ms chunk decode on an H200, all memory-bound. :func:`rms_norm` is the same
arithmetic written for ``torch.compile`` to fuse into one reduction and one write, in float32 with a single
rounding to the input dtype at the end (diffusers rounds twice: after the normalisation and after the affine),
so the output equals the original to bf16 rounding and is exact in float64.

Example (one norm of a decoder, patched in place and restored):
    >>> import torch
    >>> norm = WanRMS_norm(8, images=False).double()
    >>> x = torch.randn(2, 8, 3, 4, 4, dtype=torch.float64)
    >>> plain = norm(x)
    >>> apply_fused_norms(norm), torch.allclose(norm(x), plain, rtol=0, atol=1e-13), remove_fused_norms(norm)
    (1, True, 1)
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

from genkv.compile import CompiledOnCuda

from .forward_patch import is_patched, patch_forward, unpatch_forward


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | float, scale: float, dim: int) -> torch.Tensor:
    """``x / max(||x||_2 over dim, 1e-12) * scale * gamma + bias`` in float32 (or x's dtype when wider),
    rounded once to ``x.dtype``."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    inv_norm = torch.rsqrt((xf * xf).sum(dim=dim, keepdim=True).clamp_min(1e-24))  # F.normalize's eps, squared
    out = xf * inv_norm * (scale * gamma.to(compute))
    if isinstance(bias, torch.Tensor):
        out = out + bias.to(compute)
    elif bias:
        out = out + bias
    return out.to(x.dtype)


# One graph per (resolution, layout) the decoder feeds it: channels-first and channels-last activations at four
# resolutions, first and later chunks; dynamo's default limit (8) would quietly fall back to eager.
_rms_norm_fused = CompiledOnCuda(rms_norm, "VAE fused norms", recompile_limit=64)


def rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | float, scale: float,
                  dim: int) -> torch.Tensor:
    """``silu(rms_norm(...))`` in float32 with one rounding: a residual block's norm and activation as one pass."""
    compute = torch.promote_types(x.dtype, torch.float32)
    return torch.nn.functional.silu(rms_norm(x.to(compute), gamma, bias, scale, dim)).to(x.dtype)


_rms_norm_silu_fused = CompiledOnCuda(rms_norm_silu, "VAE fused norm + SiLU", recompile_limit=64)


def _norm_args(norm: WanRMS_norm) -> tuple:
    """A ``WanRMS_norm``'s parameters as :func:`rms_norm` takes them (after x)."""
    return norm.gamma, norm.bias, norm.scale, 1 if norm.channel_first else -1


def norm_silu(norm: WanRMS_norm, x: torch.Tensor) -> torch.Tensor:
    """``silu(norm(x))``: one fused pass when ``norm`` carries :func:`apply_fused_norms`, else the two modules'."""
    if is_patched(norm, _fused_forward):
        return _rms_norm_silu_fused(x, *_norm_args(norm))
    return torch.nn.functional.silu(norm(x))


def _fused_forward(self: WanRMS_norm, x: torch.Tensor) -> torch.Tensor:
    return _rms_norm_fused(x, *_norm_args(self))


def apply_fused_norms(module: torch.nn.Module) -> int:
    """Compute every ``WanRMS_norm`` under ``module`` with :func:`rms_norm`; returns how many.

    Parameters are untouched; :func:`remove_fused_norms` restores the original forward.
    """
    return patch_forward(module, lambda child: isinstance(child, WanRMS_norm), _fused_forward)


def remove_fused_norms(module: torch.nn.Module) -> int:
    """Undo :func:`apply_fused_norms` under ``module``; returns how many norms were restored."""
    return unpatch_forward(module, _fused_forward)
