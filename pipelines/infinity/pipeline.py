"""``InfinityPipeline``: text-to-image next-scale generation (Infinity 2B/8B), diffusers style, with a pluggable
self-attention KV cache (``genkv.apply_genkv(pipe, "scalekv", budget=0.1)``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from genkv.pipelines.var.pipeline import VARPipelineOutput, images_output

from .bsq_vae import BitwiseDecoder, bits_to_codes, resize_codes
from .checkpoint import load_bitwise_vae, load_infinity_transformer
from .model import InfinityTransformer
from .rope import rope_tables
from .sampling import sample_bits
from .schedules import scale_schedule

#: ``.images``: PIL images (``output_type="pil"``), an array (B, H, W, 3) in [0, 1] (``"np"``) or a tensor
#: (B, 3, H, W) (``"pt"``).
InfinityPipelineOutput = VARPipelineOutput


def _per_scale(value: float | Sequence[float], n: int, name: str) -> list[float]:
    values = [float(value)] * n if np.isscalar(value) else [float(v) for v in value]
    if len(values) < n:
        raise ValueError(f"{name} has {len(values)} values for {n} scales")
    return values[:n]


class InfinityPipeline:
    """Infinity sampling: T5-conditioned, classifier-free guidance as the official ``autoregressive_infer_cfg``
    (guidance on the logits by default, the learned ``cfg_uncond`` text or a negative prompt as unconditional
    branch, temperature ``tau``, top-k/top-p on each bit), on the official scale schedules (``pn``, ``h_div_w``).

    Example:
        >>> import torch
        >>> from genkv.testing import tiny_infinity_pipeline
        >>> pipe = tiny_infinity_pipeline()
        >>> out = pipe(["a red cube", "a cat"], guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
        ...            output_type="np")
        >>> out.images.shape
        (2, 32, 32, 3)
    """

    def __init__(self, transformer: InfinityTransformer, vae: BitwiseDecoder, tokenizer: Any, text_encoder: Any,
                 pn: str = "1M", h_div_w: float = 1.0, max_length: int = 512) -> None:
        self.transformer, self.vae = transformer, vae
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.pn, self.h_div_w, self.max_length = pn, h_div_w, max_length
        bits = transformer.config.bits
        if bits not in (vae.bits, 4 * vae.bits):
            raise ValueError(f"the transformer takes {bits} bits per token, the tokenizer has {vae.bits}")
        self.spatial_patchify = bits == 4 * vae.bits  # the 8B: 2x2 tokenizer cells per token
        self.kv_method = None  # set by genkv.apply_genkv; None = full cache
        self.last_cache = None
        self.decode_batch = 8  # images decoded at once

    @classmethod
    def from_pretrained(cls, path: str | Path, vae: str | Path, text_encoder: str | Path, *,
                        torch_dtype: torch.dtype | None = None, **kwargs) -> "InfinityPipeline":
        """Load ``infinity_2b_reg.pth`` (or the 8B's shard folder), the tokenizer file and flan-t5-xl from a local
        folder (``T5EncoderModel`` + its tokenizer; nothing is downloaded)."""
        from transformers import AutoTokenizer, T5EncoderModel

        folder = Path(text_encoder)
        if not folder.is_dir():
            raise ValueError(f"text_encoder must be a local flan-t5 folder, {str(folder)!r} is not a folder")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        encoder = T5EncoderModel.from_pretrained(folder, local_files_only=True, dtype=torch_dtype or torch.float32)
        pipe = cls(load_infinity_transformer(path), load_bitwise_vae(vae), tokenizer, encoder.eval(), **kwargs)
        return pipe.to(dtype=torch_dtype) if torch_dtype is not None else pipe

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "InfinityPipeline":
        self.transformer.to(device=device, dtype=dtype)
        self.vae.to(device=device)  # the tokenizer decodes in float32
        if self.text_encoder is not None:  # None when only prompt_embeds are used
            self.text_encoder.to(device=device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def schedule(self, pn: str | None = None, h_div_w: float | None = None) -> tuple[tuple[int, int], ...]:
        return scale_schedule(pn or self.pn, self.h_div_w if h_div_w is None else h_div_w)

    def new_cache(self, schedule: tuple[tuple[int, int], ...] | None = None):
        """A fresh self-attention cache for ``schedule`` (default: the pipeline's ``pn`` and ``h_div_w``)."""
        from genkv.scales.cache import FullScaleCache

        schedule = schedule or self.schedule()
        config = self.transformer.config
        sides = tuple(h for h, _ in schedule)
        if self.kv_method is None:
            return FullScaleCache(config.depth, sides)
        if any(h != w for h, w in schedule):
            raise ValueError(f"{self.kv_method.name!r} budgets square scales; h_div_w={self.h_div_w} gives "
                             f"{schedule[-1]}: use h_div_w=1.0 or the full cache")
        return self.kv_method.build_scale_cache(config.depth, sides, config.num_heads)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 features (B, L, C) float32 and the token mask (B, L), padded to the longest prompt."""
        tokens = self.tokenizer(prompts, max_length=self.max_length, padding="longest", truncation=True,
                                return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        features = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return features, mask.bool()

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, guidance_scale: float | Sequence[float] = 3.0,
                 tau: float | Sequence[float] = 1.0, top_k: int = 900, top_p: float = 0.97,
                 generator: torch.Generator | None = None, negative_prompt: str | list[str] | None = None,
                 pn: str | None = None, h_div_w: float | None = None, cfg_insertion_layer: int = 0,
                 output_type: str = "pil", kv_cache=None,
                 prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> VARPipelineOutput:
        """Generate one image per prompt. ``guidance_scale`` and ``tau`` take one value or one per scale;
        ``cfg_insertion_layer`` 0 guides the logits (the official scripts' choice), a negative value guides
        that block's output (``-5``: the fifth-last block). ``kv_cache`` overrides the cache policy.
        ``prompt_embeds=(features, mask)``: T5 features (B, L, C) and their token mask (B, L) instead of ``prompt``."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        prompts = self._prompts(prompt, prompt_embeds)
        model, config = self.transformer, self.transformer.config
        schedule = self.schedule(pn, h_div_w)
        n, b = len(schedule), len(prompts) if prompt_embeds is None else prompt_embeds[0].shape[0]
        cfg, taus = _per_scale(guidance_scale, n, "guidance_scale"), _per_scale(tau, n, "tau")
        use_cfg = any(c != 1 for c in cfg)
        if cfg_insertion_layer > 0 or cfg_insertion_layer <= -config.depth:
            raise ValueError(f"cfg_insertion_layer must be 0 or in -1..-{config.depth - 1}")

        features, mask = self._text(prompts, negative_prompt, use_cfg, prompt_embeds)
        cond, text_kv, x = model.encode_text(features.to(model.head.weight.dtype), mask)
        gss = model.block_condition(cond)
        rope = rope_tables(schedule, config.head_dim, config.rope_normalized)
        vae_schedule = [(2 * h, 2 * w) if self.spatial_patchify else (h, w) for h, w in schedule]
        cache = kv_cache if kv_cache is not None else self.new_cache(schedule)
        cache.reset()
        summed: torch.Tensor | int = 0  # takes the codes' memory layout, as upstream (see bits_to_codes)
        for s, (h, w) in enumerate(schedule):
            mix = (config.depth + cfg_insertion_layer, cfg[s]) if cfg_insertion_layer < 0 and cfg[s] != 1 else None
            hidden = model.forward_scale(x, gss, text_kv, mask, s, rope[s], cache, mix=mix)
            if cfg[s] != 1 and cfg_insertion_layer == 0:
                logits = model.logits(hidden, cond).mul(1 / taus[s])
                logits = cfg[s] * logits[:b] + (1 - cfg[s]) * logits[b:]
            else:
                logits = model.logits(hidden[:b], cond[:b]).mul(1 / taus[s])
            bits = sample_bits(logits.view(b, -1, 2), top_k, top_p, generator).view(b, h, w, -1)
            codes = bits_to_codes(self._unpatchify(bits))
            if s == n - 1:
                summed += codes
                break
            summed += resize_codes(codes, vae_schedule[-1])
            x = self._next_input(resize_codes(summed, vae_schedule[s + 1])[:, :, 0])
            x = x.repeat(2, 1, 1) if use_cfg else x
        self.last_cache = cache
        images = torch.cat([(self.vae.decode(part[:, :, 0]) + 1) / 2 for part in summed.split(self.decode_batch)])
        return images_output(images, output_type)

    @staticmethod
    def _prompts(prompt: str | list[str] | None, embeds) -> list[str]:
        if embeds is not None:
            if prompt is not None:
                raise ValueError("pass prompt or prompt_embeds, not both")
            return []
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        return prompts

    def _text(self, prompts: list[str], negative: str | list[str] | None, use_cfg: bool, embeds=None):
        """Conditional features, then (with guidance) the unconditional ones: the negative prompts if given,
        else the learned ``cfg_uncond`` rows at each prompt's length (official)."""
        if embeds is not None:
            features, mask = embeds[0].to(self.device).float(), embeds[1].to(self.device).bool()
            if negative is not None:
                raise ValueError("negative_prompt needs prompt, not prompt_embeds")
        elif not use_cfg or negative is None:
            features, mask = self.encode_prompt(prompts)
        if not use_cfg:
            return features, mask
        if negative is not None:
            negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
            return self.encode_prompt(prompts + negatives)
        uncond = self.transformer.unconditional_text(mask).to(features)
        return torch.cat([features, uncond]), torch.cat([mask, mask])

    def _unpatchify(self, bits: torch.Tensor) -> torch.Tensor:
        """(B, h, w, 4d) → (B, 2h, 2w, d) for the 8B (each token carries a 2x2 cell of tokenizer codes)."""
        if not self.spatial_patchify:
            return bits
        return F.pixel_shuffle(bits.permute(0, 3, 1, 2).float(), 2).permute(0, 2, 3, 1)

    def _next_input(self, codes: torch.Tensor) -> torch.Tensor:
        """Summed codes resized to the next grid (B, d, h, w) → its embedded tokens (B, h*w, C)."""
        if self.spatial_patchify:
            codes = F.pixel_unshuffle(codes, 2)
        tokens = codes.flatten(2).transpose(1, 2)
        return self.transformer.word_embed(tokens.to(self.transformer.word_embed.weight.dtype))
