"""``annca``: top-k prompt tokens per frame in cross-attention (padding folded exactly); full cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..keep.full import KeepAll
from ..read.annca import TopKPromptAttention
from ..registry import register_method
from .base import GenKVMethod


@register_method
@dataclass
class AnnCA(GenKVMethod):
    """AnnCA (FAST-AR): each frame reads only the prompt tokens most relevant to it.

    Args:
        top_k: real prompt tokens kept per frame and head (padding never counts and is folded into one exact key).
        per: ``"frame"`` (one selection per latent frame) or ``"chunk"`` (one per chunk).

    Example:
        >>> import genkv
        >>> genkv.get_method("annca", top_k=16).top_k
        16
    """

    name: ClassVar[str] = "annca"
    top_k: int = 32
    per: str = "frame"

    def validate(self) -> None:
        self.require_int("top_k", minimum=1)
        if self.per not in ("frame", "chunk"):
            self._fail("per", "'frame' or 'chunk'")

    def build_keeper(self) -> KeepAll:
        return KeepAll()

    def build_cross_reader(self) -> TopKPromptAttention:
        return TopKPromptAttention(self.top_k, self.per)
