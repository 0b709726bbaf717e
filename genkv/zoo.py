"""Models bundled inside genkv (no download), by name: what ``genkv render --model NAME`` accepts besides a folder.

A bundled model is a saved ``SelfForcingPipeline`` folder under ``genkv/assets/NAME`` (package data), listed in
:data:`SHIPPED`. ``sprites-tiny`` is the tiny sprite model genkv trains itself (``eval/train_tiny.py``,
``docs/MODEL_CARD.md``): what ``genkv render`` uses without ``--model``.

Example:
    >>> from genkv.zoo import DEFAULT_MODEL, SHIPPED, shipped_model_path
    >>> DEFAULT_MODEL in SHIPPED and shipped_model_path(DEFAULT_MODEL).name == DEFAULT_MODEL
    True
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
#: name -> one line on what it is
SHIPPED: dict[str, str] = {
    "sprites-tiny": "64x64 coloured sprites from prompts like 'a red circle moving left' (5 M-parameter Wan "
    "transformer, 16 MB; trained by eval/train_tiny.py; docs/MODEL_CARD.md)",
}
#: what ``genkv render`` loads without ``--model``
DEFAULT_MODEL = "sprites-tiny"


def shipped_model_path(name: str) -> Path:
    """The folder (a saved ``SelfForcingPipeline``) of a bundled model; ``KeyError`` naming the bundled ones."""
    if name not in SHIPPED:
        listed = ", ".join(SHIPPED) or "none in this version"
        raise KeyError(f"unknown bundled model {name!r}; bundled: {listed}")
    return ASSETS / name


def load_shipped(name: str, device: str = "cpu", dtype=None):
    """Load a bundled model as a ``SelfForcingPipeline`` (float32 on a CPU, bf16 elsewhere, unless ``dtype``).

    Example::

        pipe = load_shipped("sprites-tiny")
        video = pipe("a red circle moving left", num_frames=16).frames[0]
    """
    import torch

    from genkv.pipelines import SelfForcingPipeline

    path = shipped_model_path(name)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"the bundled model {name!r} is missing from this install ({path}); reinstall genkv")
    dtype = dtype or (torch.float32 if str(device) == "cpu" else torch.bfloat16)
    return SelfForcingPipeline.from_pretrained(path, torch_dtype=dtype).to(device)
