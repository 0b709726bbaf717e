"""AnnSA: each query block of the chunk attends only to the key blocks routing picks for it.

Routing (``genkv.kernels.route_blocks``) scores mean-pooled query blocks against mean-pooled key blocks of
``history + chunk`` and keeps the top-k (or top-p mass) blocks per (head, query block), always adding the sink
blocks (sink frames are committed first and never move, so they occupy the first slots) and the blocks of the
chunk itself. Attention then runs block-sparse (``genkv.kernels.block_sparse_attention``), with the cache's
per-key bias (TempCache's log counts) when there is one.

History K/V are constant while a chunk is denoised, so with ``refresh="chunk"`` the routing is computed at the
chunk's first sparse step and reused by its later steps (the chunk's own blocks, whose keys change, are always
attended). The first ``dense_steps`` denoising steps can stay dense.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .dense import DenseSelfAttention


class RoutedSelfAttention:
    """Block-sparse self-attention reader (see the module docstring)."""

    def __init__(
        self,
        *,
        block_m: int = 128,
        block_n: int = 128,
        top_k: int | None = 16,
        top_p: float | None = None,
        sink_frames: int = 0,
        dense_steps: int = 0,
        refresh: str = "chunk",
        sparse_clean_pass: bool = True,
    ) -> None:
        self.block_m, self.block_n = block_m, block_n
        self.top_k, self.top_p = top_k, top_p
        self.sink_frames = sink_frames
        self.dense_steps = dense_steps
        self.refresh = refresh
        self.sparse_clean_pass = sparse_clean_pass
        self.dense = DenseSelfAttention()
        self._routes: dict[tuple, tuple] = {}

    def _dense_now(self, store: Any) -> bool:
        step = getattr(store, "step_index", 0)
        committing = getattr(store, "_committing", False)
        return step < self.dense_steps or (committing and not self.sparse_clean_pass)

    def graph_signature(self, store: Any) -> tuple | None:
        """``("dense",)`` or ``("routed",)`` once this chunk's routes exist; None while routing is still to do
        (it copies host block lists) or when routes are refreshed every forward."""
        if store.chunk is None:
            return None
        if self._dense_now(store):
            return ("dense",)
        if self.refresh != "chunk":
            return None
        frame_start = store.chunk.frame_start
        routed = any(key[2] == frame_start for key in self._routes)
        return ("routed",) if routed else None

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
        from genkv.kernels import block_sparse_attention, route_blocks

        chunk = getattr(store, "chunk", None)
        n_kv_blocks = math.ceil(key.shape[1] / self.block_n)
        if chunk is None or self._dense_now(store):
            self._record(store, layer_index, 1.0, n_kv_blocks)
            return self.dense.attend(query, key, value, key_bias, backend=backend, parallel_config=parallel_config)

        n_cur = query.shape[1]
        n_hist = key.shape[1] - n_cur
        sink_tokens = min(self.sink_frames * chunk.tokens_per_frame, n_hist)
        always = list(range(math.ceil(sink_tokens / self.block_n)))
        always += list(range(n_hist // self.block_n, n_kv_blocks))  # the chunk's own blocks (and the one it starts in)
        route_key = (store.branch, layer_index, chunk.frame_start, key.shape[1])
        cached = self._routes.get(route_key) if self.refresh == "chunk" else None
        if cached is None:
            cached = route_blocks(
                query, key, block_m=self.block_m, block_n=self.block_n, top_k=self.top_k, top_p=self.top_p,
                always=always,
            )
            if self.refresh == "chunk":
                # Only this chunk's routes are ever reused: drop the previous chunk's for this layer.
                self._routes = {k: v for k, v in self._routes.items() if k[:2] != route_key[:2]}
                self._routes[route_key] = cached
        indices, counts = cached
        self._record(store, layer_index, counts, n_kv_blocks)
        return block_sparse_attention(
            query, key, value, indices, counts, key_bias=key_bias, block_m=self.block_m, block_n=self.block_n
        )

    def _record(self, store: Any, layer_index: int, counts: Any, n_kv_blocks: int) -> None:
        """Keep the attended density for cache_stats (a device tensor: no sync until someone asks)."""
        if store is not None:
            value = (counts, n_kv_blocks) if isinstance(counts, torch.Tensor) else float(counts)
            store.read_stats[("self_density", layer_index)] = value
