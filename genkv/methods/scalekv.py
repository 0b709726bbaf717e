"""``scalekv``: scale-aware KV budgets for next-scale (VAR) models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..registry import register_method
from ..scales.budgets import ScaleBudgets
from ..scales.cache import BudgetedScaleCache, uniform_caps
from ..scales.official import (OfficialScaleCache, is_official_format, load_official_budgets, official_style_caps,
                               read_budgets_json)
from .base import GenKVMethod

MODES = ("official", "genkv")


@register_method
@dataclass
class ScaleKV(GenKVMethod):
    """ScaleKV: after each scale every layer keeps at most its budgeted tokens, chosen by the attention of an
    observation window of the current scale; drafter layers get more than refiners.

    ``mode="official"`` (the default) follows the authors' code (github StargazerX0/ScaleKV, see
    :mod:`genkv.scales.official`): absolute caps per (layer, scale) from an official ``budgets/*.json`` or, without
    one, official-style caps for ``budget``; nothing is compressed until a cache exceeds ``base_capacity``
    tokens; the window is the official grid of patch centres, scored by summed raw logits; the start token is
    never evicted. ``mode="genkv"`` is genkv's earlier rule: ``floor(budget x tokens so far)`` per layer at every
    scale (or a ``genkv calibrate`` file), softmax scores, so every scale's cache stays within ``budget``.

    Args:
        budget: fraction of the full cache kept, in (0, 1]; 1.0 keeps everything (identical to the full cache).
            Official mode: each layer's mean cap is ``budget`` x the largest cache ever kept.
        budgets: official mode: an official ScaleKV ``budgets/*.json`` (as shipped: Infinity, 13 scales);
            genkv mode: a JSON file from ``genkv calibrate``.
        mode: "official" or "genkv" (above).
        window: observation-window queries per scale (a square grid of patch centres).
        pool_kernel: max-pool width smoothing the token scores along the sequence.
        base_capacity: official mode: no compression until a cache exceeds this many tokens (None: the mean cap,
            as the official scripts pass 650 with the 650-token "10%" files; with a file, its first scale).
        drafters: official mode without a file: the layers that keep their whole cache, comma-separated
            (the official files' drafters are layers {0, 23} for Infinity-2B, {0, 1, 2} for 8B; layer 0 in both).
        keep_start: official mode: never evict the start/class token (the official code may).

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
    mode: str = "official"
    window: int = 16
    pool_kernel: int = 5
    base_capacity: int | None = None
    drafters: str = "0"
    keep_start: bool = True

    def validate(self) -> None:
        self.require_float("budget", 0.0, 1.0, low_open=True)
        self.require_int("window", minimum=1)
        self.require_int("pool_kernel", minimum=1)
        if self.pool_kernel % 2 == 0:
            self._fail("pool_kernel", "odd")
        if self.mode not in MODES:
            self._fail("mode", " or ".join(MODES))
        if self.base_capacity is not None:
            self.require_int("base_capacity", minimum=0)
        if not isinstance(self.keep_start, bool):
            self._fail("keep_start", "true or false")
        self.drafter_layers()
        if self.budgets is not None and not Path(self.budgets).is_file():  # say so now, not at the first image
            read_budgets_json(self.budgets)

    def drafter_layers(self) -> tuple[int, ...]:
        """``drafters`` as layer indices."""
        try:
            return tuple(sorted({int(x) for x in str(self.drafters).split(",") if x.strip()}))
        except ValueError:
            self._fail("drafters", "comma-separated layer indices, e.g. '0,23'")

    def build_scale_cache(self, depth: int, patch_nums: tuple[int, ...], num_heads: int | None = None
                          ) -> BudgetedScaleCache | OfficialScaleCache:
        if self.mode == "genkv":
            if self.budgets is not None:
                caps = ScaleBudgets.load(self.budgets, depth=depth, patch_nums=patch_nums).caps
            else:
                caps = uniform_caps(depth, patch_nums, self.budget)
            return BudgetedScaleCache(depth, patch_nums, caps, window=self.window, pool_kernel=self.pool_kernel)
        if self.budgets is not None:
            if not is_official_format(read_budgets_json(self.budgets)):
                raise ValueError(f"budgets file {self.budgets!r} is a `genkv calibrate` file; use it with "
                                 f"mode='genkv' (mode='official' reads the official ScaleKV budgets/*.json)")
            official = load_official_budgets(self.budgets, depth, patch_nums, self.base_capacity)
        else:
            drafters = self.drafter_layers()
            if drafters and (drafters[0] < 0 or drafters[-1] >= depth):
                raise ValueError(f"scalekv: drafters {list(drafters)} must be layers 0..{depth - 1} of this model")
            official = official_style_caps(depth, patch_nums, self.budget, drafters, self.window,
                                           base_capacity=self.base_capacity)
        return OfficialScaleCache(depth, patch_nums, official.caps, official.base_capacity, window=self.window,
                                  pool_kernel=self.pool_kernel, keep_start=self.keep_start)
