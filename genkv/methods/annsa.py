"""``annsa``: routed block-sparse self-attention over the full cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..keep.full import KeepAll
from ..read.annsa import CHUNK_ATTENTION, RoutedSelfAttention
from ..registry import register_method
from .base import GenKVMethod


@dataclass
class SparseReadFields:
    """The routing knobs shared by ``annsa`` and ``fastar``."""

    top_k: int | None = 16
    top_p: float | None = None
    block_m: int = 128
    block_n: int = 128
    dense_steps: int = 0
    refresh: str = "chunk"
    sparse_clean_pass: bool = True
    chunk_attention: str = "auto"


def validate_sparse_read(method: GenKVMethod) -> None:
    if method.top_k is None and method.top_p is None:
        method._fail("top_k", "set (or top_p set): with neither, every block is read")
    if method.top_k is not None:
        method.require_int("top_k", minimum=1)
    if method.top_p is not None:
        method.require_float("top_p", 0.0, 1.0, low_open=True)
    for field in ("block_m", "block_n"):
        method.require_int(field, minimum=16)
        if getattr(method, field) & (getattr(method, field) - 1):
            method._fail(field, "a power of two")
    method.require_int("dense_steps", minimum=0)
    if method.refresh not in ("chunk", "step"):
        method._fail("refresh", "'chunk' or 'step'")
    if method.chunk_attention not in CHUNK_ATTENTION:
        method._fail("chunk_attention", "'auto', 'kernel' or 'sdpa'")


def build_sparse_reader(method: GenKVMethod, sink_frames: int = 0) -> RoutedSelfAttention:
    return RoutedSelfAttention(
        block_m=method.block_m, block_n=method.block_n, top_k=method.top_k, top_p=method.top_p,
        sink_frames=sink_frames, dense_steps=method.dense_steps, refresh=method.refresh,
        sparse_clean_pass=method.sparse_clean_pass, chunk_attention=method.chunk_attention,
    )


@register_method
@dataclass
class AnnSA(SparseReadFields, GenKVMethod):
    """AnnSA (FAST-AR): each 128-query block reads only its top-k 128-key blocks (+ sinks + its own chunk).

    Args:
        top_k: key blocks kept per query block and head (besides sink and own-chunk blocks).
        top_p: alternatively, keep blocks until their softmax mass over block scores reaches ``top_p``.
        block_m, block_n: query / key block sizes (powers of two).
        dense_steps: first denoising steps of each chunk that stay dense.
        refresh: ``"chunk"`` (route once per chunk; history keys are constant within it) or ``"step"``.
        sparse_clean_pass: route the clean K/V pass too (else it is dense).
        chunk_attention: ``"kernel"`` (one block-sparse call), ``"sdpa"`` (the chunk's own keys by dense SDPA,
            cuDNN on CUDA, and the kernel resuming over the routed history; the same attention) or ``"auto"``
            (``"sdpa"`` on CUDA, where it is faster, else ``"kernel"``).
        sink_frames: frames whose blocks every query reads.

    Example:
        >>> import genkv
        >>> genkv.get_method("annsa", top_k=8).top_k
        8
    """

    name: ClassVar[str] = "annsa"
    sink_frames: int = 0

    def validate(self) -> None:
        validate_sparse_read(self)
        self.require_int("sink_frames", minimum=0)

    def build_keeper(self) -> KeepAll:
        return KeepAll()

    def build_self_reader(self) -> RoutedSelfAttention:
        return build_sparse_reader(self, self.sink_frames)
