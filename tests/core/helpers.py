"""Independent references for the cache tests: masked full-sequence forwards with diffusers' own processor."""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor


class MaskedWanProcessor(WanAttnProcessor):
    """diffusers' WanAttnProcessor with a fixed boolean self-attention mask (True = may attend)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None:
            attention_mask = self.mask
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def frame_mask(num_frames: int, tokens_per_frame: int, allowed) -> torch.Tensor:
    """Token mask from a frame rule ``allowed(query_frame, key_frame) -> bool``."""
    frames = torch.arange(num_frames).repeat_interleave(tokens_per_frame)
    m = torch.tensor([[allowed(int(qf), int(kf)) for kf in range(num_frames)] for qf in range(num_frames)])
    return m[frames][:, frames]


def masked_forward(transformer, latents, timesteps_per_frame, embeds, mask, tokens_per_frame):
    """One forward of ``transformer`` over all frames with per-token timesteps and a self-attention mask."""
    saved = dict(transformer.attn_processors)
    masked = {name: (MaskedWanProcessor(mask) if "attn1" in name else WanAttnProcessor()) for name in saved}
    transformer.set_attn_processor(masked)
    try:
        t = timesteps_per_frame.repeat_interleave(tokens_per_frame)[None].expand(latents.shape[0], -1)
        return transformer(latents, t, embeds, return_dict=False)[0]
    finally:
        transformer.set_attn_processor(saved)


__all__ = ["MaskedWanProcessor", "frame_mask", "masked_forward", "dispatch_attention_fn"]


def reference_sampling(pipe, init_noise, seed, flow_of, chunk: int = 3) -> torch.Tensor:
    """Self-Forcing sampling without a cache: every forward runs over [clean earlier chunks, current chunk].

    ``flow_of(seq, timesteps_per_frame, mask_of, tokens_per_frame)`` returns the flow over the whole sequence,
    ``mask_of(allowed)`` the token mask of a frame rule over it; the current chunk's part of it is sampled with the
    pipeline's scheduler, re-noised from a generator seeded with ``seed``, as the pipeline does.
    """
    sched = pipe.scheduler
    tpf = (init_noise.shape[3] // 2) * (init_noise.shape[4] // 2)
    gen = torch.Generator().manual_seed(seed)
    clean = []
    for start in range(0, init_noise.shape[2], chunk):
        x = init_noise[:, :, start : start + chunk]
        for k, (t, sigma) in enumerate(zip(sched.timesteps, sched.sigmas)):
            seq = torch.cat(clean + [x], dim=2)
            ts = torch.cat([torch.zeros(start), torch.full((chunk,), float(t))])
            flow = flow_of(seq, ts, lambda allowed, n=seq.shape[2]: frame_mask(n, tpf, allowed), tpf)[:, :, start:]
            x0 = sched.predict_x0(x, flow, float(sigma))
            if k + 1 < len(sched):
                x = sched.add_noise(x0, torch.randn(x.shape, generator=gen), float(sched.sigmas[k + 1]))
        clean.append(x0)
    return torch.cat(clean, dim=2)
