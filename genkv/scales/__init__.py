"""KV caches and budgets for next-scale (VAR-style) generation."""

from .budgets import ScaleBudgets, calibrate
from .cache import BudgetedScaleCache, FullScaleCache, uniform_caps
from .official import OfficialScaleCache, load_official_budgets, official_style_caps

__all__ = ["BudgetedScaleCache", "FullScaleCache", "OfficialScaleCache", "ScaleBudgets", "calibrate",
           "load_official_budgets", "official_style_caps", "uniform_caps"]
