"""Infinity (bitwise next-scale text-to-image) pipeline: transformer, BSQ tokenizer decoder, official checkpoint
loading, the official scale schedules."""

from .bsq_vae import BitwiseDecoder
from .checkpoint import (
    InfinityCheckpointError,
    config_from_state_dict,
    load_bitwise_vae,
    load_infinity_transformer,
    read_transformer_state,
)
from .model import InfinityConfig, InfinityTransformer
from .pipeline import InfinityPipeline, InfinityPipelineOutput
from .schedules import scale_schedule

__all__ = ["BitwiseDecoder", "InfinityCheckpointError", "InfinityConfig", "InfinityPipeline",
           "InfinityPipelineOutput", "InfinityTransformer", "config_from_state_dict", "load_bitwise_vae",
           "load_infinity_transformer", "read_transformer_state", "scale_schedule"]
