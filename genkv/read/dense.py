"""Dense readers: every query attends to every kept key (self) or every prompt token (cross)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn


class DenseSelfAttention:
    """Attention of the chunk's queries over ``history + chunk`` through diffusers' dispatcher.

    Without a key bias this is exactly the call ``WanAttnProcessor`` makes, so the model's attention backend
    (``set_attention_backend``, ``attention_backend(...)``) and its parallel config keep working. A key bias
    (merged keys' ``log(count)``, ``-inf`` holes) becomes an additive mask broadcast over the queries.
    """

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_bias: torch.Tensor | None,
        *,
        backend: Any = None,
        parallel_config: Any = None,
        layer_index: int = 0,
        store: Any = None,
    ) -> torch.Tensor:
        mask = None
        if key_bias is not None:
            mask = key_bias.permute(0, 2, 1).unsqueeze(2).to(query.dtype)  # (B, H, 1, S_kv)
        return dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=0.0,
            is_causal=False,
            backend=backend,
            parallel_config=parallel_config,
        )


class DenseCrossAttention:
    """Every query attends to every prompt token (Wan: all 512 rows, padding included, as upstream)."""

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
        return dispatch_attention_fn(
            query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, backend=backend, parallel_config=None
        )
