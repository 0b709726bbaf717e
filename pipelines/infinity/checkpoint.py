"""Loading the official Infinity checkpoints unchanged, with strict key checks and one-line errors.

- transformer: ``infinity_2b_reg.pth`` (a state dict), or a folder of shards (the 8B's ``infinity_8b_weights/``,
  written by ``transformers``' sharded saving: ``pytorch_model.bin.index.json`` or ``model.safetensors.index.json``
  whose ``weight_map`` names the shard of every tensor). The configuration (depth, width, heads, text channels,
  bits, block_chunks layout) is read off the tensors.
- tokenizer: ``infinity_vae_d32reg.pth`` (2B) / ``infinity_vae_d56_f8_14_patchify.pth`` (8B): a training dict whose
  ``vae`` entry holds the BSQ-VAE; only the decoder is loaded (see :mod:`.bsq_vae`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .bsq_vae import BitwiseDecoder
from .model import InfinityConfig, InfinityTransformer
from .text import pool_heads

#: Buffers of the training model that the official ``load_state_dict`` drops too.
IGNORED_TRANSFORMER_KEYS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")
SHARD_INDEXES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")


class InfinityCheckpointError(ValueError):
    """A checkpoint that is missing, of another model, or whose keys do not match."""


def _read_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` / ``.bin`` (torch) or ``.safetensors`` file, or a one-line error."""
    if not path.is_file():
        raise InfinityCheckpointError(f"{what} file {str(path)!r} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise InfinityCheckpointError(f"cannot read {what} file {str(path)!r}: "
                                      f"{(str(err).splitlines() or [type(err).__name__])[0]}") from None
    if not isinstance(state, dict):
        raise InfinityCheckpointError(f"{what} file {str(path)!r} is not a state dict")
    return state


def read_sharded(folder: Path) -> dict[str, torch.Tensor]:
    """Merge the shards a ``*.index.json`` lists (transformers' sharded format) into one state dict."""
    index = next((folder / name for name in SHARD_INDEXES if (folder / name).is_file()), None)
    if index is None:
        raise InfinityCheckpointError(f"{str(folder)!r} has no shard index ({' or '.join(SHARD_INDEXES)})")
    weight_map = json.loads(index.read_text()).get("weight_map", {})
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_read_file(folder / shard, "Infinity shard"))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise InfinityCheckpointError(f"{index.name} lists {len(missing)} tensors its shards lack ({missing[0]}, ...)")
    return state


def read_transformer_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A transformer state dict from a ``.pth`` file or a folder of shards; trainer checkpoints get a hint."""
    path = Path(path)
    state = read_sharded(path) if path.is_dir() else _read_file(path, "Infinity")
    if "trainer" in state and isinstance(state["trainer"], dict):
        raise InfinityCheckpointError(f"{str(path)!r} is a training checkpoint: extract ['trainer']['gpt_fsdp'] "
                                      "(the official save_slim_model) and pass that")
    return {k: v for k, v in state.items() if k not in IGNORED_TRANSFORMER_KEYS}


def _blocks(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(depth, block_chunks) from ``block_chunks.{i}.module.{j}.*`` or ``blocks.{i}.*`` keys."""
    chunks: dict[int, set[int]] = {}
    for key in state:
        if m := re.match(r"block_chunks\.(\d+)\.module\.(\d+)\.", key):
            chunks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if chunks:
        return sum(len(v) for v in chunks.values()), len(chunks)
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))}
    return (max(blocks) + 1 if blocks else 0), 1


def config_from_state_dict(state: dict[str, torch.Tensor], source: str = "checkpoint") -> InfinityConfig:
    """Depth, width, heads, text channels, bits and block layout, read off the tensors' names and shapes."""
    depth, chunks = _blocks(state)
    needed = ("word_embed.weight", "cfg_uncond", "text_proj_for_sos.ca.mat_q", "head.weight")
    if not depth or any(k not in state for k in needed):
        tokenizer = "vae" in state or any(k.startswith("decoder.") for k in state)
        hint = " (this looks like the tokenizer: pass it as vae=)" if tokenizer else ""
        raise InfinityCheckpointError(f"{source} is not an Infinity transformer checkpoint: no blocks / "
                                      f"{' / '.join(needed)}{hint}")
    first = "block_chunks.0.module.0." if chunks > 1 else "blocks.0."
    if first + "sa.scale_mul_1H11" not in state:
        raise InfinityCheckpointError(f"{source}: no {first}sa.scale_mul_1H11 (only cosine-attention models, "
                                      "the released ones, are supported)")
    width, bits = state["word_embed.weight"].shape
    maxlen, text_channels = state["cfg_uncond"].shape
    heads = state["text_proj_for_sos.ca.mat_q"].shape[1]
    return InfinityConfig(
        depth=depth, embed_dim=width, num_heads=state[first + "sa.scale_mul_1H11"].shape[1],
        text_channels=text_channels, text_maxlen=maxlen, bits=bits,
        mlp_hidden=state[first + "ffn.fc1.weight"].shape[0], block_chunks=chunks,
        pool_heads=None if heads == pool_heads(width, text_channels) else heads,
        num_levels=state["lvl_embed.weight"].shape[0],
    )


