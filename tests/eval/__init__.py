"""Tests of the scripts under ``eval/`` (benchmarks, evaluations, training), which are not part of the package."""

import importlib
import sys
from pathlib import Path
from types import ModuleType

EVAL = Path(__file__).resolve().parents[2] / "eval"


def import_eval_script(name: str) -> ModuleType:
    """The script ``eval/<name>.py`` as a module. ``eval/`` is put on ``sys.path`` for the import and taken off
    after it (the scripts import their siblings by plain name); a script that adds it itself keeps its own entry."""
    sys.path.insert(0, str(EVAL))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EVAL))
