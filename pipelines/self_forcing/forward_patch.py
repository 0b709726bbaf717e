"""Swap a module's ``forward`` for another function and back, per instance (the VAE decoder's opt-in kernels)."""

from __future__ import annotations

import types
from typing import Callable

import torch


def patch_forward(module: torch.nn.Module, eligible: Callable[[torch.nn.Module], bool], forward: Callable) -> int:
    """Bind ``forward`` as the forward of every submodule of ``module`` that is ``eligible`` and not already
    patched; returns how many. Parameters and the class are untouched.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh())
        >>> patch_forward(net, lambda m: isinstance(m, torch.nn.ReLU), lambda self, x: x + 1)
        1
        >>> net(torch.zeros(1)).item() == torch.tanh(torch.ones(1)).item()
        True
        >>> unpatch_forward(net, net[0].forward.__func__)
        1
    """
    count = 0
    for child in module.modules():
        if eligible(child) and "forward" not in child.__dict__:
            child.forward = types.MethodType(forward, child)
            count += 1
    return count


def unpatch_forward(module: torch.nn.Module, forward: Callable) -> int:
    """Undo :func:`patch_forward` for ``forward`` under ``module``; returns how many submodules were restored."""
    count = 0
    for child in module.modules():
        bound = child.__dict__.get("forward")
        if isinstance(bound, types.MethodType) and bound.__func__ is forward:
            del child.forward
            count += 1
    return count


def is_patched(module: torch.nn.Module, forward: Callable) -> bool:
    """Whether :func:`patch_forward` bound ``forward`` to ``module`` itself."""
    bound = module.__dict__.get("forward")
    return isinstance(bound, types.MethodType) and bound.__func__ is forward
