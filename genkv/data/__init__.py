"""Procedural training and evaluation data (see :mod:`genkv.data.sprites`)."""

from .sprites import COLORS, SHAPES, SpriteObject, SpriteVideo, make_video, prompt_for, sample_scene, vocabulary

__all__ = ["COLORS", "SHAPES", "SpriteObject", "SpriteVideo", "make_video", "prompt_for", "sample_scene", "vocabulary"]
