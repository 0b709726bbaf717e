"""Does a sprite video show what its prompt asks? Colour, count and motion, measured by colour tracking.

The sprite grammar (``genkv.data.sprites``) names each sprite's colour and direction: ``"a red circle moving left
and a blue square moving down"``. From the colour tracks of :func:`genkv.metrics.persistence.colour_tracks`:

- **colour present**: per asked colour, the fraction of frames where it covers at least ``min_area`` pixels;
- **colour absent**: per colour *not* asked, the fraction of frames where it shows anyway (should be ~0);
- **all present** (two-sprite prompts: two separate tracks): the fraction of frames where every asked colour is
  present at once (two sprites that blend into one mixed colour match neither);
- **direction**: per asked sprite, whether its centroid moves the asked way over the first second: at least half
  of its frame-to-frame steps there go at least ``min_step`` pixels along the asked direction. Sprites bounce off
  the walls, so even the data's own videos move against the prompt where a sprite starts at a wall; **axis**
  ignores the sign (left/right, up/down, or both components for "diagonally"), which a bounce does not change;
- **direction / axis over quarter seconds** (``*_quarter``): the same tests on the moves between frames
  ``quarter`` apart (4 at 16 fps) instead of on each step, at ``quarter`` times ``min_step``. A generated
  sprite's centroid jitters by a pixel or two from frame to frame (its outline changes), which fails the
  per-step axis test on steps of about that size even when the sprite travels along the asked axis; over a
  quarter second the travel outweighs the jitter, and a bounce spoils a few moves only;
- **edge energy**: the mean squared gradient of the frames, for sharpness against the data's (a blurred sprite
  has less).

Example:
    >>> from genkv.data import make_video
    >>> from genkv.metrics.prompt_following import prompt_following
    >>> video = make_video(seed=3, num_frames=32, max_objects=2)
    >>> report = prompt_following(video.frames, video.prompt, fps=16)
    >>> min(report["colour_present"].values()) > 0.9
    True
"""

from __future__ import annotations

import re

import numpy as np

from genkv.data import COLORS
from genkv.data.sprites import DIRECTIONS, SHAPES
from genkv.metrics.persistence import colour_tracks

_SPRITE = re.compile(rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) moving ({'|'.join(DIRECTIONS)})")


def parse_prompt(prompt: str) -> list[tuple[str, str, str]]:
    """(colour, shape, direction) of each sprite of a grammar prompt; a ValueError names what does not parse.

    Example:
        >>> parse_prompt("a red circle moving left and a blue square moving down")
        [('red', 'circle', 'left'), ('blue', 'square', 'down')]
    """
    parts = prompt.strip().split(" and ")
    sprites = []
    for part in parts:
        match = _SPRITE.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"{part.strip()!r} is not 'a COLOUR SHAPE moving DIRECTION' of the sprite grammar "
                             f"(colours {', '.join(COLORS)}; shapes {', '.join(SHAPES)}; directions "
                             f"{', '.join(DIRECTIONS)})")
        sprites.append(match.groups())
    return sprites


def edge_energy(frames: np.ndarray) -> float:
    """Mean squared gradient (central differences, grey levels 0-255) over the frames (T, H, W, 3). Squared: a
    blur spreads an edge over more pixels with about the same total gradient, but less of its square."""
    grey = np.asarray(frames, dtype=np.float64).mean(-1)
    gy, gx = np.gradient(grey, axis=(1, 2))
    return float((gx**2 + gy**2).mean())


