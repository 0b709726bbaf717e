"""The public method API: ``apply_genkv``, ``remove_genkv``, ``cache_stats``, ``get_store``.

Follows diffusers' hook convention (a ``@dataclass`` config + ``apply_x(module, config)`` + a remove function),
at the level of attention processors: patching swaps each Wan block's ``attn1`` / ``attn2`` processor for a
genkv one and the model's RoPE module for a frame-offset subclass; removing puts the very same objects back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from .cache import KVCacheStore, ModelShape
from .methods.base import GenKVMethod
from .processors import GenKVCrossAttnProcessor, GenKVSelfAttnProcessor
from .registry import get_method
from .rope import FrameOffsetRotaryPosEmbed

_STATE_ATTR = "_genkv_state"
P = TypeVar("P")


@dataclass
class GenKVState:
    """What ``apply_genkv`` attaches to a transformer (and ``remove_genkv`` undoes)."""

    method: GenKVMethod
    store: KVCacheStore
    original_processors: dict[str, Any]
    patched_rope: bool


def find_transformer(pipe_or_transformer: Any) -> torch.nn.Module:
    """The denoiser of a pipeline (``pipe.transformer``), or the module itself."""
    module = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"expected a diffusers pipeline or transformer, got {type(pipe_or_transformer).__name__}")
    return module


def _is_scale_pipeline(obj: Any) -> bool:
    """Next-scale (VAR-style) pipelines own a pluggable cache policy instead of diffusers processors."""
    return hasattr(obj, "new_cache") and hasattr(obj, "kv_method")


def _apply_to_scale_pipeline(pipe: Any, config: GenKVMethod) -> Any:
    if config.name != "full" and not hasattr(config, "build_scale_cache"):
        raise ValueError(f"{config.name!r} works on video (Wan) pipelines; next-scale (VAR) pipelines take "
                         "'full', 'scalekv' or 'hack'")
    pipe.kv_method = None if config.name == "full" else config
    pipe._genkv_method = config
    return pipe


def _attention_layers(transformer: torch.nn.Module) -> list[tuple[int, str, Any]]:
    blocks = getattr(transformer, "blocks", None)
    layers = []
    for i, block in enumerate(blocks or []):
        for name in ("attn1", "attn2"):
            attn = getattr(block, name, None)
            if attn is not None and hasattr(attn, "set_processor"):
                layers.append((i, name, attn))
    if not layers:
        raise TypeError(
            f"genkv patches Wan-style transformers (blocks[i].attn1 / attn2 with diffusers processors); "
            f"{type(transformer).__name__} has none"
        )
    return layers


def apply_genkv(pipe_or_transformer: P, method: str | GenKVMethod = "full", **overrides: Any) -> P:
    """Patch the transformer's attention processors in place with a genkv method; returns the argument.

    ``method`` is a registered name (``genkv.list_methods()``), a shipped preset name (``"longlive"``), a
    YAML path, or a method config object; ``overrides`` set its fields. Applying again replaces the method.

    Example:
        >>> import genkv
        >>> from genkv.testing import tiny_self_forcing_pipeline
        >>> pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=0), "rolling", window_frames=6)
        >>> frames = pipe(prompt="a red circle", num_frames=33, output_type="np").frames
        >>> frames.shape[1], genkv.cache_stats(pipe)["method"]
        (33, 'rolling')
        >>> pipe = genkv.remove_genkv(pipe)
    """
    config = get_method(method, **overrides)
    if _is_scale_pipeline(pipe_or_transformer):
        return _apply_to_scale_pipeline(pipe_or_transformer, config)
    if hasattr(config, "build_scale_cache"):
        raise ValueError(f"{config.name!r} budgets next-scale (VAR) pipelines; video pipelines take "
                         "full, rolling, tempcache, annsa, annca or fastar")
    transformer = find_transformer(pipe_or_transformer)
    layers = _attention_layers(transformer)
    if hasattr(transformer, _STATE_ATTR):
        remove_genkv(transformer)

    rope = getattr(transformer, "rope", None)
    patched_rope = isinstance(rope, WanRotaryPosEmbed) and not isinstance(rope, FrameOffsetRotaryPosEmbed)
    if patched_rope:
        FrameOffsetRotaryPosEmbed.from_module(rope)
    keeper = config.build_keeper()
    keeper.rope_table_frames = getattr(getattr(transformer, "config", None), "rope_max_seq_len", None)
    num_layers = 1 + max(i for i, _, _ in layers)
    store = KVCacheStore(keeper, num_layers, rope if isinstance(rope, FrameOffsetRotaryPosEmbed) else None,
                         kv_dtype=config.kv_dtype)
    keeper.rope = store.rope
    store.run_layers = getattr(transformer, "genkv_run_layers", None)  # set by a block split
    keeper.budget_bytes = config.budget_bytes
    store.model_shape = _model_shape(transformer)
    self_reader, cross_reader = config.build_self_reader(), config.build_cross_reader()
    store.readers = (self_reader, cross_reader)

    originals: dict[str, Any] = {}
    for i, name, attn in layers:
        original = attn.processor
        if attn.is_cross_attention:
            processor = GenKVCrossAttnProcessor(store, i, cross_reader, attn)
        else:
            processor = GenKVSelfAttnProcessor(store, i, self_reader, attn)
        # Keep whatever backend / context-parallel config diffusers wrote on the processor being replaced.
        processor._attention_backend = getattr(original, "_attention_backend", None)
        processor._parallel_config = getattr(original, "_parallel_config", None)
        attn.set_processor(processor)
        originals[f"blocks.{i}.{name}"] = original
    setattr(transformer, _STATE_ATTR, GenKVState(config, store, originals, patched_rope))
    return pipe_or_transformer


def _model_shape(transformer: torch.nn.Module) -> ModelShape | None:
    """Self-attention heads, head dim and dtype bytes of a Wan-style transformer (None if its config lacks them)."""
    config = getattr(transformer, "config", None)
    heads, dim = getattr(config, "num_attention_heads", None), getattr(config, "attention_head_dim", None)
    if heads is None or dim is None:
        return None
    parameter = next(transformer.parameters(), None)
    dtype_bytes = 2 if parameter is None else parameter.element_size()
    return ModelShape(int(heads), int(dim), dtype_bytes)


def remove_genkv(pipe_or_transformer: P) -> P:
    """Restore the exact processor objects (and RoPE module) that ``apply_genkv`` replaced.

    Example:
        >>> import genkv
        >>> from genkv.testing import tiny_self_forcing_pipeline
        >>> pipe = genkv.remove_genkv(genkv.apply_genkv(tiny_self_forcing_pipeline(), "full"))
        >>> genkv.is_patched(pipe)
        False
    """
    if _is_scale_pipeline(pipe_or_transformer):
        pipe_or_transformer.kv_method = None
        pipe_or_transformer.__dict__.pop("_genkv_method", None)
        return pipe_or_transformer
    transformer = find_transformer(pipe_or_transformer)
    state: GenKVState | None = getattr(transformer, _STATE_ATTR, None)
    if state is None:
        return pipe_or_transformer
    state.store.close()
    for i, name, attn in _attention_layers(transformer):
        original = state.original_processors.get(f"blocks.{i}.{name}")
        if original is not None:
            # A backend set on the patched model while genkv was applied carries over.
            original._attention_backend = attn.processor._attention_backend
            attn.set_processor(original)
    if state.patched_rope:
        transformer.rope.to_plain()
    delattr(transformer, _STATE_ATTR)
    return pipe_or_transformer


def is_patched(pipe_or_transformer: Any) -> bool:
    """Whether ``apply_genkv`` has patched this pipeline / transformer."""
    if _is_scale_pipeline(pipe_or_transformer):
        return hasattr(pipe_or_transformer, "_genkv_method")
    return hasattr(find_transformer(pipe_or_transformer), _STATE_ATTR)


def get_state(pipe_or_transformer: Any) -> GenKVState:
    state = getattr(find_transformer(pipe_or_transformer), _STATE_ATTR, None)
    if state is None:
        raise ValueError("this model is not patched by genkv; call genkv.apply_genkv(pipe, method) first")
    return state


def get_store(pipe_or_transformer: Any) -> KVCacheStore:
    """The KV cache store a pipeline drives (see :class:`genkv.cache.KVCacheStore`)."""
    return get_state(pipe_or_transformer).store


def cache_stats(pipe_or_transformer: Any) -> dict[str, Any]:
    """Tokens and bytes the KV cache holds, per layer and in total.

    Returns a dict with ``method``, ``config``, ``frames_committed``, ``tokens`` (kept now, all layers and
    branches), ``tokens_seen`` (committed so far, before eviction), ``bytes`` (allocated buffers), ``used_bytes``
    (the committed tokens' K/V: codes and scales for a quantized cache; the figure to compare across ``kv_dtype``
    at equal tokens), ``cross_bytes`` (per-prompt cross-attention K/V) and ``layers`` (one row per layer and CFG
    branch).

    Example:
        >>> import genkv
        >>> from genkv.testing import tiny_self_forcing_pipeline
        >>> pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(), "full")
        >>> genkv.cache_stats(pipe)["tokens"]
        0
    """
    if _is_scale_pipeline(pipe_or_transformer):
        # Next-scale pipelines: tokens kept (per batch row and head) and bytes, per layer after each scale.
        config = getattr(pipe_or_transformer, "_genkv_method", None)
        cache = pipe_or_transformer.last_cache
        stats = cache.stats() if cache is not None else {"scales": {}, "peak_bytes": 0}
        stats["method"] = config.name if config is not None else "full"
        stats["config"] = config.to_dict() if config is not None else {"method": "full"}
        return stats
    state = get_state(pipe_or_transformer)
    stats = state.store.stats()
    stats["config"] = state.method.to_dict()
    return stats
