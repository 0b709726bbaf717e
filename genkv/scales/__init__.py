"""KV caches and budgets for next-scale (VAR-style) generation."""

from .budgets import ScaleBudgets, calibrate
from .cache import BudgetedScaleCache, FullScaleCache, uniform_caps

__all__ = ["BudgetedScaleCache", "FullScaleCache", "ScaleBudgets", "calibrate", "uniform_caps"]
