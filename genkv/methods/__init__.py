"""Registered methods: one module per method; importing this package registers them all."""

from .base import GenKVMethod
from .full import Full
from .rolling import Rolling
from .tempcache import TempCache
from .annca import AnnCA
from .annsa import AnnSA
from .fastar import FastAR
from .scalekv import ScaleKV
from .hack import HACK

__all__ = ["GenKVMethod", "Full", "Rolling", "TempCache", "AnnCA", "AnnSA", "FastAR", "ScaleKV", "HACK"]
