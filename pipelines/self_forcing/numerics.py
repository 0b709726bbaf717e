"""Numerics of upstream Self-Forcing's ``CausalWanModel`` on diffusers' ``WanTransformer3DModel``.

Two layers compute differently upstream, and bf16 outputs drift visibly without them (latent differences of
~3.9 are reported for plain bf16 RMSNorm): the q/k RMSNorm normalises in float32 then casts before the weight,
and the sinusoidal timestep embedding is computed in float64. Both are swapped in by changing the module's
class in place: parameters, state-dict names and devices stay as they are, and float32 models are unaffected
up to rounding.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import Timesteps


class UpcastRMSNorm(torch.nn.RMSNorm):
    """RMSNorm as upstream Wan computes it: ``norm(x.float()).type_as(x) * weight``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        normed = normed.type_as(x)
        return normed * self.weight if self.weight is not None else normed


class Float64Timesteps(Timesteps):
    """Sinusoidal timestep embedding (``[cos, sin]``, max period 1e4) computed in float64, returned as float32."""

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        position = timesteps.to(torch.float64)
        freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timesteps.device).div(half))
        angles = torch.outer(position, freqs)
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def apply_self_forcing_numerics(transformer: torch.nn.Module) -> torch.nn.Module:
    """Give a ``WanTransformer3DModel`` upstream Self-Forcing's RMSNorm and timestep-embedding numerics."""
    for module in transformer.modules():
        if type(module) is torch.nn.RMSNorm:
            module.__class__ = UpcastRMSNorm
        elif type(module) is Timesteps and module.flip_sin_to_cos and module.downscale_freq_shift == 0:
            module.__class__ = Float64Timesteps
    return transformer
