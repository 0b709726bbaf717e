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

    def graph_signature(self, store: Any) -> tuple:
        """Every forward takes the same path (no host work): any two of a chunk may share a CUDA graph."""
        return ("dense",)

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
            if _biased_dense_on_triton(query):
                return _dense_with_bias_triton(query, key, value, key_bias)
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


def _biased_dense_on_triton(query: torch.Tensor) -> bool:
    """SDPA with a float mask falls back to slow kernels that materialise (B, H, S_q, S_kv) logits; the
    block-sparse kernel takes the per-key bias natively, so on CUDA dense + bias runs there, every block with a
    visible key listed."""
    from genkv.kernels.block_sparse import triton_available

    return (query.is_cuda and triton_available() and query.shape[-1] in (16, 32, 64, 128)
            and query.dtype in (torch.float16, torch.bfloat16))


def empty_key_blocks(key_bias: torch.Tensor, block: int) -> torch.Tensor:
    """(n_blocks,) bool: the key blocks of ``block`` slots in which no batch element or head sees any key (bias
    -inf throughout, e.g. a fixed-layout cache's empty region). Decided on the device, no sync.

    Example:
        >>> bias = torch.zeros(1, 6, 2)
        >>> bias[:, 2:4] = -float("inf")
        >>> empty_key_blocks(bias, 2).tolist()
        [False, True, False]
    """
    visible = (key_bias > -float("inf")).any(-1).any(0)
    n_blocks = -(-visible.shape[0] // block)
    visible = torch.nn.functional.pad(visible, (0, n_blocks * block - visible.shape[0]))
    return ~visible.view(n_blocks, block).any(-1)


def _dense_with_bias_triton(query, key, value, key_bias, block: int = 128) -> torch.Tensor:
    from genkv.kernels import block_sparse_attention

    b, s_q, h, _ = query.shape
    n_q, n_kv = -(-s_q // block), -(-key.shape[1] // block)
    # Every query block lists every key block that holds a visible key, in ascending order: a fixed-layout
    # cache's empty blocks (bias -inf throughout) would add exactly nothing, so they are not read. Decided on
    # the device (no sync); broadcast views of one row, nothing (B, H, n_q, n_kv)-sized materialised.
    empty = empty_key_blocks(key_bias, block)
    order = torch.argsort(empty.to(torch.int32), stable=True).to(torch.int32)
    indices = order.expand(b, h, n_q, n_kv)
    counts = (~empty).sum().to(torch.int32).expand(b, h, n_q).contiguous()
    return block_sparse_attention(query, key, value, indices, counts, key_bias=key_bias, block_m=block,
                                  block_n=block, backend="triton")


class DenseCrossAttention:
    """Every query attends to every prompt token (Wan: all 512 rows, padding included, as upstream)."""

    def graph_signature(self, store: Any) -> tuple:
        return ("dense",)

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
