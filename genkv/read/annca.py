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

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from genkv.kernels.cross import select_prompt_tokens, sparse_cross_attention


class TopKPromptAttention:
    """Sparse cross-attention reader (see the module docstring)."""

    def __init__(self, top_k: int, per: str = "frame") -> None:
        self.top_k = top_k
        self.per = per
        self._constants: dict[tuple, tuple] = {}

    def _prompt_constants(
        self, key: torch.Tensor, value: torch.Tensor, lengths: list[int], layer_index: int, store: Any
    ) -> tuple[torch.Tensor, dict]:
        """The selection's score bias (0 for real tokens, -inf for padding), the folded padding key of this
        layer and, when every prompt has ``top_k`` real tokens, the attention bias of the picks (in the keys'
        dtype, ready for SDPA): constant for a prompt, so made once per (prompt, branch, layer) rather than at every step
        (they were ~20 of the ~32 launches of a call)."""
        version = getattr(store, "prompt_version", None)
        cache_key = (version, getattr(store, "branch", None), layer_index, tuple(lengths), key.data_ptr())
        if store is not None and cache_key in self._constants:
            return self._constants[cache_key]
        b, length = key.shape[0], key.shape[1]
        real = torch.tensor(lengths, dtype=torch.long)
        if key.is_cuda:  # pinned and non-blocking: the host does not wait for the GPU
            real = real.pin_memory().to(key.device, non_blocking=True)
        is_real = torch.arange(length, device=key.device)[None, :] < real[:, None]
        score_bias = torch.zeros(b, length, device=key.device).masked_fill(~is_real, -float("inf"))
        extra: dict = {}
        if max(lengths) < length:
            # All padding rows share one key/value: fold them into one key with log(count) on its logit
            # (-inf for a prompt without padding).
            n_pad = (length - real).clamp(min=0)
            rows = torch.arange(b, device=key.device)
            pad_row = real.clamp(max=length - 1)
            no_pad = torch.full((b,), -float("inf"), device=key.device)
            extra = dict(
                extra_k=key[rows, pad_row],
                extra_v=value[rows, pad_row],
                extra_bias=torch.where(n_pad > 0, n_pad.clamp(min=1).float().log(), no_pad),
            )
        if min(lengths) >= self.top_k:  # every pick is a real token: the picks' bias is zero, the extra's fixed
            picks = torch.zeros(b, 1, 1, min(self.top_k, length), device=key.device)
            if extra:
                picks = torch.cat([picks, extra["extra_bias"].float().view(b, 1, 1, 1)], dim=-1)
            extra = {**extra, "attn_bias": picks.to(key.dtype)}
        if store is not None:
            if any(k[0] != version for k in self._constants):  # a new prompt: forget the old one's
                self._constants = {k: v for k, v in self._constants.items() if k[0] == version}
            self._constants[cache_key] = (score_bias, extra)
        return score_bias, extra

    def graph_signature(self, store: Any) -> tuple | None:
        """Replayable once this prompt's constants exist (the first forward of a prompt builds them), or always
        when every prompt is short enough for the dense call."""
        lengths = [n for per_branch in store.prompt_lengths.values() for n in per_branch]
        if lengths and self.top_k >= max(lengths):
            return ("dense",)
        version = getattr(store, "prompt_version", None)
        return ("top_k",) if any(k[0] == version for k in self._constants) else None

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
        # Every real token would be kept: by the padding identity above that is exactly dense attention over all
        # rows, padding included (what upstream computes), so take the single dense call instead of select +
        # gather + masked attention (~25 launches per call).
        if self.top_k >= max(lengths):
            if store is not None:
                store.read_stats[("cross_density", layer_index)] = 1.0
            return dispatch_attention_fn(query, key, value, backend=backend, parallel_config=None)
        score_bias, extra = self._prompt_constants(key, value, lengths, layer_index, store)
        indices, valid = select_prompt_tokens(
            query, key, tokens_per_group=s // groups, top_k=self.top_k, score_bias=score_bias,
            need_valid="attn_bias" not in extra,
        )
        if store is not None:
            store.read_stats[("cross_density", layer_index)] = (indices.shape[-1] + ("extra_k" in extra)) / length
        return sparse_cross_attention(query, key, value, indices, valid, **extra)
