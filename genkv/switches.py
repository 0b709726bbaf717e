"""Opt-in switches read from the environment, and the optional Triton kernels they turn on.

One rule for every ``GENKV_*`` on/off variable: ``1`` / ``true`` / ``on`` / ``yes`` turn a switch on, ``0`` /
``false`` / ``off`` / ``no`` / empty turn it off (any case), anything else (or unset) leaves the default.
Modules read their switches once, at import, where a compiled graph must not see them change.

Example:
    >>> import os
    >>> os.environ["GENKV_EXAMPLE_SWITCH"] = "off"
    >>> env_flag("GENKV_EXAMPLE_SWITCH", True), env_flag("GENKV_UNSET_SWITCH", True)
    (False, True)
    >>> optional_kernel("no_such_kernel") is None
    True
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["env_flag", "optional_kernel"]

_ON = ("1", "true", "on", "yes")
_OFF = ("0", "false", "off", "no", "")


def env_flag(name: str, default: bool) -> bool:
    """The on/off environment variable ``name`` (the module docstring's rule), ``default`` if unset or unclear."""
    value = os.environ.get(name)
    if value is None:
        return default
    value = value.strip().lower()
    return True if value in _ON else False if value in _OFF else default


def optional_kernel(name: str) -> ModuleType | None:
    """``genkv.kernels.<name>`` (importing it registers its custom ops), or None where it cannot be imported (a
    machine without Triton)."""
    try:
        return importlib.import_module(f"genkv.kernels.{name}")
    except ImportError:
        return None
