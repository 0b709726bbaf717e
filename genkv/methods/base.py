"""The method base class: a ``@dataclass`` whose fields are the method's config.

A method answers the three questions of the cache (see docs/ARCHITECTURE.md): which K/V are *kept*
(a keeper), which kept keys each query *reads* (a self-attention reader) and which prompt tokens each frame
reads (a cross-attention reader). A method is one small class that validates its fields and builds those
three parts; the base class does the shared work: validation helpers, ``--set`` string coercion, copies.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..cache import KV_DTYPES
from ..keep.base import CacheKeeper
from ..read.dense import DenseCrossAttention, DenseSelfAttention


@dataclass
class GenKVMethod:
    """Base of every method config. Subclasses set ``name`` and override :meth:`validate` / ``build_*``.

    Args:
        kv_dtype: storage of the committed history: bf16 (the model's dtype), or fp8, int8, int4 codes
            (about 0.51x, 0.51x and 0.26x the bytes); the chunk being denoised stays in the model's dtype.
        budget_bytes: memory for the self-attention cache (all layers, one CFG branch, batch 1) instead of a
            frame budget: a bounded method takes the most frames that fit (``cache_stats(...)["budget"]``).
    """

    name: ClassVar[str] = ""
    #: kv_dtype values this method's cache can store its history in (the scale caches: bf16 only)
    kv_dtypes: ClassVar[tuple[str, ...]] = KV_DTYPES

    #: storage of the committed history: the model's dtype ("bf16"), or quantized codes ("fp8", "int8",
    #: "int4"; genkv.kernels.quant_kv). Keyword-only and out of the repr, so positional use and reprs stay as
    #: they were.
    kv_dtype: str = field(default="bf16", kw_only=True, repr=False)
    #: the frame budget ``budget_bytes`` replaces (None: the method keeps every token, so it takes no byte budget)
    budget_field: ClassVar[str | None] = None
    budget_bytes: int | None = field(default=None, kw_only=True, repr=False)

    def __post_init__(self) -> None:
        if self.kv_dtype not in self.kv_dtypes:
            raise ValueError(f"{self.name}: kv_dtype must be one of {', '.join(self.kv_dtypes)}, got {self.kv_dtype!r}")
        if self.budget_bytes is not None:
            if self.budget_field is None:
                raise ValueError(f"{self.name}: budget_bytes needs a bounded method (rolling, tempcache, fastar); "
                                 f"{self.name} keeps every token")
            self.require_int("budget_bytes", minimum=1)
        self.validate()

    # -- to override ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field."""

    def build_keeper(self) -> CacheKeeper:
        return CacheKeeper()

    def build_self_reader(self) -> DenseSelfAttention:
        return DenseSelfAttention()

    def build_cross_reader(self) -> DenseCrossAttention:
        return DenseCrossAttention()

    # -- shared --------------------------------------------------------------------------------------
    def _fail(self, field: str, expectation: str) -> None:
        raise ValueError(f"{self.name}: {field} must be {expectation}, got {getattr(self, field)!r}")

    def require_int(self, field: str, minimum: int | None = None, maximum: int | None = None) -> None:
        value = getattr(self, field)
        bounds = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        bounds += f" and <= {maximum}" if maximum is not None else ""
        if isinstance(value, bool) or not isinstance(value, int):
            self._fail(field, bounds)
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            self._fail(field, bounds)

    def require_float(self, field: str, low: float, high: float, *, low_open: bool = False) -> None:
        value = getattr(self, field)
        interval = f"a number in {'(' if low_open else '['}{low}, {high}]"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(field, interval)
        if value > high or value < low or (low_open and value == low):
            self._fail(field, interval)

    @classmethod
    def field_names(cls) -> list[str]:
        """The settings, the method's own first (kv_dtype and budget_bytes, shared by all, last)."""
        shared = ["kv_dtype", "budget_bytes"]
        return [f.name for f in dataclasses.fields(cls) if f.name not in shared] + shared

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        # the defaults of the settings every method shares: configs (and their reports) read as they did before
        for name, default in (("kv_dtype", "bf16"), ("budget_bytes", None)):
            if fields[name] == default:
                del fields[name]
        return {"method": self.name, **fields}

    def replace(self, **overrides: Any) -> "GenKVMethod":
        """A validated copy with ``overrides`` applied; strings are parsed to the field's type (``--set``)."""
        return dataclasses.replace(self, **self._coerce(overrides))

    @classmethod
    def from_overrides(cls, **overrides: Any) -> "GenKVMethod":
        return cls(**cls._coerce(overrides))

    @classmethod
    def _coerce(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        valid = cls.field_names()
        out = {}
        for key, value in overrides.items():
            if key not in valid:
                raise ValueError(
                    f"unknown setting {key!r} for method {cls.name!r}; valid settings: {', '.join(valid) or 'none'}"
                )
            out[key] = _parse(value, hints[key], f"{cls.name}: {key}") if isinstance(value, str) else value
        return out


def _parse(text: str, annotation: Any, where: str) -> Any:
    """Parse a ``--set`` string into ``annotation`` (int, float, bool, str, or ``X | None``)."""
    args = typing.get_args(annotation)
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    if is_union and type(None) in args:
        if text.strip().lower() in ("none", "null", ""):
            return None
        annotation = next(a for a in args if a is not type(None))
    try:
        if annotation is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
    except ValueError:
        kind = {bool: "true/false", int: "an integer", float: "a number"}[annotation]
        raise ValueError(f"{where} expects {kind}, got {text!r}") from None
    return text
