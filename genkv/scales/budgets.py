"""ScaleKV budgets: calibrate which layers draft (spread attention over earlier scales) and which refine (look at
the current scale), then give drafters a large share of the KV budget and refiners the rest.

Calibration runs the full cache on a few classes and measures, per (layer, scale), the attention selectivity
``ASI = (attention mass on the current scale) x (mass of the top-K' history tokens)`` averaged over queries,
heads and samples (K' = the budget's share of the history). Per scale the layers are ranked by the z-score of
their ASI; the ``drafter_fraction`` lowest are drafters. Drafters keep up to ``drafter_boost`` x the uniform
budget (never more than every token), refiners share what is left, so each scale's total stays at ``budget``
of the full cache. ScaleKV's refiner budget also decays linearly with the scale; that refinement is not
implemented here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .cache import FullScaleCache, uniform_caps
from .official import is_official_format, read_budgets_json


@dataclass
class ScaleBudgets:
    """Tokens kept per layer after each scale, and how they were chosen. Round-trips through JSON."""

    depth: int
    patch_nums: list[int]
    budget: float
    caps: list[list[int]]
    drafters: dict[str, list[int]] = field(default_factory=dict)
    asi: list[list[float]] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path, depth: int | None = None,
             patch_nums: tuple[int, ...] | None = None) -> "ScaleBudgets":
        """Read a budgets file; with ``depth`` / ``patch_nums`` given, refuse one made for another model."""
        path = Path(path)
        data = read_budgets_json(path)
        if is_official_format(data):
            raise ValueError(f"budgets file {str(path)!r} is an official ScaleKV file; use it with mode='official'")
        try:
            budgets = cls(**data)
        except TypeError as err:
            raise ValueError(f"budgets file {str(path)!r} is not a genkv budgets JSON ({err})") from None
        if depth is not None and budgets.depth != depth:
            raise ValueError(f"budgets file {str(path)!r} was calibrated for depth {budgets.depth}, this model has "
                             f"depth {depth}; calibrate this model with `genkv calibrate`")
        if patch_nums is not None and tuple(budgets.patch_nums) != tuple(patch_nums):
            raise ValueError(f"budgets file {str(path)!r} is for scales {budgets.patch_nums}, this model uses "
                             f"{list(patch_nums)}")
        return budgets


class _SelectivityProbe(FullScaleCache):
    """A full cache that also accumulates each (layer, scale)'s attention selectivity."""

    def __init__(self, num_layers: int, patch_nums: tuple[int, ...], budget: float) -> None:
        super().__init__(num_layers, patch_nums)
        self.budget = budget
        self.sums = torch.zeros(num_layers, len(patch_nums), dtype=torch.float64)
        self.counts = torch.zeros(num_layers, len(patch_nums), dtype=torch.float64)

    def attend(self, layer, scale, q, k, v):
        history = 0 if self.k[layer] is None else self.k[layer].shape[2]
        if history:
            keys = torch.cat([self.k[layer], k], dim=2)
            probs = torch.softmax(q.float() @ keys.float().transpose(-1, -2), dim=-1)
            current = probs[..., history:].sum(-1)
            top = max(1, math.ceil(self.budget * history))
            top_history = probs[..., :history].topk(min(top, history), dim=-1).values.sum(-1)
            self.sums[layer, scale] += float((current * top_history).mean())
            self.counts[layer, scale] += 1
        return super().attend(layer, scale, q, k, v)


@torch.no_grad()
def calibrate(pipe, class_labels: list[int], budget: float, drafter_fraction: float = 0.1,
              drafter_boost: float = 4.0, seed: int = 0, guidance_scale: float = 4.0) -> ScaleBudgets:
    """Measure layer selectivity on ``class_labels`` with the full cache and derive budgets (module docstring).

    Example:
        >>> from genkv.testing import tiny_var_pipeline
        >>> budgets = calibrate(tiny_var_pipeline(), [0, 1], budget=0.5)
        >>> len(budgets.caps) == budgets.depth
        True
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    config = pipe.transformer.config
    depth, patch_nums = config.depth, tuple(config.patch_nums)
    probe = _SelectivityProbe(depth, patch_nums, budget)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pipe(class_labels=list(class_labels), guidance_scale=guidance_scale, generator=generator, output_type="np",
         kv_cache=probe)
    asi = (probe.sums / probe.counts.clamp(min=1)).float()
    caps = uniform_caps(depth, patch_nums, budget)
    drafters: dict[str, list[int]] = {}
    n_drafters = max(1, round(drafter_fraction * depth)) if depth > 1 else 0
    seen = 0
    for s, p in enumerate(patch_nums):
        seen += p * p
        if s == 0 or s == len(patch_nums) - 1 or n_drafters == 0:
            continue
        z = (asi[:, s] - asi[:, s].mean()) / (asi[:, s].std(unbiased=False) + 1e-8)
        chosen = sorted(torch.argsort(z)[:n_drafters].tolist())
        total = sum(caps[layer][s] for layer in range(depth))
        drafter_cap = min(seen, int(drafter_boost * caps[0][s]), total // n_drafters)
        refiner_cap = (total - n_drafters * drafter_cap) // (depth - n_drafters)
        for layer in range(depth):
            caps[layer][s] = drafter_cap if layer in chosen else refiner_cap
        drafters[str(s)] = chosen
    return ScaleBudgets(depth, list(patch_nums), budget, caps, drafters, asi.tolist())
