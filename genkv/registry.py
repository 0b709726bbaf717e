"""The method registry: names → method classes, and YAML presets shipped in ``configs/``."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

if TYPE_CHECKING:  # pragma: no cover
    from .methods.base import GenKVMethod

_METHODS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_method(cls: T) -> T:
    """Class decorator: make ``cls`` available to ``apply_genkv(..., cls.name)``."""
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` class attribute to be registered")
    _METHODS[name] = cls
    return cls


def _ensure_loaded() -> None:
    from . import methods  # noqa: F401  (importing registers the built-in methods)


def list_methods() -> list[str]:
    """Names of the registered methods.

    Example:
        >>> import genkv
        >>> "rolling" in genkv.list_methods()
        True
    """
    _ensure_loaded()
    return sorted(_METHODS)


def list_presets() -> list[str]:
    """Names of the YAML presets shipped in ``configs/`` (usable wherever a method name is)."""
    return sorted(p.name[: -len(".yaml")] for p in importlib.resources.files("genkv.configs").iterdir()
                  if p.name.endswith(".yaml"))


def load_preset(name_or_path: str | Path, **overrides: Any) -> "GenKVMethod":
    """Load a preset by name (``"longlive"``) or path (``configs/longlive.yaml``) into a method config."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} not found; shipped presets: {', '.join(list_presets())}")
        text = path.read_text()
    else:
        resource = importlib.resources.files("genkv.configs") / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise ValueError(f"unknown preset {str(name_or_path)!r}; shipped presets: {', '.join(list_presets())}")
        text = resource.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config {str(name_or_path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or "method" not in data:
        raise ValueError(f"config {str(name_or_path)!r} must be a mapping with a 'method:' key")
    method = data.pop("method")
    data.update(overrides)
    return get_method(method, **data)


def get_method(method: "str | GenKVMethod", **overrides: Any) -> "GenKVMethod":
    """Resolve a method name, preset name or config object (plus overrides) into a validated config.

    Example:
        >>> import genkv
        >>> genkv.get_method("longlive").window_frames
        9
    """
    _ensure_loaded()
    from .methods.base import GenKVMethod

    if isinstance(method, GenKVMethod):
        return method.replace(**overrides) if overrides else method
    if not isinstance(method, str):
        raise TypeError(f"method must be a name or a GenKVMethod config, got {type(method).__name__}")
    if method in _METHODS:
        return _METHODS[method].from_overrides(**overrides)
    if method.endswith((".yaml", ".yml")) or method in list_presets():
        return load_preset(method, **overrides)
    raise ValueError(
        f"unknown method {method!r}; valid methods: {', '.join(list_methods())}; presets: {', '.join(list_presets())}"
    )
