"""Pipelines genkv drives (installed as ``genkv.pipelines``)."""

from .self_forcing import (
    CheckpointError,
    SelfForcingPipeline,
    SelfForcingScheduler,
    StreamingVAEDecoder,
    load_self_forcing_checkpoint,
)
from .infinity import InfinityPipeline
from .var import VARPipeline

__all__ = [
    "CheckpointError",
    "InfinityPipeline",
    "SelfForcingPipeline",
    "SelfForcingScheduler",
    "StreamingVAEDecoder",
    "VARPipeline",
    "load_self_forcing_checkpoint",
]
