"""AnnCA: each frame's queries attend to the top-k prompt tokens for that frame, padding folded exactly.

Wan zero-pads every prompt to 512 embeddings; after the text projection all padding rows are the same vector,
so their keys and values are identical. By the duplicate-key identity (``n`` equal keys = one key with
``+log(n)`` on its logit) all padding rows are represented by *one* key with bias ``log(n_pad)``: padding never
takes a top-k slot, yet with ``top_k`` at least the real prompt length the result equals dense cross-attention
over all 512 rows exactly, which is what upstream computes.

Selection (per frame, per head): the score of prompt token ``j`` is ``mean_q(frame) . k_j``, the attention logit
of the frame's mean query; the ``top_k`` real tokens by score are kept. The gather + attention is batched over
frames as one SDPA call of ``B * F`` sequences.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn


class TopKPromptAttention:
    """Sparse cross-attention reader (see the module docstring)."""

    def __init__(self, top_k: int, per: str = "frame") -> None:
        self.top_k = top_k
        self.per = per

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        backend: Any = None,
        layer_index: int = 0,
        store: Any = None,
    ) -> torch.Tensor:
        b, s, h, d = query.shape
        length = key.shape[1]
        chunk = getattr(store, "chunk", None)
        groups = 1
        if self.per == "frame" and chunk is not None and s % chunk.tokens_per_frame == 0:
            groups = s // chunk.tokens_per_frame
        # Real prompt lengths are host integers (recorded once per prompt), so no call here waits on the GPU.
        lengths = None if store is None else store.prompt_lengths.get(store.branch)
        lengths = [length] * b if lengths is None else [min(int(n), length) for n in lengths]
        if self.top_k >= max(lengths) and min(lengths) >= length:  # nothing to drop, no padding: dense
            if store is not None:
                store.read_stats[("cross_density", layer_index)] = 1.0
            return dispatch_attention_fn(query, key, value, backend=backend, parallel_config=None)
        real = torch.tensor(lengths, dtype=torch.long).pin_memory().to(key.device, non_blocking=True) \
            if key.is_cuda else torch.tensor(lengths, dtype=torch.long)

        q = query.unflatten(1, (groups, s // groups))  # (B, G, T, H, D)
        scores = torch.einsum("bghd,blhd->bghl", q.float().mean(2), key.float())  # (B, G, H, L)
        is_real = torch.arange(length, device=key.device)[None, :] < real[:, None]  # (B, L)
        scores = scores.masked_fill(~is_real[:, None, None, :], -float("inf"))
        k_sel = min(self.top_k, length)
        top = scores.topk(k_sel, dim=-1).indices  # (B, G, H, k)
        picked_real = is_real[:, None, None, :].expand_as(scores).gather(-1, top)

        def gather(t: torch.Tensor) -> torch.Tensor:  # (B, L, H, D) -> (B, G, H, k, D)
            src = t.permute(0, 2, 1, 3)[:, None].expand(b, groups, h, length, d)
            return src.gather(3, top[..., None].expand(*top.shape, d))

        keys, values = gather(key), gather(value)
        bias = torch.zeros(top.shape, device=key.device, dtype=torch.float32).masked_fill(~picked_real, -float("inf"))
        if max(lengths) < length:
            # All padding rows share one key/value: fold them into one key with log(count) on its logit
            # (-inf for a prompt without padding).
            n_pad = (length - real).clamp(min=0)
            pad_row = real.clamp(max=length - 1)
            pad_k = key[torch.arange(b, device=key.device), pad_row][:, None, :, None, :].expand(b, groups, h, 1, d)
            pad_v = value[torch.arange(b, device=key.device), pad_row][:, None, :, None, :].expand(b, groups, h, 1, d)
            no_pad = torch.full((b,), -float("inf"), device=key.device)
            pad_bias = torch.where(n_pad > 0, n_pad.clamp(min=1).float().log(), no_pad)
            keys = torch.cat([keys, pad_k], dim=3)
            values = torch.cat([values, pad_v], dim=3)
            bias = torch.cat([bias, pad_bias.view(b, 1, 1, 1).expand(b, groups, h, 1)], dim=3)
        if store is not None:
            store.read_stats[("cross_density", layer_index)] = keys.shape[3] / length

        qf = q.permute(0, 1, 3, 2, 4).reshape(b * groups, h, s // groups, d)
        kf = keys.reshape(b * groups, h, keys.shape[3], d)
        vf = values.reshape(b * groups, h, keys.shape[3], d)
        mask = bias.reshape(b * groups, h, 1, keys.shape[3]).to(query.dtype)
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=1.0 / math.sqrt(d))
        return out.reshape(b, groups, h, s // groups, d).permute(0, 1, 3, 2, 4).reshape(b, s, h, d)
