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


SAMPLERS = ("fast", "official")


def mask_top_k_top_p_(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf, in place, every logit of (..., V) outside the top-k and then outside the top-p nucleus.

    The arithmetic is the official VAR code's (``models/helpers.py``): the nucleus is cut on probabilities sorted in
    ascending order, dropping the tail whose cumulative mass is at most ``1 - top_p``, so the masks (and what the
    official sampler draws from them) are the same to the bit; ``top_p >= 1`` drops only zero-probability tokens.
    ``top_k`` above the vocabulary keeps everything (the official code raises there).

    Example:
        >>> import torch
        >>> mask_top_k_top_p_(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), top_k=3, top_p=0.7)
        tensor([[-inf, 3., -inf, 2.]])
    """
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1, sorted=False).values.amin(-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        ascending, order = logits.sort(dim=-1)
        tail = ascending.softmax(-1).cumsum_(-1) <= 1 - top_p
        tail[..., -1:] = False  # the most likely token always stays
        logits.masked_fill_(torch.zeros_like(tail).scatter_(-1, order, tail), -torch.inf)
    return logits


def sample_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float,
                       generator: torch.Generator | None) -> torch.Tensor:
    """One token per position from (B, l, V) logits, restricted to the top-k and the top-p nucleus
    (``sampler="fast"``: one uniform per position, drawn on the generator's device)."""
    return inverse_cdf_draw(mask_top_k_top_p_(logits.clone(), top_k, top_p), generator)


def inverse_cdf_draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, l, V) logits → (B, l) tokens by inverting each position's CDF at one uniform."""
    # The uniforms come from ``generator`` on its own device and move to the logits' device: same images for a
    # seed whichever device the logits live on, and no (B*l, V) probability table ever goes to the host:
    # torch.multinomial with a CPU generator copied it there and sampled on one core, which took most of
    # VAR-d30's time per image at batch 32 on an H200.
    cdf = logits.softmax(-1).cumsum(-1)
    uniform = _uniform(cdf.shape[0] * cdf.shape[1], generator, cdf.device)
    target = uniform.view(cdf.shape[:2] + (1,)) * cdf[..., -1:]
    # side="right": the first token whose cumulative mass exceeds the target, so a token of zero probability
    # (masked by top-k/top-p) is never picked; target < total mass keeps the index in range.
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def _uniform(shape: int | tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    draw_on = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_on).to(device)


def multinomial_draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, l, V) logits → (B, l) tokens with one ``torch.multinomial`` call over all B*l rows, as the official
    ``sample_with_top_k_top_p_`` does (``sampler="official"``): the same tensor shape, so the same random numbers.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[0.0, -torch.inf, 2.0], [-torch.inf, 1.0, -torch.inf]]])
        >>> multinomial_draw(logits, torch.Generator().manual_seed(0))[0, 1].item()
        1
    """
    vocab = logits.shape[-1]
    rows = logits.softmax(-1).view(-1, vocab)
    return torch.multinomial(rows, num_samples=1, replacement=True, generator=generator).view(logits.shape[:2])


def gumbel_temperature(ratio: float) -> float:
    """``more_smooth``'s softmax temperature at scale position ``ratio`` = s / (scales - 1) (official formula).

    Example:
        >>> round(gumbel_temperature(0.0), 4), round(gumbel_temperature(1.0), 4)
        (0.27, 0.0135)
    """
    return max(0.27 * (1 - 0.95 * ratio), 0.005)


def smooth_embedding(logits: torch.Tensor, ratio: float, codebook: torch.Tensor,
                     gumbel: torch.Tensor) -> torch.Tensor:
    """``more_smooth``: instead of one code per position, the codebook (V, C) mixed by a Gumbel-softmax of the
    masked guided logits (B, l, V) sharpened by ``1 + ratio``; ``gumbel`` is the noise, (B, l, V)."""
    weights = ((logits * (1 + ratio) + gumbel) / gumbel_temperature(ratio)).softmax(-1)
    # Detached as the official VQ-VAE's frozen weights are: torch.matmul folds (B, l) into one matrix product only
    # for operands that do not require grad (even under no_grad), and the two paths round differently.
    return weights @ codebook.detach().unsqueeze(0)


def official_gumbel(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel noise shaped like ``logits``, drawn as the official code draws it (exponentials on the logits' device,
    after the token draw of the same scale)."""
    return -torch.empty_like(logits).exponential_(generator=generator).log()


