"""``full``: the exact, growing cache (the reference every other method is measured against)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..keep.full import KeepAll
from ..registry import register_method
from .base import GenKVMethod


@register_method
@dataclass
class Full(GenKVMethod):
    """Keep every committed token; dense attention. Memory grows with every chunk.

    Example:
        >>> import genkv
        >>> genkv.get_method("full")
        Full()
    """

    name: ClassVar[str] = "full"

    def build_keeper(self) -> KeepAll:
        return KeepAll()
