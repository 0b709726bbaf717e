"""The Wan VAE decoder's RMS norms as one fused pass (compiled on CUDA).

``WanRMS_norm`` computes ``F.normalize(x.float()).to(dtype) * scale * gamma + bias``: on a bf16 full-resolution
activation (96 channels x 12 frames x 480 x 832) that is an fp32 copy, a norm, a divide, a cast and three more
elementwise passes, ~35 ms of a 206 ms chunk decode on an H200, all memory-bound. :func:`rms_norm` is the same
arithmetic written for ``torch.compile`` to fuse into one reduction and one write, in float32 with a single
rounding to the input dtype at the end (diffusers rounds twice: after the normalisation and after the affine),
so the output equals the original to bf16 rounding and is exact in float64.

Example:
    >>> import torch
    >>> from genkv.testing import tiny_wan_vae
    >>> vae = tiny_wan_vae().double()
    >>> z = torch.randn(1, 16, 3, 4, 4, dtype=torch.float64)
    >>> reference = vae.decode(z).sample
    >>> patched = apply_fused_norms(vae.decoder)
    >>> torch.allclose(vae.decode(z).sample, reference, rtol=0, atol=1e-12)
    True
    >>> remove_fused_norms(vae.decoder) == patched
    True
"""

from __future__ import annotations

import warnings

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

from .forward_patch import patch_forward, unpatch_forward


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


_COMPILED: dict[str, object] = {}


def _norm_function(device: torch.device):
    """:func:`rms_norm`, compiled on CUDA (one fused kernel per shape); eager elsewhere or if compiling fails."""
    if device.type != "cuda" or _COMPILED.get("failed"):
        return rms_norm
    if "fn" not in _COMPILED:
        # One graph per (resolution, layout) the decoder feeds it: channels-first and channels-last activations
        # at four resolutions, first and later chunks; dynamo's default limit (8) would fall back to eager.
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), 64))
        _COMPILED["fn"] = torch.compile(rms_norm, dynamic=True)
    return _COMPILED["fn"]


def _fused_forward(self: WanRMS_norm, x: torch.Tensor) -> torch.Tensor:
    dim = 1 if self.channel_first else -1
    fn = _norm_function(x.device)
    if fn is rms_norm:
        return rms_norm(x, self.gamma, self.bias, self.scale, dim)
    try:
        return fn(x, self.gamma, self.bias, self.scale, dim)
    except Exception as error:  # noqa: BLE001 - any compiler failure: the eager function computes the same
        warnings.warn(f"VAE fused norms: compiling failed ({error!r:.200}); running them eagerly", stacklevel=2)
        _COMPILED["failed"] = True
        return rms_norm(x, self.gamma, self.bias, self.scale, dim)


def apply_fused_norms(module: torch.nn.Module) -> int:
    """Compute every ``WanRMS_norm`` under ``module`` with :func:`rms_norm`; returns how many.

    Parameters are untouched; :func:`remove_fused_norms` restores the original forward.
    """
    return patch_forward(module, lambda child: isinstance(child, WanRMS_norm), _fused_forward)


def remove_fused_norms(module: torch.nn.Module) -> int:
    """Undo :func:`apply_fused_norms` under ``module``; returns how many norms were restored."""
    return unpatch_forward(module, _fused_forward)
