"""Procedural sprite videos: coloured circles, squares and triangles that move, bounce off the walls and occlude
each other, with a text prompt from a small grammar and the ground-truth track of every object.

Everything is deterministic from a seed (numpy's PCG64), drawn with vectorised masks (thousands of 64x64
frames per second on one CPU core), and needs no files or downloads. This is the training data of the tiny
model genkv ships (``eval/train_tiny.py``) and the ground truth of ``eval/quality_rollout.py``.

Example:
    >>> from genkv.data import make_video
    >>> video = make_video(seed=3, num_frames=8)
    >>> video.frames.shape, video.tracks.shape == (8, len(video.objects), 3)
    ((8, 64, 64, 3), True)
    >>> video.prompt.startswith("a ")
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Saturated, well separated colours (tracking by colour must not confuse them, nor the backgrounds with them).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "magenta": (220, 50, 210),
}
SHAPES = ("circle", "square", "triangle")
# Direction words of the grammar and their unit velocity (x right, y down).
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "diagonally": (0.7071, 0.7071),
}
BACKGROUNDS = ("plain", "checker", "stripes")
RADIUS = (0.09, 0.16)  # sprite radius range, as fractions of the frame size (6-10 px at 64x64)


@dataclass
class SpriteObject:
    """One sprite: its look, its start and its velocity in pixels per frame."""

    color: str
    shape: str
    direction: str
    radius: float
    x: float
    y: float
    vx: float
    vy: float

    def words(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}"


@dataclass
class SpriteVideo:
    """A rendered video: ``frames`` (T, H, W, 3) uint8, its ``prompt``, its ``objects`` (drawn in list order, so
    a later object occludes an earlier one) and ``tracks`` (T, N, 3) float32: centre x, centre y and 1.0 where
    the object's centre pixel shows its own colour (not occluded by a later object), else 0.0."""

    frames: np.ndarray
    prompt: str
    objects: list[SpriteObject]
    tracks: np.ndarray
    background: str
    seed: int
    size: int = 64
    meta: dict = field(default_factory=dict)


def sample_scene(seed: int, size: int = 64, max_objects: int = 3,
                 backgrounds: tuple[str, ...] = BACKGROUNDS,
                 radius: tuple[float, float] = RADIUS,
                 room_frames: int = 0) -> tuple[list[SpriteObject], str, np.ndarray]:
    """Objects (distinct colours), a background name (one of ``backgrounds``) and its base colour, all from
    ``seed``. Sprite radii are drawn from ``radius`` (fractions of ``size``).

    ``room_frames`` R > 0: every sprite starts where it can travel R frames the way its prompt says before it
    reaches a wall (where the frame is too small for that, at the wall behind it), so a clip's first R frames
    move as its prompt asks instead of bouncing early against it. Only the start positions change, each mapped
    from the same uniform draw onto the shorter range: colours, shapes, directions, speeds, the background and
    so the prompt are those of ``room_frames=0`` for the same seed.

    Example:
        >>> a, _, _ = sample_scene(5)
        >>> b, _, _ = sample_scene(5, room_frames=16)
        >>> [o.words() for o in a] == [o.words() for o in b]
        True
    """
    unknown = set(backgrounds) - set(BACKGROUNDS)
    if not backgrounds or unknown:
        raise ValueError(f"backgrounds must be a non-empty subset of {BACKGROUNDS}, got {backgrounds!r}")
    if not 0 < radius[0] <= radius[1] < 0.5:
        raise ValueError(f"radius must be (low, high) fractions of the frame, 0 < low <= high < 0.5; got {radius!r}")
    if room_frames < 0:
        raise ValueError(f"room_frames must be >= 0 (frames of travel before the first wall), got {room_frames}")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, max_objects + 1))
    colors = rng.choice(list(COLORS), size=n, replace=False)
    objects = []
    for color in colors:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        radius_px = float(rng.uniform(*radius) * size)
        speed = float(rng.uniform(0.8, 2.0) * size / 64)
        dx, dy = DIRECTIONS[direction]
        x, y = (float(v) for v in rng.uniform(radius_px, size - radius_px, size=2))
        if room_frames:
            x = _with_room(x, dx * speed, radius_px, size, room_frames)
            y = _with_room(y, dy * speed, radius_px, size, room_frames)
        objects.append(SpriteObject(str(color), shape, direction, radius_px, x, y, dx * speed, dy * speed))
    background = tuple(backgrounds)[int(rng.integers(len(backgrounds)))]
    base = rng.integers(20, 80, size=3)  # dark, low-saturation: never mistaken for a sprite colour
    return objects, background, base


