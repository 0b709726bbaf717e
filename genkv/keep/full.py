"""The exact cache: every committed token stays (the base keeper's behaviour)."""

from .base import CacheKeeper


class KeepAll(CacheKeeper):
    """Append each committed chunk; nothing is evicted. Memory grows linearly with the video."""

    method_name = "full"
