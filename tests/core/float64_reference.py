"""Float64 attention references for the cache tests that need more than a boolean mask.

:class:`ReferenceSelfAttention` replaces a Wan block's self-attention processor in a full-sequence forward. It
computes q/k/v exactly as diffusers' ``WanAttnProcessor`` does (projections, RMS norms), then, in float64 and
independently of genkv's rotary code, applies RoPE at *explicit* positions read from the model's own tables and
attends with an explicit mask. Query rows come in groups; each group may place the keys at its own temporal
positions (what a rolling cache that re-bases its window does to the chunk that reads it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections


def rope_tables(rope, t_pos, h_pos, w_pos):
    """float64 (S, D) cos/sin for tokens at temporal/row/column positions, gathered from Wan's own tables."""
    t, h = rope.t_dim, rope.h_dim
    cos, sin = rope.freqs_cos.double(), rope.freqs_sin.double()
    assert int(t_pos.max()) < cos.shape[0] and int(t_pos.min()) >= 0, "positions must stay inside the RoPE table"
    pick = lambda table: torch.cat([table[t_pos, :t], table[h_pos, t : t + h], table[w_pos, t + h :]], -1)  # noqa
    return pick(cos), pick(sin)


def rotate(x, cos, sin):
    """Wan's interleaved-pair rotation of x (B, S, H, D) by (S, D) tables, in float64."""
    cos, sin = cos[None, :, None], sin[None, :, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    return out


@dataclass
class QueryGroup:
    rows: torch.Tensor  # (n,) query token indices
    query_t: torch.Tensor  # (n,) temporal positions of those queries
    key_t: torch.Tensor  # (S,) temporal positions of every key, as this group sees them


class ReferenceSelfAttention(WanAttnProcessor):
    """Self-attention in float64 with explicit RoPE positions per query group and a (S, S) or (H, S, S) mask;
    cross-attention is diffusers' own."""

    def __init__(self, rope, groups, h_pos, w_pos, mask):
        super().__init__()
        self.rope, self.groups, self.h_pos, self.w_pos, self.mask = rope, groups, h_pos, w_pos, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        q, k, v = _get_qkv_projections(attn, hidden_states, None)
        q = attn.norm_q(q).unflatten(2, (attn.heads, -1)).double()
        k = attn.norm_k(k).unflatten(2, (attn.heads, -1)).double()
        v = v.unflatten(2, (attn.heads, -1)).double()
        out = torch.zeros_like(q)
        mask = self.mask if self.mask.dim() == 3 else self.mask[None]
        for g in self.groups:
            cq, sq = rope_tables(self.rope, g.query_t, self.h_pos[g.rows], self.w_pos[g.rows])
            ck, sk = rope_tables(self.rope, g.key_t, self.h_pos, self.w_pos)
            qr, kr = rotate(q[:, g.rows], cq, sq), rotate(k, ck, sk)
            logits = torch.einsum("bqhd,bkhd->bhqk", qr, kr) / q.shape[-1] ** 0.5
            logits = logits.masked_fill(~mask[:, g.rows][None], -float("inf"))
            out[:, g.rows] = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)
        out = out.flatten(2, 3).to(hidden_states.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def forward_with(transformer, latents, timesteps_per_frame, embeds, tokens_per_frame, self_processor):
    """One forward over all frames with per-token timesteps and ``self_processor`` in every self-attention."""
    saved = dict(transformer.attn_processors)
    procs = {name: (self_processor if "attn1" in name else WanAttnProcessor()) for name in saved}
    transformer.set_attn_processor(procs)
    try:
        t = timesteps_per_frame.repeat_interleave(tokens_per_frame)[None].expand(latents.shape[0], -1)
        return transformer(latents, t, embeds, return_dict=False)[0]
    finally:
        transformer.set_attn_processor(saved)
