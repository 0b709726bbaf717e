"""Opt-in ``torch.compile`` of a patched Wan transformer (regional: one compiled block, reused 30 times).

The genkv processors keep their cache bookkeeping behind ``torch.compiler.disable``, so each block compiles
into graphs for the projections, norms, modulation, RoPE and FFN around two eager islands (cached
self-attention, cached prompt attention). Shapes inside the blocks are fixed by the chunk size, so nothing
recompiles as the cache grows or rolls.
"""

from __future__ import annotations

import torch


def compile_transformer(transformer: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
    """Compile each transformer block in place with ``torch.compile(dynamic=False)``; returns the model.

    Example::

        pipe = genkv.apply_genkv(pipe, "rolling")
        genkv.compile.compile_transformer(pipe.transformer)   # first chunk pays the compile time
    """
    blocks = getattr(transformer, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(transformer).__name__} has no `blocks` to compile")
    # Graph breaks around the eager islands add a few compiled frames per block; allow them all.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(blocks))
    for block in blocks:
        block.compile(dynamic=False, mode=mode)
    return transformer
