"""AnnSA: each query block of the chunk attends only to the key blocks routing picks for it.

Routing (``genkv.kernels.route_blocks``) scores mean-pooled query blocks against mean-pooled key blocks of
``history + chunk`` and keeps the top-k (or top-p mass) blocks per (head, query block), always adding the sink
blocks (sink frames are committed first and never move, so they occupy the first slots) and the blocks of the
chunk itself. Attention then runs block-sparse (``genkv.kernels.block_sparse_attention``), with the cache's
per-key bias (TempCache's log counts) when there is one.

History K/V are constant while a chunk is denoised, so with ``refresh="chunk"`` the routing is computed at the
chunk's first sparse step and reused by its later steps (the chunk's own blocks, whose keys change, are always
attended). The first ``dense_steps`` denoising steps can stay dense.

``chunk_attention="sdpa"`` splits the read: the chunk's own keys, which every query reads, go to a dense SDPA
that returns its log-sum-exp (cuDNN on CUDA), and the block-sparse kernel resumes from that partial over the
listed history blocks (the straddling block up to the history's end). Same attention, up to rounding. The default,
``"auto"``, splits on CUDA, where it measured faster (H100, Wan shapes, top-16 lists: 0.57 vs 0.75 ms a call;
``fastar --compile`` 29.32 vs 27.98 frames/s, same run), and makes one kernel call elsewhere (``"kernel"``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .dense import DenseSelfAttention, empty_key_blocks

CHUNK_ATTENTION = ("auto", "kernel", "sdpa")


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
        chunk_attention: str = "auto",
    ) -> None:
        if chunk_attention not in CHUNK_ATTENTION:
            raise ValueError(f"chunk_attention must be one of {', '.join(CHUNK_ATTENTION)}; got {chunk_attention!r}")
        self.chunk_attention = chunk_attention
        self.block_m, self.block_n = block_m, block_n
        self.top_k, self.top_p = top_k, top_p
        self.sink_frames = sink_frames
        self.dense_steps = dense_steps
        self.refresh = refresh
        self.sparse_clean_pass = sparse_clean_pass
        self.dense = DenseSelfAttention()
        # (branch, layer) -> (block ids, counts, the split read's history counts or None), reused buffers
        self._routes: dict[tuple, tuple] = {}
        self._always_ids: dict[tuple, torch.Tensor] = {}
        self._empty: dict[tuple, torch.Tensor | None] = {}  # (branch, layer) -> empty key blocks of the last routing

    def _dense_now(self, store: Any) -> bool:
        step = getattr(store, "step_index", 0)
        committing = getattr(store, "_committing", False)
        return step < self.dense_steps or (committing and not self.sparse_clean_pass)

    def _routing_now(self, store: Any) -> bool:
        """Whether this sparse forward computes routes (else it reuses the chunk's): every one with
        ``refresh="step"``; with ``"chunk"`` the chunk's first sparse forward, which is a function of the step
        alone (not of what ran before), so a replayed CUDA graph and an eager forward agree on it."""
        if self.refresh != "chunk":
            return True
        step = getattr(store, "step_index", 0)
        if getattr(store, "_committing", False):  # the clean pass routes if no denoising step was sparse
            return self.dense_steps >= step
        return step == self.dense_steps

    def graph_signature(self, store: Any) -> tuple | None:
        """``("dense",)``, ``("route",)`` (this forward computes routes: device work only) or ``("routed",)``
        (it reads the routes of the chunk's routing forward, kept in the same buffers every chunk)."""
        if store.chunk is None:
            return None
        if self._dense_now(store):
            return ("dense",)
        return ("route",) if self._routing_now(store) else ("routed",)

    def _always(self, n_hist: int, n_kv_blocks: int, sink_tokens: int, device: torch.device) -> torch.Tensor:
        """Key blocks every query block attends: the sinks' and the chunk's own (and the one it starts in). A
        device tensor made once per layout, so routing copies nothing from the host (a CUDA graph can hold it)."""
        key = (n_hist, n_kv_blocks, sink_tokens, str(device))
        if key not in self._always_ids:
            if len(self._always_ids) >= 8:  # a growing cache makes a new layout every chunk: keep the recent ones
                self._always_ids.pop(next(iter(self._always_ids)))
            ids = list(range(math.ceil(sink_tokens / self.block_n))) + list(range(n_hist // self.block_n, n_kv_blocks))
            self._always_ids[key] = torch.tensor(ids, dtype=torch.long, device=device)
        return self._always_ids[key]

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
        history: Any = None,
    ) -> torch.Tensor:
        from genkv.kernels import block_sparse_attention, pool_quantized_blocks, route_blocks

        chunk = getattr(store, "chunk", None)
        # A quantized cache (history given): key / value are the chunk alone, block ids span history + chunk.
        n_total = key.shape[1] + (0 if history is None else history.length)
        n_kv_blocks = math.ceil(n_total / self.block_n)
        if chunk is None or self._dense_now(store):
            self._record(store, layer_index, 1.0, n_kv_blocks)
            extra = {} if history is None else {"history": history}
            return self.dense.attend(query, key, value, key_bias, backend=backend, parallel_config=parallel_config,
                                     **extra)

        n_cur = query.shape[1]
        n_hist = n_total - n_cur
        sink_tokens = min(self.sink_frames * chunk.tokens_per_frame, n_hist)
        slot = (store.branch, layer_index)
        routes = self._routes.get(slot)
        shape = (query.shape[0], query.shape[2], math.ceil(n_cur / self.block_m), n_kv_blocks)
        if self._routing_now(store) or routes is None or tuple(routes[0].shape) != shape:
            empty = None if key_bias is None else empty_key_blocks(key_bias, self.block_n)
            self._empty[slot] = empty  # for cache_stats' density (history is constant over the chunk)
            # Over codes, block means come from the codes a few blocks at a time (no full-precision history).
            summary = None if history is None else pool_quantized_blocks(history, self.block_n, current_keys=key)
            fresh = route_blocks(
                query, key, block_m=self.block_m, block_n=self.block_n, top_k=self.top_k, top_p=self.top_p,
                always=self._always(n_hist, n_kv_blocks, sink_tokens, query.device), empty_blocks=empty,
                key_summary=summary,
            )
            fresh = (*fresh, self._history_counts(fresh[1], n_hist, n_kv_blocks, query.device))
            if routes is not None and tuple(routes[0].shape) == shape:
                # Into the same buffers every time: the chunk's later forwards (or their CUDA graph) read them.
                for buffer, computed in zip(routes, fresh):
                    if buffer is not None:
                        buffer.copy_(computed)
            else:
                routes = self._routes[slot] = fresh
        indices, counts, history_counts = routes
        self._record(store, layer_index, counts, n_kv_blocks, indices, self._empty.get(slot))
        if history_counts is not None:  # made with the routes exactly when the read splits
            return self._split_read(query, key, value, key_bias, indices, history_counts, n_hist, history)
        return block_sparse_attention(
            query, key, value, indices, counts, key_bias=key_bias, block_m=self.block_m, block_n=self.block_n,
            history=history,
        )

    def splits_read(self, device: torch.device) -> bool:
        """Whether reads on ``device`` take the split path: ``"sdpa"``, or ``"auto"`` on CUDA."""
        return self.chunk_attention == "sdpa" or (self.chunk_attention == "auto" and device.type == "cuda")

    def _history_counts(self, counts: torch.Tensor, n_hist: int, n_kv_blocks: int,
                        device: torch.device) -> torch.Tensor | None:
        """The split read's counts, made once per routing (not per attention call): lists are ascending and end
        with every block wholly inside the chunk (routing forces them), so dropping those from each count leaves
        the history blocks, the straddling one included. None for the single kernel call."""
        if not self.splits_read(device):
            return None
        return counts - (n_kv_blocks - math.ceil(n_hist / self.block_n))

    def _split_read(self, query, key, value, key_bias, indices, history_counts, n_hist: int, history):
        """The chunk's own keys by dense SDPA, then the kernel resumes over the listed history blocks
        (``history_counts`` entries of each list): it reads the straddling block up to key ``n_hist``, where its
        K/V end. The chunk's key bias is 0 (a staged token stands for itself), so the dense part needs none."""
        from genkv.kernels import block_sparse_attention, dense_attention_with_lse

        n_cur = query.shape[1]
        start = key.shape[1] - n_cur  # bf16 cache: after the history; quantized: key is the chunk alone
        partial = dense_attention_with_lse(query, key[:, start:], value[:, start:])
        if n_hist == 0:
            return partial[0]
        k_hist, v_hist = (key[:, :0], value[:, :0]) if history is not None else (key[:, :n_hist], value[:, :n_hist])
        return block_sparse_attention(
            query, k_hist, v_hist, indices, history_counts,
            key_bias=None if key_bias is None else key_bias[:, :n_hist], block_m=self.block_m,
            block_n=self.block_n, history=history, initial=partial,
        )

    def _record(self, store: Any, layer_index: int, counts: Any, n_kv_blocks: int, indices: Any = None,
                empty: Any = None) -> None:
        """Keep what cache_stats needs for the attended density (device tensors, references only: no sync and no
        work until someone asks): the block lists and which key blocks are empty slots (never counted)."""
        if store is not None:
            value = (counts, n_kv_blocks, indices, empty) if isinstance(counts, torch.Tensor) else float(counts)
            store.read_stats[("self_density", layer_index)] = value
