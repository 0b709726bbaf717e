"""Where a rollout's noise comes from: genkv's per-chunk draws, or upstream Self-Forcing's order and shapes.

genkv latents are (B, C, T, h, w) (diffusers' video layout); upstream's are (B, T, C, h, w).
:func:`to_upstream_layout` and :func:`from_upstream_layout` move between the two (views, no copy).

``noise="chunk"`` (genkv's default): each chunk draws its initial noise (B, C, F, h, w) float32 when it starts,
and each re-noising step draws the same shape again.

``noise="upstream"``: the draws of upstream's ``inference.py`` + ``CausalInferencePipeline.inference``, call for
call: the whole video's initial noise first, as one ``torch.randn((B, T, C, h, w))`` in the model's dtype on its
device (upstream: bfloat16 on CUDA); then, for each chunk in order and between its denoising steps, one
``torch.randn_like(x0.flatten(0, 1))``: shape (B * F, C, h, w), the dtype of the predicted x0 (the model's),
same device. Upstream uses the global RNG (``set_seed(seed)`` = ``torch.manual_seed(seed)``), so with
``generator=None`` the global RNG is drawn from; a ``generator`` is consumed by exactly the same calls.
"""

from __future__ import annotations

import torch

#: the values of ``noise=`` (see the module docstring)
NOISE_MODES = ("chunk", "upstream")


def to_upstream_layout(latents: torch.Tensor) -> torch.Tensor:
    """genkv / diffusers latents (B, C, T, h, w) → upstream Self-Forcing's (B, T, C, h, w) (a view).

    Example:
        >>> to_upstream_layout(torch.zeros(1, 16, 3, 8, 10)).shape
        torch.Size([1, 3, 16, 8, 10])
    """
    if latents.dim() != 5:
        raise ValueError(f"expected 5-D latents (B, C, T, h, w), got shape {tuple(latents.shape)}")
    return latents.permute(0, 2, 1, 3, 4)


def from_upstream_layout(latents: torch.Tensor) -> torch.Tensor:
    """Upstream Self-Forcing latents (B, T, C, h, w) → genkv / diffusers (B, C, T, h, w) (a view), e.g. to pass
    upstream's recorded noise as ``latents=``.

    Example:
        >>> x = torch.randn(2, 16, 6, 4, 4)
        >>> torch.equal(from_upstream_layout(to_upstream_layout(x)), x)
        True
    """
    if latents.dim() != 5:
        raise ValueError(f"expected 5-D latents (B, T, C, h, w), got shape {tuple(latents.shape)}")
    return latents.permute(0, 2, 1, 3, 4)


class RolloutNoise:
    """The noise of one rollout, drawn in the order of ``mode`` (``"chunk"`` or ``"upstream"``).

    ``shape`` is the whole video's latent shape (B, C, T, h, w); ``dtype`` the model's (upstream draws in it);
    ``latents`` (B, C, T, h, w), if given, is the initial noise (nothing is drawn for it). Every tensor handed
    out is float32 in genkv's layout (a bfloat16 draw converts exactly).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> noise = RolloutNoise("upstream", (1, 16, 6, 4, 4), torch.float32, "cpu", g)
        >>> reference = torch.randn(1, 6, 16, 4, 4, generator=torch.Generator().manual_seed(0))
        >>> torch.equal(noise.initial(3, 3), from_upstream_layout(reference)[:, :, 3:6])
        True
    """

    def __init__(self, mode: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None) -> None:
        if mode not in NOISE_MODES:
            raise ValueError(f"noise must be one of {', '.join(map(repr, NOISE_MODES))}, got {mode!r}")
        self.mode, self.shape, self.dtype, self.device, self.generator = mode, tuple(shape), dtype, device, generator
        self._video = latents
        if latents is None and mode == "upstream":
            b, c, t, h, w = self.shape
            drawn = torch.randn((b, t, c, h, w), generator=generator, device=device, dtype=dtype)
            self._video = from_upstream_layout(drawn)

    def initial(self, start: int, frames: int) -> torch.Tensor:
        """The initial noise (B, C, frames, h, w) of the chunk starting at latent frame ``start``."""
        if self._video is not None:
            return self._video[:, :, start : start + frames].to(device=self.device, dtype=torch.float32).contiguous()
        return self._draw_chunk(frames)

    def renoise(self, frames: int) -> torch.Tensor:
        """Fresh noise (B, C, frames, h, w) for one re-noising step of a chunk of ``frames`` latent frames."""
        if self.mode == "chunk":
            return self._draw_chunk(frames)
        b, c, _, h, w = self.shape
        drawn = torch.randn((b * frames, c, h, w), generator=self.generator, device=self.device, dtype=self.dtype)
        return from_upstream_layout(drawn.unflatten(0, (b, frames))).float().contiguous()

    def _draw_chunk(self, frames: int) -> torch.Tensor:
        b, c, _, h, w = self.shape
        return torch.randn((b, c, frames, h, w), generator=self.generator, device=self.device, dtype=torch.float32)
