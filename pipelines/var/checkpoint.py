"""Loading the official VAR checkpoints (``var_d*.pth``, ``vae_ch160v4096z32.pth``) with strict key checks."""

from __future__ import annotations

import re
import warnings
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


#: Where a training checkpoint of the official trainer (``ar-ckpt-*.pth``: ``{'trainer': ..., 'args': ...}``)
#: keeps each model's weights.
TRAINER_KEYS = {"VAR": "var_wo_ddp", "VQ-VAE": "vae_local"}


def read_checkpoint(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], tuple[int, ...] | None]:
    """The state dict of a ``what`` ("VAR" or "VQ-VAE") checkpoint and, for a training checkpoint, the scale
    schedule it was trained with (else None)."""
    path = Path(path)
    if not path.is_file():
        raise VARCheckpointError(f"{what} checkpoint {str(path)!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line error
        detail = "the file is empty" if path.stat().st_size == 0 else (str(err).strip().splitlines()
                                                                        or [type(err).__name__])[0]
        raise VARCheckpointError(f"cannot read {what} checkpoint {str(path)!r}: {detail}") from None
    schedule = None
    if isinstance(state, dict) and isinstance(state.get("trainer"), dict):
        state, schedule = unwrap_trainer_checkpoint(state, what, path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise VARCheckpointError(f"{what} checkpoint {str(path)!r} is not a state dict")
    return state, schedule


def unwrap_trainer_checkpoint(checkpoint: dict, what: str, path: Path) -> tuple[dict, tuple[int, ...] | None]:
    """``checkpoint['trainer'][var_wo_ddp | vae_local]`` and the trainer's ``patch_nums``, with a warning saying so
    (the official ``train.py`` saves the trainer's whole state, optimizer included, in ``ar-ckpt-*.pth``)."""
    trainer, key = checkpoint["trainer"], TRAINER_KEYS[what]
    if not isinstance(trainer.get(key), dict):
        raise VARCheckpointError(f"{str(path)!r} is a training checkpoint without ['trainer'][{key!r}] "
                                 f"(it has {', '.join(map(str, trainer)) or 'nothing'})")
    warnings.warn(f"genkv: {path.name} is a VAR training checkpoint: loading its ['trainer'][{key!r}] weights",
                  stacklevel=4)
    config = trainer.get("config")
    schedule = config.get("patch_nums") if isinstance(config, dict) else None
    return trainer[key], tuple(int(p) for p in schedule) if schedule else None


def config_from_state_dict(state: dict[str, torch.Tensor], source: str = "checkpoint",
                           patch_nums: tuple[int, ...] | None = None) -> VARConfig:
    """Depth, width, classes, vocabulary and scale schedule, read off the tensors' names and shapes.

    ``patch_nums`` (a schedule of the user's, or a training checkpoint's) replaces the schedule looked up from the
    position table's length; it must match the table and the per-scale embedding.
    """
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))}
    if not blocks or "word_embed.weight" not in state or "pos_1LC" not in state:
        hint = " (this looks like the VQ-VAE: pass it as vae=)" if any(k.startswith("quantize.") for k in state) else ""
        raise VARCheckpointError(
            f"{source} is not a VAR transformer checkpoint: no blocks.* / word_embed / pos_1LC{hint}")
    if "blocks.0.attn.scale_mul_1H11" not in state:
        raise VARCheckpointError(
            f"{source} has no blocks.0.attn.scale_mul_1H11: it was built with attn_l2_norm=False, and genkv runs the "
            "released VAR models (attn_l2_norm=True, the official default) only")
    width, z_channels = state["word_embed.weight"].shape
    return VARConfig(
        depth=max(blocks) + 1, num_classes=state["class_emb.weight"].shape[0] - 1,
        vocab_size=state["head.weight"].shape[0], z_channels=z_channels,
        patch_nums=schedule_for(state, source, patch_nums),
        shared_aln="shared_ada_lin.1.weight" in state, width=width,
        head_dim=width // state["blocks.0.attn.scale_mul_1H11"].shape[1],  # the per-head temperature is (1, H, 1, 1)
    )


def schedule_for(state: dict[str, torch.Tensor], source: str,
                 patch_nums: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The scale schedule: ``patch_nums`` checked against the checkpoint's position tables, or the released schedule
    of that many tokens."""
    tokens = state["pos_1LC"].shape[1]
    scales = state["lvl_embed.weight"].shape[0] if "lvl_embed.weight" in state else None
    first = state["pos_start"].shape[1] if "pos_start" in state else None
    known = SCHEDULES.get(tokens)
    has = f"{tokens} tokens in {scales} scales" + (f" {known}" if known else "")
    if patch_nums is None:
        if known is None:
            raise VARCheckpointError(f"{source}: a position table of {tokens} tokens matches no known VAR schedule "
                                     f"({', '.join(map(str, SCHEDULES))}); pass the one it was trained with as "
                                     f"patch_nums=(1, 2, ...)")
        return known
    try:
        wanted = tuple(int(p) for p in patch_nums)
    except (TypeError, ValueError):
        raise VARCheckpointError(f"patch_nums must be a sequence of integers, got {patch_nums!r}") from None
    fits = (bool(wanted) and min(wanted) >= 1 and sum(p * p for p in wanted) == tokens
            and scales in (None, len(wanted)) and first in (None, wanted[0] ** 2))
    if not fits:
        raise VARCheckpointError(f"patch_nums {wanted} ({sum(p * p for p in wanted)} tokens in {len(wanted)} scales) "
                                 f"does not match {source} ({has})")
    if known is not None and wanted != known:
        warnings.warn(f"genkv: patch_nums {wanted} differs from the schedule {known} VAR's {tokens}-token checkpoints "
                      f"were trained with: each scale reads other scales' position embeddings", stacklevel=4)
    return wanted


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


def load_var_transformer(path: str | Path, patch_nums: tuple[int, ...] | None = None) -> VARTransformer:
    """A ``var_d*.pth`` (or ``ar-ckpt-*.pth``) file as a :class:`VARTransformer`, config read off its tensors.

    Example:
        >>> import tempfile, torch
        >>> from genkv.testing import tiny_var_pipeline
        >>> with tempfile.TemporaryDirectory() as tmp:  # the tiny model's 30 tokens are no released schedule
        ...     torch.save(tiny_var_pipeline().transformer.state_dict(), tmp + "/var_tiny.pth")
        ...     model = load_var_transformer(tmp + "/var_tiny.pth", patch_nums=(1, 2, 3, 4))
        >>> model.config.patch_nums
        (1, 2, 3, 4)
    """
    state, trained_with = read_checkpoint(path, "VAR")
    if patch_nums is None:
        patch_nums = trained_with
    elif trained_with is not None and tuple(patch_nums) != trained_with:
        raise VARCheckpointError(f"patch_nums {tuple(patch_nums)} differs from the schedule {trained_with} the "
                                 f"training checkpoint {str(path)!r} was trained with")
    model = VARTransformer(config_from_state_dict(state, str(path), patch_nums))
    load_strict(model, state, str(path))
    return model.eval()


def load_vqvae(path: str | Path, patch_nums: tuple[int, ...]) -> MultiScaleVQVAE:
    state, _ = read_checkpoint(path, "VQ-VAE")
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