def _with_room(pos: float, vel: float, r: float, size: int, frames: int) -> float:
    """``pos``, uniform on [r, size - r], mapped linearly onto the starts from which ``frames`` steps of ``vel``
    stay inside (no reflection in ``_step``); a still axis keeps its position."""
    lo, hi = r, size - r
    travel = min(abs(vel) * frames, hi - lo)
    if vel < 0:
        lo += travel
    elif vel > 0:
        hi -= travel
    return lo + (pos - r) / (size - 2 * r) * (hi - lo)


def prompt_for(objects: list[SpriteObject]) -> str:
    """The grammar: ``"a red circle moving left and a blue square moving down"``."""
    return " and ".join(o.words() for o in objects)


def _background(kind: str, base: np.ndarray, size: int) -> np.ndarray:
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = base
    if kind == "checker":
        yy, xx = np.mgrid[0:size, 0:size]
        img[((yy // 8 + xx // 8) % 2).astype(bool)] += 18
    elif kind == "stripes":
        yy = np.mgrid[0:size, 0:size][0]
        img[(yy // 6) % 2 == 0] += 14
    return img


def _shape_mask(shape: str, x: float, y: float, r: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    dx, dy = xx - x, yy - y
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    # An upward triangle inscribed in the circle of radius r: below the two slanted edges, above the base.
    base_y = y + r * 0.5
    return (yy <= base_y) & (dy >= -r) & (np.abs(dx) <= (yy - (y - r)) * 0.577)


def _step(o: SpriteObject, size: int) -> None:
    """Move one frame; reflect off the walls (the sprite's radius keeps it inside)."""
    o.x += o.vx
    o.y += o.vy
    for pos, vel in (("x", "vx"), ("y", "vy")):
        p = getattr(o, pos)
        if p < o.radius:
            setattr(o, pos, 2 * o.radius - p)
            setattr(o, vel, -getattr(o, vel))
        elif p > size - o.radius:
            setattr(o, pos, 2 * (size - o.radius) - p)
            setattr(o, vel, -getattr(o, vel))


def render_frames(objects: list[SpriteObject], background: str, base: np.ndarray, num_frames: int,
                  size: int = 64, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``[start, start + num_frames)`` of a scene and their tracks (objects are copied, not moved)."""
    objs = [SpriteObject(**vars(o)) for o in objects]
    for _ in range(start):
        for o in objs:
            _step(o, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    bg = _background(background, base, size)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    tracks = np.zeros((num_frames, len(objs), 3), dtype=np.float32)
    for t in range(num_frames):
        img = bg.copy()
        owner = np.full((size, size), -1, dtype=np.int64)
        for i, o in enumerate(objs):
            mask = _shape_mask(o.shape, o.x, o.y, o.radius, xx, yy)
            img[mask] = COLORS[o.color]
            owner[mask] = i
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
        for i, o in enumerate(objs):
            cx, cy = min(int(o.x), size - 1), min(int(o.y), size - 1)
            tracks[t, i] = (o.x, o.y, float(owner[cy, cx] == i))
        for o in objs:
            _step(o, size)
    return frames, tracks


def make_video(seed: int, num_frames: int = 45, size: int = 64, max_objects: int = 3, start: int = 0,
               backgrounds: tuple[str, ...] = BACKGROUNDS, radius: tuple[float, float] = RADIUS,
               room_frames: int = 0) -> SpriteVideo:
    """A deterministic sprite video (see the module docstring). ``start`` skips that many frames first, so long
    videos can be produced piece by piece with the same result as in one go; ``room_frames`` as in
    :func:`sample_scene`."""
    objects, background, base = sample_scene(seed, size, max_objects, backgrounds, radius, room_frames)
    frames, tracks = render_frames(objects, background, base, num_frames, size, start)
    return SpriteVideo(frames, prompt_for(objects), objects, tracks, background, seed, size)


def vocabulary() -> list[str]:
    """Every word the grammar can produce (the shipped tokenizer's vocabulary, besides special tokens)."""
    words = {"a", "and", "moving"} | set(COLORS) | set(SHAPES) | set(DIRECTIONS)
    return sorted(words)
