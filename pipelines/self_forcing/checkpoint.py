"""Self-Forcing checkpoints (upstream ``.pt``) → diffusers ``WanTransformer3DModel`` weights.

An upstream file is a dict with ``generator_ema`` and/or ``generator``; each holds the ``CausalWanModel``
state dict under a ``model.`` prefix (FSDP dumps may add ``_fsdp_wrapped_module.``), with the original Wan
parameter names. The renames below are the whole conversion: no tensor is reshaped or transposed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

_PREFIXES = ("_fsdp_wrapped_module.", "module.", "model.", "net.")

# (upstream pattern, diffusers replacement), applied in order to each name after prefix stripping.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^blocks\.(\d+)\.self_attn\.", r"blocks.\1.attn1."),
    (r"^blocks\.(\d+)\.cross_attn\.", r"blocks.\1.attn2."),
    (r"^(blocks\.\d+\.attn[12])\.q\.", r"\1.to_q."),
    (r"^(blocks\.\d+\.attn[12])\.k\.", r"\1.to_k."),
    (r"^(blocks\.\d+\.attn[12])\.v\.", r"\1.to_v."),
    (r"^(blocks\.\d+\.attn[12])\.o\.", r"\1.to_out.0."),
    # Upstream norm3 is the affine pre-cross-attention norm, diffusers' norm2 (the FFN norms have no weights).
    (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
    (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model."""


def _strip(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def convert_self_forcing_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an upstream ``CausalWanModel`` state dict to ``WanTransformer3DModel`` names.

    Example:
        >>> import torch
        >>> sorted(convert_self_forcing_state_dict({"model.blocks.0.self_attn.o.weight": torch.zeros(1)}))
        ['blocks.0.attn1.to_out.0.weight']
    """
    converted = {}
    for name, tensor in state_dict.items():
        new = _strip(name)
        for pattern, replacement in _RENAMES:
            new = re.sub(pattern, replacement, new)
        converted[new] = tensor
    return converted


_GENERATOR_KEYS = ("generator_ema", "generator")


def _select_generator(raw: Mapping, path: Path, use_ema: bool) -> Mapping:
    """The state dict a checkpoint holds under ``generator_ema`` (``use_ema``) or ``generator``; a bare state dict
    (tensors at the top level) as it is. Asking for one of the two when the file has only the other is an error
    naming what the file holds and the option to use, as upstream's ``load_state_dict(sd[key])`` fails there."""
    wanted = "generator_ema" if use_ema else "generator"
    present = [k for k in _GENERATOR_KEYS if isinstance(raw.get(k), Mapping)]
    if wanted in present:
        return raw[wanted]
    if present:
        other = present[0]
        option = "use_ema=True" if other == "generator_ema" else "use_ema=False"
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no {wanted!r} weights (it holds {', '.join(map(repr, present))}); "
            f"pass {option} to load {other!r}"
        )
    if not any(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no 'generator_ema' / 'generator' state dict "
            f"(top-level keys: {', '.join(list(raw)[:8])})"
        )
    return raw


def read_self_forcing_checkpoint(path: str | Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Read an upstream ``.pt`` (or a ``.safetensors`` of the same names) and return converted weights.

    ``use_ema`` picks ``generator_ema`` (True) or ``generator`` (False); the other one is never used instead
    (a :class:`CheckpointError` names the keys the file has). A file holding a bare state dict loads as it is.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found; pass the path of self_forcing_dmd.pt")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw: object = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file: {err}") from None
    else:
        import zipfile

        if not zipfile.is_zipfile(path):  # every torch.save since 1.6 writes a zip archive
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a PyTorch checkpoint (not a torch.save zip archive); "
                "expected Self-Forcing's .pt"
            )
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises many error types for a non-checkpoint file
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a PyTorch checkpoint ({first}); expected Self-Forcing's .pt"
            ) from None
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(raw).__name__}, not a state dict")
    raw = _select_generator(raw, path, use_ema)
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    return convert_self_forcing_state_dict(tensors)


def load_self_forcing_checkpoint(
    transformer: torch.nn.Module, path: str | Path, use_ema: bool = True
) -> torch.nn.Module:
    """Load a Self-Forcing checkpoint into ``transformer`` strictly, with a clear error on any mismatch.

    Example (a checkpoint written in upstream naming by the tiny test model)::

        load_self_forcing_checkpoint(pipe.transformer, "checkpoints/self_forcing_dmd.pt")
    """
    state = read_self_forcing_checkpoint(path, use_ema=use_ema)
    expected = transformer.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        def some(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {some(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {some(unexpected)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} of another shape: {some(wrong_shape)}")
        cfg = getattr(transformer, "config", {})
        model = f"{type(transformer).__name__}(num_layers={cfg.get('num_layers')}, heads={cfg.get('num_attention_heads')})"
        raise CheckpointError(f"checkpoint {str(path)!r} does not match {model}: " + "; ".join(parts))
    transformer.load_state_dict(state, strict=True)  # copies (and casts) into the existing parameters
    return transformer


def to_upstream_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The inverse renaming: diffusers weights under upstream names with the ``model.`` prefix.

    Used to write checkpoints in the upstream format (tests, and exporting a genkv-trained model).
    """
    inverse = (
        (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
        (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
        (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
        (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
        (r"^condition_embedder\.time_proj\.", "time_projection.1."),
        (r"^proj_out\.", "head.head."),
        (r"^scale_shift_table$", "head.modulation"),
        (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
        (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
        (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
        (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
        (r"^(blocks\.\d+)\.attn1\.", r"\1.self_attn."),
        (r"^(blocks\.\d+)\.attn2\.", r"\1.cross_attn."),
        (r"^(blocks\.\d+\.(?:self|cross)_attn)\.to_q\.", r"\1.q."),
        (r"^(blocks\.\d+\.(?:self|cross)_attn)\.to_k\.", r"\1.k."),
        (r"^(blocks\.\d+\.(?:self|cross)_attn)\.to_v\.", r"\1.v."),
        (r"^(blocks\.\d+\.(?:self|cross)_attn)\.to_out\.0\.", r"\1.o."),
    )
    out = {}
    for name, tensor in transformer.state_dict().items():
        new = name
        for pattern, replacement in inverse:
            new = re.sub(pattern, replacement, new)
        out["model." + new] = tensor.detach().clone()
    return out
