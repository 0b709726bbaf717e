"""VAR (next-scale prediction) pipeline: transformer, multi-scale VQ-VAE, official checkpoint loading."""

from .checkpoint import VARCheckpointError, load_var_transformer, load_vqvae
from .model import VARConfig, VARTransformer
from .pipeline import VARPipeline, VARPipelineOutput
from .vqvae import MultiScaleVQVAE

__all__ = ["MultiScaleVQVAE", "VARCheckpointError", "VARConfig", "VARPipeline", "VARPipelineOutput",
           "VARTransformer", "load_var_transformer", "load_vqvae"]
