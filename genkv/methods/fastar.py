"""``fastar``: TempCache + AnnSA + AnnCA (FAST-AR), bounded memory and sparse reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..keep.tempcache import TemporalMerge
from ..read.annca import TopKPromptAttention
from ..read.annsa import RoutedSelfAttention
from ..registry import register_method
from .annsa import SparseReadFields, build_sparse_reader, validate_sparse_read
from .base import GenKVMethod
from .tempcache import build_temporal_merge, validate_temporal_merge


@register_method
@dataclass
class FastAR(SparseReadFields, GenKVMethod):
    """The three FAST-AR parts together: merged, budgeted keys; routed self-attention; top-k prompt tokens.

    Fields are those of ``tempcache`` (threshold, radius, sink_frames, budget_frames, max_tokens, match, max_count),
    ``annsa`` (top_k, top_p, block sizes, dense_steps, refresh, sparse_clean_pass) and ``annca`` (prompt_top_k, per).
    Presets: ``configs/fastar.yaml`` (default), ``fastar_fast.yaml``, ``fastar_fidelity.yaml``.

    Example:
        >>> import genkv
        >>> genkv.get_method("fastar").budget_frames
        18
    """

    name: ClassVar[str] = "fastar"
    budget_field: ClassVar[str | None] = "budget_frames"  # what budget_bytes sets
    threshold: float = 0.95
    radius: int = 1
    sink_frames: int = 1
    budget_frames: int = 18
    max_tokens: int | None = None
    match: str = "content"
    max_count: int | None = None
    prompt_top_k: int = 32
    per: str = "frame"

    def validate(self) -> None:
        validate_temporal_merge(self)
        validate_sparse_read(self)
        self.require_int("prompt_top_k", minimum=1)
        if self.per not in ("frame", "chunk"):
            self._fail("per", "'frame' or 'chunk'")

    def build_keeper(self) -> TemporalMerge:
        keeper = build_temporal_merge(self)
        keeper.method_name = "fastar"
        return keeper

    def build_self_reader(self) -> RoutedSelfAttention:
        return build_sparse_reader(self, self.sink_frames)

    def build_cross_reader(self) -> TopKPromptAttention:
        return TopKPromptAttention(self.prompt_top_k, self.per)
