"""``VARPipeline``: class-conditional next-scale image generation (VAR), diffusers style, with a pluggable KV
cache (``genkv.apply_genkv(pipe, "scalekv", budget=0.1)``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_var_transformer, load_vqvae
from .model import VARTransformer
from .vqvae import MultiScaleVQVAE


@dataclass
class VARPipelineOutput:
    """``images``: a list of PIL images (``output_type="pil"``) or an array (B, H, W, 3) in [0, 1] (``"np"``)."""

    images: Any


def sample_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float,
                       generator: torch.Generator | None) -> torch.Tensor:
    """One token per position from (B, l, V) logits, restricted to the top-k and the top-p nucleus."""
    logits = logits.clone()
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, -torch.inf)
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        drop_sorted = mass_before >= top_p  # keep the fewest tokens whose mass reaches top_p (always the best one)
        logits.masked_fill_(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), -torch.inf)
    # Inverse-CDF sampling: one uniform per position, drawn by ``generator`` on its own device and moved to the
    # logits' device. Same images for a seed whichever device the logits live on, and no (B*l, V)
    # probability table ever goes to the host: torch.multinomial with a CPU generator copied it there and sampled
    # on one core, which took most of VAR-d30's time per image at batch 32 on an H200.
    cdf = logits.softmax(-1).cumsum(-1)
    rows = cdf.shape[0] * cdf.shape[1]
    uniform = torch.rand(rows, generator=generator, device=generator.device if generator is not None else cdf.device)
    target = uniform.to(cdf.device).view(cdf.shape[:2] + (1,)) * cdf[..., -1:]
    # side="right": the first token whose cumulative mass exceeds the target, so a token of zero probability
    # (masked by top-k/top-p) is never picked; target < total mass keeps the index in range.
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


class VARPipeline:
    """VAR sampling: class-conditional, classifier-free guidance with VAR's linear ramp over scales.

    Example:
        >>> import torch
        >>> from genkv.testing import tiny_var_pipeline
        >>> pipe = tiny_var_pipeline()
        >>> out = pipe(class_labels=[1, 2], guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
        ...            output_type="np")
        >>> out.images.shape
        (2, 16, 16, 3)
    """

    def __init__(self, transformer: VARTransformer, vqvae: MultiScaleVQVAE) -> None:
        self.transformer, self.vqvae = transformer, vqvae
        self.kv_method = None  # set by genkv.apply_genkv; None = full cache
        self.last_cache = None
        self.decode_batch = 8  # images decoded at once
        self.sample_batch = 64  # images whose logits are formed and sampled at once

    @classmethod
    def from_pretrained(cls, path: str | Path, vae: str | Path, *, torch_dtype: torch.dtype | None = None,
                        dtype: torch.dtype | None = None) -> "VARPipeline":
        """Load the official ``var_d*.pth`` and ``vae_ch160v4096z32.pth`` (strict key checks, clear errors)."""
        transformer = load_var_transformer(path)
        vqvae = load_vqvae(vae, transformer.config.patch_nums)
        pipe = cls(transformer, vqvae)
        dtype = dtype or torch_dtype
        return pipe.to(dtype=dtype) if dtype is not None else pipe

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "VARPipeline":
        self.transformer.to(device=device, dtype=dtype)
        self.vqvae.to(device=device)  # the VQ-VAE decodes in float32
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def new_cache(self):
        from genkv.scales.cache import FullScaleCache

        config = self.transformer.config
        if self.kv_method is None:
            return FullScaleCache(config.depth, tuple(config.patch_nums))
        return self.kv_method.build_scale_cache(config.depth, tuple(config.patch_nums), config.num_heads)

    def _check_labels(self, class_labels) -> torch.Tensor:
        n = self.transformer.config.num_classes
        labels = torch.as_tensor(list(class_labels) if not torch.is_tensor(class_labels) else class_labels)
        if labels.dim() != 1 or labels.numel() == 0 or labels.dtype.is_floating_point:
            raise ValueError("class_labels must be a non-empty list of integer class ids")
        bad = [int(x) for x in labels if not 0 <= int(x) < n]
        if bad:
            raise ValueError(f"unknown class label {bad[0]}: this model has classes 0..{n - 1}")
        return labels.long()

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale: float = 4.0, top_k: int = 900, top_p: float = 0.95,
                 generator: torch.Generator | None = None, output_type: str = "pil",
                 kv_cache=None) -> VARPipelineOutput:
        """Generate one image per class label. ``kv_cache`` overrides the cache policy for this call."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        model, vae = self.transformer, self.vqvae
        config = model.config
        device, dtype = self.device, next(model.parameters()).dtype
        labels = self._check_labels(class_labels).to(device)
        b = labels.shape[0]
        both = torch.cat([labels, torch.full_like(labels, config.num_classes)])  # cond rows, then uncond rows
        cond, block_cond = model.condition(both)
        positions = model.level_positions()
        x = model.first_tokens(cond)
        cache = kv_cache if kv_cache is not None else self.new_cache()
        cache.reset()
        f_hat = torch.zeros(b, config.z_channels, config.patch_nums[-1], config.patch_nums[-1], device=device)
        bounds = config.scale_bounds()
        last = len(config.patch_nums) - 1
        for s, side in enumerate(config.patch_nums):
            hidden = model.forward_scale(x.to(dtype), cond, block_cond, s, cache, hidden_only=True)
            t = guidance_scale * s / max(last, 1)  # VAR's guidance ramp: none at the first scale
            # Head and sampling in slices of images: at large batches the float32 (2B, l, 4096) logits and the
            # sampler's copies of them, not the KV cache, would bound the batch.
            tokens = []
            for i in range(0, b, self.sample_batch):
                rows = slice(i, min(i + self.sample_batch, b))
                cond_logits = model.logits(hidden[rows], cond[rows])
                uncond_logits = model.logits(hidden[b:][rows], cond[b:][rows])
                guided = (1 + t) * cond_logits - t * uncond_logits
                tokens.append(sample_top_k_top_p(guided, top_k, top_p, generator))
            tokens = torch.cat(tokens)
            h = vae.quantize.embedding(tokens).transpose(1, 2).reshape(b, config.z_channels, side, side)
            f_hat, nxt = vae.add_scale(s, f_hat, h.float())
            if s < last:
                start, end = bounds[s + 1]
                x = model.word_embed(nxt.flatten(2).transpose(1, 2).to(dtype)) + positions[:, start:end]
                x = x.repeat(2, 1, 1)
        self.last_cache = cache
        # Decode in slices: at 512px the VQ-VAE decoder's activations, not the KV cache, would bound the batch.
        images = torch.cat([(vae.decode_fhat(part) + 1) / 2 for part in f_hat.split(self.decode_batch)])
        if output_type == "pt":
            return VARPipelineOutput(images)
        array = images.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "np":
            return VARPipelineOutput(array)
        from PIL import Image

        return VARPipelineOutput([Image.fromarray((a * 255).round().astype(np.uint8)) for a in array])
