"""``scalekv``: scale-aware KV budgets for next-scale (VAR) models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..registry import register_method
from ..scales.budgets import ScaleBudgets
from ..scales.cache import BudgetedScaleCache, uniform_caps
from .base import GenKVMethod


@register_method
@dataclass
class ScaleKV(GenKVMethod):
    """ScaleKV: after each scale every layer keeps at most its budgeted tokens, chosen by the attention of an
    observation window of the current scale; drafter layers get more than refiners (``genkv calibrate``).

    Args:
        budget: fraction of the full cache kept, in (0, 1]; 1.0 keeps everything (identical to the full cache).
        budgets: a JSON file from ``genkv calibrate`` (per-layer, per-scale caps); without it every layer gets
            the uniform share ``floor(budget x tokens so far)``.
        window: observation-window queries per scale (a square grid of patch centres).
        pool_kernel: max-pool width smoothing the token scores along the sequence.

    Example:
        >>> import genkv, torch
        >>> from genkv.testing import tiny_var_pipeline
        >>> pipe = genkv.apply_genkv(tiny_var_pipeline(), "scalekv", budget=0.5)
        >>> images = pipe(class_labels=[3], generator=torch.Generator().manual_seed(0), output_type="np").images
        >>> genkv.cache_stats(pipe)["method"]
        'scalekv'
    """

    name: ClassVar[str] = "scalekv"
    kv_dtypes: ClassVar[tuple[str, ...]] = ("bf16",)  # its scale cache (genkv.scales) is not quantized
    budget: float = 0.1
    budgets: str | None = None
    window: int = 16
    pool_kernel: int = 5

    def validate(self) -> None:
        self.require_float("budget", 0.0, 1.0, low_open=True)
        self.require_int("window", minimum=1)
        self.require_int("pool_kernel", minimum=1)
        if self.pool_kernel % 2 == 0:
            self._fail("pool_kernel", "odd")

    def build_scale_cache(self, depth: int, patch_nums: tuple[int, ...], num_heads: int | None = None
                          ) -> BudgetedScaleCache:
        if self.budgets is not None:
            caps = ScaleBudgets.load(self.budgets, depth=depth, patch_nums=patch_nums).caps
        else:
            caps = uniform_caps(depth, patch_nums, self.budget)
        return BudgetedScaleCache(depth, patch_nums, caps, window=self.window, pool_kernel=self.pool_kernel)
