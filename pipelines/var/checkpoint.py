"""Loading the official VAR checkpoints (``var_d*.pth``, ``vae_ch160v4096z32.pth``) with strict key checks."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .model import VARConfig, VARTransformer
from .vqvae import MultiScaleVQVAE

SCHEDULES = {  # tokens of the learned position table → the scale schedule it was trained with
    680: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),  # 256px
    2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),  # 512px (VAR-d36)
}


class VARCheckpointError(ValueError):
    """A checkpoint that is missing, of another model, or whose keys do not match."""


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise VARCheckpointError(f"{what} checkpoint {str(path)!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise VARCheckpointError(f"cannot read {what} checkpoint {str(path)!r}: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise VARCheckpointError(f"{what} checkpoint {str(path)!r} is not a state dict")
    return state


def config_from_state_dict(state: dict[str, torch.Tensor], source: str = "checkpoint") -> VARConfig:
    """Depth, width, classes, vocabulary and scale schedule, read off the tensors' names and shapes."""
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))}
    if not blocks or "word_embed.weight" not in state or "pos_1LC" not in state:
        hint = " (this looks like the VQ-VAE: pass it as vae=)" if any(k.startswith("quantize.") for k in state) else ""
        raise VARCheckpointError(
            f"{source} is not a VAR transformer checkpoint: no blocks.* / word_embed / pos_1LC{hint}")
    width, z_channels = state["word_embed.weight"].shape
    tokens = state["pos_1LC"].shape[1]
    if tokens not in SCHEDULES:
        raise VARCheckpointError(f"{source}: a position table of {tokens} tokens matches no known VAR schedule "
                                 f"({', '.join(map(str, SCHEDULES))})")
    return VARConfig(
        depth=max(blocks) + 1, num_classes=state["class_emb.weight"].shape[0] - 1,
        vocab_size=state["head.weight"].shape[0], z_channels=z_channels, patch_nums=SCHEDULES[tokens],
        shared_aln="shared_ada_lin.1.weight" in state, width=width,
        head_dim=width // state["blocks.0.attn.scale_mul_1H11"].shape[1],  # the per-head temperature is (1, H, 1, 1)
    )


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one readable error listing what is missing and unexpected."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {name} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
        raise VARCheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def load_var_transformer(path: str | Path) -> VARTransformer:
    state = read_state_dict(path, "VAR")
    model = VARTransformer(config_from_state_dict(state, str(path)))
    load_strict(model, state, str(path))
    return model.eval()


def load_vqvae(path: str | Path, patch_nums: tuple[int, ...]) -> MultiScaleVQVAE:
    state = read_state_dict(path, "VQ-VAE")
    if "quantize.embedding.weight" not in state:
        hint = " (this looks like a VAR transformer)" if "word_embed.weight" in state else ""
        raise VARCheckpointError(f"{path} is not a VAR VQ-VAE checkpoint: no quantize.embedding{hint}")
    vocab, channels = state["quantize.embedding.weight"].shape
    ch = state["encoder.conv_in.weight"].shape[0]
    shared = len({k.split(".")[3] for k in state if k.startswith("quantize.quant_resi.qresi_ls.")})
    levels = len({k.split(".")[2] for k in state if k.startswith("encoder.down.")})
    res_blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
    ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    vae = MultiScaleVQVAE(vocab_size=vocab, z_channels=channels, ch=ch, ch_mult=ch_mult, num_res_blocks=res_blocks,
                          patch_nums=patch_nums, share_quant_resi=shared)
    # The usage buffer's first dimension follows the schedule VAE training used; it is never read.
    if "quantize.ema_vocab_hit_SV" in state:
        vae.quantize.ema_vocab_hit_SV = torch.zeros_like(state["quantize.ema_vocab_hit_SV"])
    load_strict(vae, state, str(path))
    return vae.eval()