def fast_gumbel(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel noise from uniforms on the generator's device (``sampler="fast"``: device-independent)."""
    uniform = _uniform(logits.shape, generator, logits.device)
    return -(-uniform.clamp_min(torch.finfo(uniform.dtype).tiny).log()).log()


def images_output(images: torch.Tensor, output_type: str) -> VARPipelineOutput:
    """Images (B, 3, H, W) in [0, 1] as ``output_type``: the tensor ("pt"), an array (B, H, W, 3) ("np") or PIL
    images ("pil"); shared by the next-scale pipelines (VAR, Infinity)."""
    if output_type == "pt":
        return VARPipelineOutput(images)
    array = images.permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return VARPipelineOutput(array)
    from PIL import Image

    return VARPipelineOutput([Image.fromarray((a * 255).round().astype(np.uint8)) for a in array])


class VARPipeline:
    """VAR sampling: class-conditional, classifier-free guidance with VAR's linear ramp over scales.

    ``sampler="official"`` draws random numbers exactly as the official ``VAR.autoregressive_infer_cfg`` does
    (``torch.multinomial`` over the whole batch per scale, then ``more_smooth``'s Gumbel noise, from a generator on
    the pipeline's device), so ``generator=torch.Generator(device).manual_seed(seed)`` gives the official
    ``g_seed=seed`` image. ``sampler="fast"`` (the default) draws one uniform per token on the generator's own
    device: the same image for a seed on any device, no host sync, 1/V of the random numbers.

    Example:
        >>> import torch
        >>> from genkv.testing import tiny_var_pipeline
        >>> pipe = tiny_var_pipeline()
        >>> out = pipe(class_labels=[1, 2], guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
        ...            output_type="np")
        >>> out.images.shape
        (2, 16, 16, 3)
        >>> official = pipe(class_labels=[1, 2], generator=torch.Generator().manual_seed(0), sampler="official",
        ...                 more_smooth=True, output_type="pt")
        >>> tuple(official.images.shape)
        (2, 3, 16, 16)
    """

    def __init__(self, transformer: VARTransformer, vqvae: MultiScaleVQVAE) -> None:
        self.transformer, self.vqvae = transformer, vqvae
        self.kv_method = None  # set by genkv.apply_genkv; None = full cache
        self.last_cache = None
        self.decode_batch = 8  # images decoded at once
        self.sample_batch = 64  # images whose logits are formed and sampled at once (fast sampler)

    @classmethod
    def from_pretrained(cls, path: str | Path, vae: str | Path, *, patch_nums: tuple[int, ...] | None = None,
                        torch_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None) -> "VARPipeline":
        """Load the official ``var_d*.pth`` and ``vae_ch160v4096z32.pth`` (strict key checks, clear errors).

        ``patch_nums`` overrides the scale schedule read off the position table (a checkpoint trained with another
        ``--pn``); it must have the checkpoint's token and scale counts. A training checkpoint (``ar-ckpt-*.pth``)
        works for both files: its ``['trainer']['var_wo_ddp']`` / ``['vae_local']`` weights and schedule are used.
        """
        transformer = load_var_transformer(path, patch_nums=patch_nums)
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
        if isinstance(class_labels, int) and not isinstance(class_labels, bool):
            class_labels = [class_labels]  # one label: a batch of one image
        if isinstance(class_labels, (str, bytes, float, bool)) or not hasattr(class_labels, "__iter__"):
            raise ValueError(f"class_labels must be an integer class id or a list of them, got {class_labels!r}")
        labels = torch.as_tensor(list(class_labels) if not torch.is_tensor(class_labels) else class_labels)
        if labels.dim() != 1 or labels.numel() == 0 or labels.dtype.is_floating_point:
            raise ValueError("class_labels must be a non-empty list of integer class ids")
        bad = [int(x) for x in labels if not 0 <= int(x) < n]
        if bad:
            raise ValueError(f"unknown class label {bad[0]}: this model has classes 0..{n - 1}")
        return labels.long()

    def _check_sampler(self, sampler: str, generator: torch.Generator | None) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}, got {sampler!r}")
        device = self.device
        if sampler == "official" and generator is not None and generator.device.type != device.type:
            # torch.multinomial needs the generator on the probabilities' device; moving the probabilities to the
            # generator instead would draw other numbers than the official code (its generator is on the GPU).
            raise ValueError(f"sampler='official' draws on the pipeline's device like the official code: pass "
                             f"generator=torch.Generator({str(device)!r}).manual_seed(seed), not a "
                             f"{generator.device.type} generator (or use sampler='fast')")

    def _embed_official(self, hidden, cond, t, ratio, top_k, top_p, more_smooth, generator) -> torch.Tensor:
        """The official draw order: the head over all 2B rows at once (as the official code, so the logits round
        alike), one multinomial over every image's positions, then (with ``more_smooth``) the Gumbel noise; returns
        the scale's code embeddings (B, l, C)."""
        codebook = self.vqvae.quantize.embedding
        both = self.transformer.logits(hidden, cond)
        b = len(both) // 2
        logits = mask_top_k_top_p_((1 + t) * both[:b] - t * both[b:], top_k, top_p)
        tokens = multinomial_draw(logits, generator)  # drawn even with more_smooth: it moves the generator
        if more_smooth:
            return smooth_embedding(logits, ratio, codebook.weight, official_gumbel(logits, generator))
        return codebook(tokens)

    def _embed_fast(self, hidden, cond, t, ratio, top_k, top_p, more_smooth, generator) -> torch.Tensor:
        """Inverse-CDF draws in slices of images: at large batches the float32 (2B, l, V) logits and the sampler's
        copies of them, not the KV cache, would bound the batch."""
        codebook, model, b = self.vqvae.quantize.embedding, self.transformer, len(hidden) // 2
        parts = []
        for i in range(0, b, self.sample_batch):
            rows = slice(i, min(i + self.sample_batch, b))
            cond_logits = model.logits(hidden[:b][rows], cond[:b][rows])
            uncond_logits = model.logits(hidden[b:][rows], cond[b:][rows])
            logits = mask_top_k_top_p_((1 + t) * cond_logits - t * uncond_logits, top_k, top_p)
            if more_smooth:
                parts.append(smooth_embedding(logits, ratio, codebook.weight, fast_gumbel(logits, generator)))
            else:
                parts.append(codebook(inverse_cdf_draw(logits, generator)))
        return torch.cat(parts)

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale: float = 4.0, top_k: int = 900, top_p: float = 0.95,
                 generator: torch.Generator | None = None, output_type: str = "pil", kv_cache=None,
                 sampler: str = "fast", more_smooth: bool = False) -> VARPipelineOutput:
        """Generate one image per class label. ``kv_cache`` overrides the cache policy for this call.

        ``sampler``: ``"fast"`` or ``"official"`` (see the class docstring). ``more_smooth``: the official
        visualisation option, each scale embeds a Gumbel-softmax mix of codes (temperature from 0.27 down to
        0.0135) instead of the drawn code; the official code never uses it for FID.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        self._check_sampler(sampler, generator)
        embed = self._embed_official if sampler == "official" else self._embed_fast
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
            ratio = s / max(last, 1)
            t = guidance_scale * ratio  # VAR's guidance ramp (none at the first scale), in the official float order
            h = embed(hidden, cond, t, ratio, top_k, top_p, more_smooth, generator)
            h = h.transpose(1, 2).reshape(b, config.z_channels, side, side)
            f_hat, nxt = vae.add_scale(s, f_hat, h.float())
            if s < last:
                start, end = bounds[s + 1]
                x = model.word_embed(nxt.flatten(2).transpose(1, 2).to(dtype)) + positions[:, start:end]
                x = x.repeat(2, 1, 1)
        self.last_cache = cache
        return self._output(f_hat, output_type)

    def _output(self, f_hat: torch.Tensor, output_type: str) -> VARPipelineOutput:
        # Decode in slices: at 512px the VQ-VAE decoder's activations, not the KV cache, would bound the batch.
        vae = self.vqvae
        images = torch.cat([(vae.decode_fhat(part) + 1) / 2 for part in f_hat.split(self.decode_batch)])
        return images_output(images, output_type)
