"""genkv: training-free KV-cache compression and sparse attention for autoregressive video/image generators.

Example:
    >>> import genkv
    >>> from genkv.testing import tiny_self_forcing_pipeline
    >>> pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=0), "rolling", sink_frames=1, window_frames=6)
    >>> for frames in pipe.stream("a red circle bouncing", num_frames=21):
    ...     pass                                      # uint8 [T, H, W, 3] per chunk
    >>> genkv.cache_stats(pipe)["frames_committed"]
    6
"""

from .api import apply_genkv, cache_stats, get_store, is_patched, remove_genkv
from .methods.base import GenKVMethod
from .registry import get_method, list_methods, list_presets, load_preset, register_method

__version__ = "0.1.0"

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


def __getattr__(name: str):
    # diffusers' pipeline loader resolves saved components as `getattr(importlib.import_module("genkv"), cls)`.
    if name in ("SelfForcingPipeline", "SelfForcingScheduler"):
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'genkv' has no attribute {name!r}")
