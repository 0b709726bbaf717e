"""``tempcache``: merge temporally duplicated keys (log-count bias), hard token budget; dense attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..keep.tempcache import MATCH_MODES, TemporalMerge
from ..registry import register_method
from .base import GenKVMethod


def validate_temporal_merge(method: GenKVMethod) -> None:
    """The merge fields ``tempcache`` and ``fastar`` share (threshold ... max_count), checked in one place."""
    method.require_float("threshold", -1.0, 2.0)
    method.require_int("radius", minimum=0, maximum=8)
    method.require_int("sink_frames", minimum=0)
    method.require_int("budget_frames", minimum=method.sink_frames + 1)
    if method.max_tokens is not None:
        method.require_int("max_tokens", minimum=1)
    if method.match not in MATCH_MODES:
        method._fail("match", "'content' or 'stored'")
    if method.max_count is not None:
        method.require_int("max_count", minimum=1)


def build_temporal_merge(method: GenKVMethod) -> TemporalMerge:
    """The TempCache keeper of a method with the shared merge fields."""
    return TemporalMerge(method.threshold, method.radius, method.sink_frames, method.budget_frames,
                         method.max_tokens, method.match, method.max_count)


@register_method
@dataclass
class TempCache(GenKVMethod):
    """TempCache (FAST-AR): keys that repeat across frames collapse into one key + ``log(count)`` bias.

    Args:
        threshold: cosine similarity (minimum over heads) at which a new key joins its previous-frame
            correspondent; above 1 never merges. With ``match="stored"``, 1.0 merges exact duplicates only
            (exact attention).
        match: ``"content"`` compares keys with RoPE's relative rotation undone (a key that repeats one frame
            later matches although RoPE turned it); ``"stored"`` compares them as attention sees them.
        radius: spatial neighbourhood (in tokens) searched in the previous frame; 0 = same position only.
        sink_frames: first latent frames kept verbatim forever (never merged, never evicted).
        budget_frames: history token budget per layer, in frames' worth of tokens (18 history frames + the
            3-frame chunk = the KV memory of Self-Forcing's 21-frame window, ``rolling``'s default).
        max_tokens: token budget per layer in tokens; overrides ``budget_frames`` when set.
        max_count: cap on the tokens a group stands for (None: no cap, exact for exact duplicates). Capped, its
            ``log(count)`` bias stops at ``log(max_count)`` and, once full, its value is a running average that
            gives each new member ``1 / max_count`` (see ``genkv.keep.tempcache``): long static stretches no longer
            outweigh the present.

    Example:
        >>> import genkv
        >>> genkv.get_method("tempcache", threshold=0.9, budget_frames=12).budget_frames
        12
    """

    name: ClassVar[str] = "tempcache"
    budget_field: ClassVar[str | None] = "budget_frames"  # what budget_bytes sets
    threshold: float = 0.95
    radius: int = 1
    sink_frames: int = 0
    budget_frames: int = 18
    max_tokens: int | None = None
    match: str = "content"
    max_count: int | None = None

    def validate(self) -> None:
        validate_temporal_merge(self)

    def build_keeper(self) -> TemporalMerge:
        return build_temporal_merge(self)
