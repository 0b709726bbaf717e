"""Swap a module's ``forward`` for another function and back, per instance (the VAE decoder's opt-in kernels)."""

from __future__ import annotations

import types
from typing import Callable

import torch


_OPTIONS = "_forward_options"  # per-instance settings a patched forward reads (see patch_forward's ``options``)
_REPLACED = "_replaced_forward"  # the class's forward a patch replaced, as a plain function (see replaced_forward)


def patch_forward(module: torch.nn.Module, eligible: Callable[[torch.nn.Module], bool], forward: Callable,
                  **options) -> int:
    """Bind ``forward`` as the forward of every submodule of ``module`` that is ``eligible`` and not already
    patched; returns how many. Parameters and the class are untouched. ``options`` are stored on every eligible
    submodule patched with ``forward`` (newly or before, so applying again updates them); the forward reads them
    with :func:`forward_option`, and :func:`unpatch_forward` removes them.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh())
        >>> shift = lambda self, x: x + forward_option(self, "by", 1)
        >>> patch_forward(net, lambda m: isinstance(m, torch.nn.ReLU), shift, by=2)
        1
        >>> net(torch.zeros(1)).item() == torch.tanh(torch.full((1,), 2.0)).item()
        True
        >>> unpatch_forward(net, shift), forward_option(net[0], "by", None)
        (1, None)
    """
    count = 0
    for child in module.modules():
        if not eligible(child):
            continue
        if "forward" not in child.__dict__:
            child.__dict__[_REPLACED] = type(child).forward
            child.forward = types.MethodType(forward, child)
            count += 1
        if is_patched(child, forward) and options:
            child.__dict__[_OPTIONS] = dict(options)
    return count


def replaced_forward(module: torch.nn.Module) -> Callable:
    """The class's ``forward`` that :func:`patch_forward` replaced on ``module``, for a patched forward to fall back
    on. Kept on the instance when it was patched: Dynamo traces a call of it, but not ``type(self).forward`` on some
    classes (diffusers' Wan block: a graph break)."""
    return module.__dict__[_REPLACED]


def forward_option(module: torch.nn.Module, name: str, default=None):
    """An option :func:`patch_forward` stored on ``module`` (``default`` if none was)."""
    return module.__dict__.get(_OPTIONS, {}).get(name, default)


def unpatch_forward(module: torch.nn.Module, forward: Callable) -> int:
    """Undo :func:`patch_forward` for ``forward`` under ``module`` (its options too); returns how many submodules
    were restored."""
    count = 0
    for child in module.modules():
        if is_patched(child, forward):
            del child.forward
            child.__dict__.pop(_OPTIONS, None)
            child.__dict__.pop(_REPLACED, None)
            count += 1
    return count


def is_patched(module: torch.nn.Module, forward: Callable) -> bool:
    """Whether :func:`patch_forward` bound ``forward`` to ``module`` itself."""
    bound = module.__dict__.get("forward")
    return isinstance(bound, types.MethodType) and bound.__func__ is forward
