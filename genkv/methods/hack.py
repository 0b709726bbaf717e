"""``hack``: head-aware KV budgets for next-scale (VAR) models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..registry import register_method
from ..scales.heads import HeadAwareScaleCache, load_head_roles
from .base import GenKVMethod
from .scalekv import MODES


@register_method
@dataclass
class HACK(GenKVMethod):
    """HACK: contextual heads (few semantic keys) keep a small budget, structural heads (spatial layout) keep the
    first two scales, the newest scale and the most attended tokens (see :mod:`genkv.scales.heads`).

    Args:
        budget: fraction of the full cache kept, in (0, 1]; 1.0 keeps everything (identical to the full cache).
        alpha: fraction of heads treated as contextual.
        contextual_share: a contextual head's budget as a fraction of the average per-head budget.
        observations: current-scale queries whose attention scores the tokens.
        roles: a JSON file from ``genkv calibrate --method hack``; without it each layer's heads are classified
            at the first scale that has history.
        merge: merge evicted tokens into their most similar kept key (mean value, ``log(count)`` logit bias)
            instead of dropping them; the counts count against the budget.
        mode: "official" (the paper's rule): structural heads always keep the first two scales and the newest
            scale, at any budget; the contextual heads take what the layer's budget has left, and when the
            layout set alone exceeds the budget the layer keeps more than ``budget``. "genkv": every layer stays
            within ``budget``, a structural cap below the layout set keeping part of it (genkv's earlier rule).

    Example:
        >>> import genkv, torch
        >>> from genkv.testing import tiny_var_pipeline
        >>> pipe = genkv.apply_genkv(tiny_var_pipeline(), "hack", budget=0.3)
        >>> images = pipe(class_labels=[3], generator=torch.Generator().manual_seed(0), output_type="np").images
        >>> genkv.cache_stats(pipe)["method"]
        'hack'
    """

    name: ClassVar[str] = "hack"
    kv_dtypes: ClassVar[tuple[str, ...]] = ("bf16",)  # its scale cache (genkv.scales) is not quantized
    budget: float = 0.3
    alpha: float = 0.5
    contextual_share: float = 0.3
    observations: int = 32
    roles: str | None = None
    merge: bool = False
    mode: str = "official"

    def validate(self) -> None:
        self.require_float("budget", 0.0, 1.0, low_open=True)
        self.require_float("alpha", 0.0, 1.0)
        self.require_float("contextual_share", 0.0, 1.0)
        self.require_int("observations", minimum=1)
        if not isinstance(self.merge, bool):
            self._fail("merge", "true or false")
        if self.mode not in MODES:
            self._fail("mode", " or ".join(MODES))

    def build_scale_cache(self, depth: int, patch_nums: tuple[int, ...], num_heads: int | None = None):
        roles = load_head_roles(self.roles, depth, num_heads) if self.roles is not None else None
        return HeadAwareScaleCache(depth, patch_nums, self.budget, alpha=self.alpha,
                                   contextual_share=self.contextual_share, observations=self.observations,
                                   contextual=roles, merge=self.merge, keep_layout=self.mode == "official")