def prompt_following(frames: np.ndarray, prompt: str, fps: float = 16.0, min_area: int = 12,
                     min_step: float = 0.25, tolerance: int = 90, quarter: int | None = None) -> dict:
    """The measures of the module docstring for one video (T, H, W, 3) uint8 and its grammar prompt; ``quarter``
    (frames between the moves of the ``*_quarter`` measures) defaults to a quarter of ``fps``."""
    sprites = parse_prompt(prompt)
    frames = np.asarray(frames)
    tracks = colour_tracks(frames, tolerance=tolerance)
    present = {name: tr["area"] >= min_area for name, tr in tracks.items()}
    asked = [colour for colour, _, _ in sprites]
    second = max(2, int(round(fps)))
    quarter = quarter or max(2, int(round(fps / 4)))
    direction, axis, direction_q, axis_q = {}, {}, {}, {}
    for colour, _, word in sprites:
        centre = tracks[colour]["centroid"][:second]
        ok = present[colour][:second]
        direction[colour], axis[colour] = _moves_as_asked(centre, ok, word, second, 1, min_step)
        direction_q[colour], axis_q[colour] = _moves_as_asked(centre, ok, word, second, quarter, min_step * quarter)
    return {
        "frames": len(frames),
        "sprites": len(sprites),
        "colour_present": {c: float(present[c].mean()) for c in asked},
        "colour_absent": {c: float(present[c].mean()) for c in COLORS if c not in asked},
        "all_present": float(np.stack([present[c] for c in asked]).all(0).mean()),
        "direction_matches": direction,
        "axis_matches": axis,
        "direction_matches_quarter": direction_q,
        "axis_matches_quarter": axis_q,
        "edge_energy": edge_energy(frames),
    }


def _moves_as_asked(centre: np.ndarray, ok: np.ndarray, word: str, second: int, apart: int,
                    least: float) -> tuple[bool, bool]:
    """(direction, axis) of one track over its first ``second`` frames: of its moves between tracked frames
    ``apart`` apart (at least half of a second's), do at least half go ``least`` pixels the asked way, and along
    the asked axis?"""
    both = ok[:-apart] & ok[apart:]
    moves = (centre[apart:] - centre[:-apart])[both]  # (n, 2) x, y
    if len(moves) < max(1, (second - apart + 1) // 2):
        return False, False
    unit = np.asarray(DIRECTIONS[word])
    direction = bool(((moves @ unit) >= least).mean() >= 0.5)
    # Sign-agnostic: the sprite moves along the asked axis (a bounce reverses the sign, not the axis; a diagonal
    # reverses one component at a time, so both components must move, at similar speeds).
    dx, dy = np.abs(moves[:, 0]), np.abs(moves[:, 1])
    if word == "diagonally":
        on_axis = (np.minimum(dx, dy) >= least * unit[0]) & (np.minimum(dx, dy) >= 0.5 * np.maximum(dx, dy))
    else:
        main, other = (dx, dy) if unit[0] else (dy, dx)
        on_axis = (main >= least) & (other <= 0.5 * main)
    return direction, bool(on_axis.mean() >= 0.5)


def summarize(reports: list[dict]) -> dict:
    """Over many videos: per colour word the mean fraction of frames it is present where asked (and where not),
    two-sprite videos' mean fraction of frames with both present, and the share of sprites moving as asked."""
    asked: dict[str, list[float]] = {}
    unasked: dict[str, list[float]] = {}
    for r in reports:
        for c, v in r["colour_present"].items():
            asked.setdefault(c, []).append(v)
        for c, v in r["colour_absent"].items():
            unasked.setdefault(c, []).append(v)
    pairs = [r["all_present"] for r in reports if r["sprites"] == 2]
    moves = [m for r in reports for m in r["direction_matches"].values()]
    axes = [m for r in reports for m in r["axis_matches"].values()]
    moves_q = [m for r in reports for m in r["direction_matches_quarter"].values()]
    axes_q = [m for r in reports for m in r["axis_matches_quarter"].values()]
    return {
        "videos": len(reports),
        "colour_present": {c: float(np.mean(v)) for c, v in sorted(asked.items())},
        "colour_shown_unasked": {c: float(np.mean(v)) for c, v in sorted(unasked.items())},
        "two_sprites_both_present": float(np.mean(pairs)) if pairs else None,
        "direction_matches": float(np.mean(moves)) if moves else None,
        "axis_matches": float(np.mean(axes)) if axes else None,
        "direction_matches_quarter": float(np.mean(moves_q)) if moves_q else None,
        "axis_matches_quarter": float(np.mean(axes_q)) if axes_q else None,
        "edge_energy": float(np.mean([r["edge_energy"] for r in reports])) if reports else None,
    }
