"""Chunk-by-chunk decoding with the Wan VAE's causal cache carried across chunks.

``AutoencoderKLWan.decode`` decodes one latent frame at a time, feeding each causal 3-D convolution the last
frames it saw (``feat_cache``), and clears that cache at the end of every call. Decoding a long video chunk by
chunk with it would either restart the cache at each chunk (seams) or re-decode old latents (quadratic work).
:class:`StreamingVAEDecoder` keeps its own cache alive between calls, so decoding chunks one after another
gives exactly what one ``decode`` over the concatenated latents gives, with memory independent of length.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan


class StreamingVAEDecoder:
    """Decode latent chunks of one (batch of) video(s) in order.

    The decoder options each compute the same pixels (exactly in float64; to bf16 rounding in bf16) and patch the
    VAE's decoder in place: ``channels_last`` (NDHWC activations), ``frames_per_call``, ``conv2d_taps`` (causal 3-D
    convolutions as per-tap 2-D ones, ``vae_conv``), ``fused_norms`` (``vae_norm``), ``fused_tap_sum`` (the taps,
    bias and shortcut summed in one pass; needs ``conv2d_taps``), ``transposed_upsample`` (``vae_upsample``) and
    ``fused_blocks`` (norm + SiLU in one pass and the shortcut in the tap sum, where those pieces are on;
    ``vae_block``). ``SelfForcingPipeline.enable_compile`` turns them all on.

    Example:
        >>> import torch
        >>> from genkv.testing import tiny_wan_vae
        >>> vae = tiny_wan_vae()
        >>> decoder = StreamingVAEDecoder(vae)
        >>> z = torch.randn(1, 16, 6, 2, 2)
        >>> parts = [decoder.decode(z[:, :, :3]), decoder.decode(z[:, :, 3:])]
        >>> [p.shape[2] for p in parts]            # 1 + 4 + 4, then 4 + 4 + 4 frames
        [9, 12]
    """

    def __init__(self, vae: AutoencoderKLWan, channels_last: bool = False, frames_per_call: int | None = None,
                 conv2d_taps: bool = False, fused_norms: bool = False, fused_tap_sum: bool = False,
                 transposed_upsample: bool = False, fused_blocks: bool = False) -> None:
        if frames_per_call is not None and (isinstance(frames_per_call, bool) or frames_per_call < 1):
            raise ValueError(f"frames_per_call must be a positive integer or None, got {frames_per_call!r}")
        if fused_tap_sum and not conv2d_taps:
            raise ValueError("fused_tap_sum sums the per-tap convolutions: it needs conv2d_taps=True as well")
        self.vae = vae
        self.channels_last = channels_last
        # Latent frames per decoder call. Upstream decodes one at a time; the causal convolutions read their
        # previous frames from the cache either way, so several frames per call give the same pixels (exactly, in
        # float64) with a third of the launches and larger convolutions. None: the whole chunk in one call (the
        # video's very first latent frame is always alone: it decodes to 1 frame, not 4).
        self.frames_per_call = frames_per_call
        if conv2d_taps:  # the decoder's causal 3-D convolutions as per-tap 2-D ones (stays on the VAE; same output)
            from .vae_conv import apply_conv2d_taps

            apply_conv2d_taps(vae.decoder, fused_sum=fused_tap_sum)
        if fused_norms:  # the decoder's RMS norms as one fused pass each (stays on the VAE; bf16-rounding close)
            from .vae_norm import apply_fused_norms

            apply_fused_norms(vae.decoder)
        if transposed_upsample:  # 2x nearest upsample + 3x3 conv as one transposed conv (same output up to rounding)
            from .vae_upsample import apply_transposed_upsample

            apply_transposed_upsample(vae.decoder, channels_last=channels_last)
        if fused_blocks:  # residual blocks: norm + SiLU in one pass, the shortcut added in the tap sum
            from .vae_block import apply_fused_blocks

            apply_fused_blocks(vae.decoder)
        self._stats: dict = {}
        if channels_last:
            # cuDNN's tensor-core 3-D convolutions want channels-last (NDHWC) activations and weights.
            for module in vae.decoder.modules():
                if isinstance(module, torch.nn.Conv3d):
                    module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
        self.reset()

    def reset(self) -> None:
        """Start a new video."""
        self._feat_map: list = [None] * self.vae._cached_conv_counts["decoder"]
        self.frames_decoded = 0  # latent frames

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the latent normalisation the diffusion model works in (Wan's per-channel mean / std)."""
        cached = self._stats.get(latents.device)
        if cached is None:  # made once per device: a host list copied to the GPU every chunk is a sync each time
            cfg = self.vae.config
            cached = tuple(torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1, 1).to(latents.device)
                           for v in (cfg.latents_mean, cfg.latents_std))
            self._stats[latents.device] = cached
        mean, std = cached
        return latents.float() * std + mean

    def decode(self, latents: torch.Tensor, *, normalized: bool = True, differentiable: bool = False) -> torch.Tensor:
        """Decode ``latents`` (B, C, T, h, w) → pixels (B, 3, T', H, W) in [-1, 1].

        The first latent frame of a video gives 1 pixel frame, every later one 4 (Wan's temporal factor).
        ``differentiable=True`` keeps the autograd graph (training a decoder as it streams, ``eval/tune_decoder.py``);
        by default nothing is recorded, as inference wants.
        """
        with torch.set_grad_enabled(differentiable):
            return self._decode(latents, normalized)

    def _decode(self, latents: torch.Tensor, normalized: bool) -> torch.Tensor:
        vae = self.vae
        z = self.denormalize(latents) if normalized else latents
        z = z.to(vae.dtype)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        x = vae.post_quant_conv(z)
        outputs = []
        start, total = 0, x.shape[2]
        while start < total:
            if self.frames_decoded == 0:
                stop = start + 1
            else:
                stop = total if self.frames_per_call is None else min(total, start + self.frames_per_call)
            out = vae.decoder(
                x[:, :, start:stop],
                feat_cache=self._feat_map,
                feat_idx=[0],
                first_chunk=self.frames_decoded == 0,
            )
            outputs.append(out)
            self.frames_decoded += stop - start
            start = stop
        out = torch.cat(outputs, dim=2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0)


def to_uint8_frames(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] → uint8 (B, T, H, W, 3) on the same device (one rounding, as diffusers)."""
    video = (pixels.float() * 0.5 + 0.5).clamp(0, 1)
    return (video * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
