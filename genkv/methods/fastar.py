"""``fastar``: TempCache + AnnSA + AnnCA (FAST-AR), bounded memory and sparse reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..keep.tempcache import MATCH_MODES, TemporalMerge
from ..read.annca import TopKPromptAttention
from ..read.annsa import RoutedSelfAttention
from ..registry import register_method
from .annsa import SparseReadFields, build_sparse_reader, validate_sparse_read
from .base import GenKVMethod


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
        self.require_float("threshold", -1.0, 2.0)
        self.require_int("radius", minimum=0, maximum=8)
        self.require_int("sink_frames", minimum=0)
        self.require_int("budget_frames", minimum=self.sink_frames + 1)
        if self.max_tokens is not None:
            self.require_int("max_tokens", minimum=1)
        if self.match not in MATCH_MODES:
            self._fail("match", "'content' or 'stored'")
        if self.max_count is not None:
            self.require_int("max_count", minimum=1)
        validate_sparse_read(self)
        self.require_int("prompt_top_k", minimum=1)
        if self.per not in ("frame", "chunk"):
            self._fail("per", "'frame' or 'chunk'")

    def build_keeper(self) -> TemporalMerge:
        keeper = TemporalMerge(
            self.threshold, self.radius, self.sink_frames, self.budget_frames, self.max_tokens, self.match,
            self.max_count,
        )
        keeper.method_name = "fastar"
        return keeper

    def build_self_reader(self) -> RoutedSelfAttention:
        return build_sparse_reader(self, self.sink_frames)

    def build_cross_reader(self) -> TopKPromptAttention:
        return TopKPromptAttention(self.prompt_top_k, self.per)
