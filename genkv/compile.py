"""Opt-in ``torch.compile`` of a patched Wan transformer (regional: one compiled block, reused 30 times).

The genkv processors reach the cache through two opaque custom ops (``genkv::cached_self_attention``,
``genkv::cached_prompt_attention``; see ``genkv.processors``), so each block compiles into one graph for the
projections, norms, modulation, RoPE and FFN around those two calls, shared by all blocks. Shapes inside the
blocks are fixed by the chunk size, so nothing recompiles as the cache grows or rolls.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch


def compile_transformer(transformer: torch.nn.Module, mode: str | None = None, backend: Any = "inductor"
                        ) -> torch.nn.Module:
    """Compile each transformer block in place with ``torch.compile(dynamic=False)``; returns the model.

    Compilation happens at the first forward. If it fails there (a compiler error, not an error of the model),
    a warning names the error, the blocks go back to eager and the forward runs eagerly: the same numbers,
    slower, rather than a render that stops.

    Example::

        pipe = genkv.apply_genkv(pipe, "rolling")
        genkv.compile.compile_transformer(pipe.transformer)   # first chunk pays the compile time
    """
    blocks = getattr(transformer, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(transformer).__name__} has no `blocks` to compile")
    # Room for a few variants per block (attention backends, a layout change) before dynamo would run eagerly.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(blocks))
    for block in blocks:
        block.compile(dynamic=False, mode=mode, backend=backend)
    if "forward" not in transformer.__dict__:
        transformer.forward = types.MethodType(_forward_or_uncompile, transformer)
    return transformer


def uncompile_transformer(transformer: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`compile_transformer`: the blocks run eagerly again."""
    for block in getattr(transformer, "blocks", ()):
        block._compiled_call_impl = None
    if isinstance(transformer.__dict__.get("forward"), types.MethodType):
        if transformer.__dict__["forward"].__func__ is _forward_or_uncompile:
            del transformer.forward
    return transformer


def _compiler_errors() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [torch._dynamo.exc.TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError

        kinds.append(InductorError)
    except ImportError:  # pragma: no cover - older torch
        pass
    return tuple(kinds)


def _forward_or_uncompile(self: torch.nn.Module, *args, **kwargs):
    forward = type(self).forward
    try:
        return forward(self, *args, **kwargs)
    except _compiler_errors() as error:
        # Compiling happens inside the first forward, before any block's work is final (the cache staging it
        # did is redone by the eager forward), so running the whole forward again eagerly is safe.
        root = getattr(error, "inner_exception", None) or error.__cause__ or error  # what the compiler raised
        text = str(root).strip()
        message = text.splitlines()[0][:300] if text else ""
        warnings.warn(f"genkv: compiling the transformer blocks failed ({type(root).__name__}: {message}); "
                      "running them eagerly", RuntimeWarning, stacklevel=2)
        uncompile_transformer(self)
        return forward(self, *args, **kwargs)


class CompiledOnCuda:
    """A pure tensor function that runs ``torch.compile``-d on CUDA inputs and eagerly elsewhere.

    For small hot functions whose eager form is many elementwise kernels over large intermediates (TempCache's
    merge scores, the VAE's RMS norms): compiled, they fuse into a few kernels. The compiled function is built
    on first CUDA use; if compiling fails, a warning says so once and the eager function (same arithmetic)
    runs from then on. ``recompile_limit`` raises dynamo's limit for functions fed many shapes or layouts
    (past it dynamo would quietly run eagerly).

    Example:
        >>> double = CompiledOnCuda(lambda x: 2 * x, "doubling")
        >>> double(torch.ones(2)).tolist()                 # a CPU tensor: the eager function
        [2.0, 2.0]
    """

    def __init__(self, fn, name: str, recompile_limit: int | None = None) -> None:
        self.fn = fn
        self.name = name
        self.recompile_limit = recompile_limit
        self._compiled = None
        self._failed = False

    def __call__(self, first: torch.Tensor, *args):
        if first.device.type != "cuda" or self._failed:
            return self.fn(first, *args)
        if self._compiled is None:
            if self.recompile_limit is not None:
                config = torch._dynamo.config
                name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
                setattr(config, name, max(getattr(config, name), self.recompile_limit))
            self._compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self._compiled(first, *args)
        except Exception as error:  # noqa: BLE001 - any compiler failure: the eager function computes the same
            warnings.warn(f"{self.name}: compiling failed ({error!r:.200}); running eagerly", stacklevel=2)
            self._failed = True
            return self.fn(first, *args)
