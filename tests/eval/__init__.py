"""Tests of the scripts under ``eval/`` (benchmarks, evaluations, training), which are not part of the package."""
import importlib
import sys
from pathlib import Path
from types import ModuleType

EVAL = Path(__file__).resolve().parents[2] / "eval"


def import_eval_script(name: str) -> ModuleType:
    """The script ``eval/<name>.py`` as a module, imported with ``eval/`` on ``sys.path`` only for the import (the
    scripts import their siblings by plain name, and a lasting path entry would let them shadow test modules)."""
    sys.path.insert(0, str(EVAL))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EVAL))
