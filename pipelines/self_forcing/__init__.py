"""Self-Forcing-style chunk-causal Wan2.1 generation (Self-Forcing, CausVid, LongLive checkpoints)."""

from .checkpoint import (
    CheckpointError,
    convert_self_forcing_state_dict,
    load_self_forcing_checkpoint,
    read_self_forcing_checkpoint,
    to_upstream_state_dict,
)
from .noise import NOISE_MODES, from_upstream_layout, to_upstream_layout
from .numerics import apply_self_forcing_numerics
from .pipeline import SelfForcingPipeline, SelfForcingPipelineOutput
from .scheduler import SelfForcingScheduler
from .vae_stream import StreamingVAEDecoder, to_uint8_frames

__all__ = [
    "CheckpointError",
    "NOISE_MODES",
    "SelfForcingPipeline",
    "SelfForcingPipelineOutput",
    "SelfForcingScheduler",
    "StreamingVAEDecoder",
    "apply_self_forcing_numerics",
    "convert_self_forcing_state_dict",
    "from_upstream_layout",
    "load_self_forcing_checkpoint",
    "read_self_forcing_checkpoint",
    "to_upstream_layout",
    "to_upstream_state_dict",
    "to_uint8_frames",
]
