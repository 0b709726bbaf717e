"""genkv: training-free KV-cache compression and sparse attention for autoregressive video/image generators.

``import genkv`` is cheap: the public names below load their modules (and torch, diffusers) on first use, so the
command line can check its arguments before paying for them.

Example:
    >>> import genkv
    >>> from genkv.testing import tiny_self_forcing_pipeline
    >>> pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=0), "rolling", sink_frames=1, window_frames=6)
    >>> for frames in pipe.stream("a red circle bouncing", num_frames=21):
    ...     pass                                      # uint8 [T, H, W, 3] per chunk
    >>> genkv.cache_stats(pipe)["frames_committed"]
    6
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# In a source checkout the rooms genkv.kernels, genkv.pipelines and genkv.configs are the top-level folders beside
# this one (an install puts them under genkv/, an editable install maps them). A last-resort finder for exactly those
# three names lets code run from the checkout (`python -m genkv.cli.main` there), where this folder shadows any
# installed genkv.
def _checkout_rooms() -> dict[str, str]:
    here = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.dirname(here)
    rooms = {f"{__name__}.{room}": os.path.join(checkout, room) for room in ("kernels", "pipelines", "configs")}
    if os.path.isdir(os.path.join(here, "kernels")) or not all(
        os.path.isfile(os.path.join(folder, "__init__.py")) for folder in rooms.values()
    ):
        return {}
    return rooms


class _CheckoutRoomFinder(importlib.abc.MetaPathFinder):
    def __init__(self, rooms: dict[str, str]) -> None:
        self.rooms = rooms

    def find_spec(self, name, path=None, target=None):
        folder = self.rooms.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


_rooms = _checkout_rooms()
if _rooms and not any(isinstance(f, _CheckoutRoomFinder) for f in sys.meta_path):
    sys.meta_path.append(_CheckoutRoomFinder(_rooms))

#: public name -> the submodule that defines it (imported on first access, PEP 562)
_LAZY: dict[str, str] = {
    "apply_genkv": "api",
    "remove_genkv": "api",
    "cache_stats": "api",
    "get_store": "api",
    "is_patched": "api",
    "list_methods": "registry",
    "list_presets": "registry",
    "load_preset": "registry",
    "get_method": "registry",
    "register_method": "registry",
    "GenKVMethod": "methods.base",
    # diffusers' pipeline loader resolves saved components as `getattr(importlib.import_module("genkv"), cls)`.
    "SelfForcingPipeline": "pipelines",
    "SelfForcingScheduler": "pipelines",
}

__all__ = [
    "apply_genkv",
    "remove_genkv",
    "cache_stats",
    "get_store",
    "is_patched",
    "list_methods",
    "list_presets",
    "load_preset",
    "get_method",
    "register_method",
    "GenKVMethod",
]

if TYPE_CHECKING:  # pragma: no cover
    from .api import apply_genkv, cache_stats, get_store, is_patched, remove_genkv
    from .methods.base import GenKVMethod
    from .registry import get_method, list_methods, list_presets, load_preset, register_method


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (and genkv's submodules, as ``genkv.cache``)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'genkv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