def strict_load(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one line naming what is missing, unexpected or mis-shaped."""
    own = module.state_dict()
    problems = {
        "missing": [k for k in own if k not in state],
        "unexpected": [k for k in state if k not in own],
        "wrong shape": [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
                        if k in state and state[k].shape != v.shape],
    }
    listed = [f"{len(keys)} {kind} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
              for kind, keys in problems.items() if keys]
    if listed:
        raise InfinityCheckpointError(f"{source} does not match the model: " + "; ".join(listed))
    module.load_state_dict(state, strict=True)


def load_infinity_transformer(path: str | Path) -> InfinityTransformer:
    state = read_transformer_state(path)
    model = InfinityTransformer(config_from_state_dict(state, str(path)))
    strict_load(model, state, str(path))
    return model.eval()


def _vae_state(state: dict, source: str) -> dict[str, torch.Tensor]:
    """The decoder tensors of an official tokenizer file; everything else must be the encoder or quantizer."""
    if "vae" in state and isinstance(state["vae"], dict):
        state = state["vae"]
    if not any(k.startswith("decoder.") for k in state):
        hint = " (this looks like an Infinity transformer)" if "word_embed.weight" in state else ""
        raise InfinityCheckpointError(f"{source} is not an Infinity tokenizer checkpoint: no decoder.*{hint}")
    unexpected = [k for k in state if not k.startswith(("decoder.", "encoder.", "quantizer.", "quantize."))]
    if unexpected:
        raise InfinityCheckpointError(f"{source} does not match the tokenizer: {len(unexpected)} unexpected "
                                      f"({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})")
    return {k: v for k, v in state.items() if k.startswith("decoder.")}


def _wrapped(decoder: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A tensor by its official wrapped name (``x.conv.weight``) or its plain nn.Conv2d name (``x.weight``)."""
    plain = name.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
    if name in decoder or plain not in decoder:
        return decoder.get(name)
    return decoder[plain]


def _to_module_names(decoder: dict[str, torch.Tensor], own: dict) -> dict[str, torch.Tensor]:
    """Map plain nn.Conv2d / nn.GroupNorm names onto the wrapped ones (the official loader takes both)."""
    out = {}
    for key, value in decoder.items():
        if key not in own:
            for wrapper in (".conv", ".norm"):
                candidate = re.sub(r"\.(weight|bias)$", wrapper + r".\1", key)
                if candidate in own:
                    key = candidate
                    break
        out[key] = value
    return out


def decoder_from_state_dict(decoder: dict[str, torch.Tensor], source: str) -> BitwiseDecoder:
    """Bits, channels, levels and upsampling read off the decoder's tensors."""
    levels = sorted({int(k.split(".")[2]) for k in decoder if k.startswith("decoder.up.")})
    conv_in, conv_out = (_wrapped(decoder, f"decoder.{n}.conv.weight") for n in ("conv_in", "conv_out"))
    if conv_in is None or conv_out is None or not levels:
        raise InfinityCheckpointError(f"{source}: no decoder.conv_in / conv_out / up.* tensors")
    bits, ch = conv_in.shape[1], conv_out.shape[1]
    ch_mult = tuple(_wrapped(decoder, f"decoder.up.{i}.block.0.conv1.conv.weight").shape[0] // ch for i in levels)
    res_blocks = len({k.split(".")[4] for k in decoder if k.startswith("decoder.up.0.block.")}) - 1
    upsample = tuple(i for i in levels if any(k.startswith(f"decoder.up.{i}.upsample.") for k in decoder))
    return BitwiseDecoder(bits=bits, ch=ch, ch_mult=ch_mult, num_res_blocks=res_blocks, upsample=upsample)


def load_bitwise_vae(path: str | Path) -> BitwiseDecoder:
    """The decoder of an official BSQ-VAE file (bits, channels, levels and upsampling read off the tensors)."""
    decoder = _vae_state(_read_file(Path(path), "Infinity tokenizer"), str(path))
    vae = decoder_from_state_dict(decoder, str(path))
    strict_load(vae, _to_module_names(decoder, vae.state_dict()), str(path))
    return vae.eval()
