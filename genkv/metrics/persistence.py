"""Long-rollout measures that need no downloaded network: sprite persistence by colour, and temporal flicker.

Sprites are tracked by colour: a pixel belongs to a sprite colour when it lies within ``tolerance`` (L1 over
RGB) of it. Per frame and colour this gives the pixel area, the centroid and the mean colour of those pixels.
From that: how many sprites are present, how smoothly their centroids move (a jump larger than ``max_jump``
pixels between consecutive frames is a break in the track), and how far their colour drifts from the first
second to the last. Flicker is the mean absolute difference of consecutive frames.

Example:
    >>> from genkv.data import make_video
    >>> from genkv.metrics.persistence import object_persistence
    >>> video = make_video(seed=1, num_frames=32)
    >>> report = object_persistence(video.frames, fps=16)
    >>> report["objects_first_second"] >= 1
    True
"""

from __future__ import annotations

import numpy as np

from genkv.data import COLORS


def colour_tracks(frames: np.ndarray, colours: dict[str, tuple[int, int, int]] | None = None,
                  tolerance: int = 90) -> dict[str, np.ndarray]:
    """Per colour: ``area`` (T,), ``centroid`` (T, 2) x/y in pixel-centre coordinates (NaN where absent) and
    ``mean_colour`` (T, 3) of the matched pixels (NaN where absent). ``frames`` is (T, H, W, 3) uint8."""
    colours = COLORS if colours is None else colours
    frames = np.asarray(frames)
    t, h, w, _ = frames.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    pixels = frames.astype(np.int32)
    out = {}
    for name, rgb in colours.items():
        match = np.abs(pixels - np.array(rgb, dtype=np.int32)).sum(-1) <= tolerance  # (T, H, W)
        area = match.sum(axis=(1, 2)).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            cx = (match * xx).sum(axis=(1, 2)) / area
            cy = (match * yy).sum(axis=(1, 2)) / area
            mean = (pixels * match[..., None]).sum(axis=(1, 2)) / area[:, None]
        out[name] = {"area": area, "centroid": np.stack([cx, cy], -1), "mean_colour": mean}
    return out


def object_persistence(frames: np.ndarray, fps: float = 16.0, min_area: int = 12, max_jump: float = 8.0,
                       tolerance: int = 90) -> dict:
    """Summary of sprite persistence over a video (see the module docstring) plus per-frame series."""
    tracks = colour_tracks(frames, tolerance=tolerance)
    t = len(frames)
    second = max(1, int(round(fps)))
    present = np.stack([tr["area"] >= min_area for tr in tracks.values()], 1)  # (T, colours)
    count = present.sum(1)
    first = present[:second].mean(0) > 0.5  # colours present in the first second
    survive = present[-second:].mean(0) > 0.5
    jumps, breaks, drift = [], 0, []
    for k, (name, tr) in enumerate(tracks.items()):
        if not first[k]:
            continue
        c = tr["centroid"]
        ok = present[:-1, k] & present[1:, k]
        step = np.linalg.norm(c[1:] - c[:-1], axis=-1)[ok]
        jumps.extend(step.tolist())
        breaks += int((step > max_jump).sum())
        if survive[k]:
            early = np.nanmean(tr["mean_colour"][:second][present[:second, k]], axis=0)
            late = np.nanmean(tr["mean_colour"][-second:][present[-second:, k]], axis=0)
            drift.append(float(np.abs(early - late).sum()))
    return {
        "frames": t,
        "objects_per_frame": count.tolist(),
        "objects_first_second": int(first.sum()),
        "objects_last_second": int(survive.sum()),
        "objects_kept": int((first & survive).sum()),
        "median_step_px": float(np.median(jumps)) if jumps else None,
        "track_breaks": breaks,
        "colour_drift_l1": float(np.mean(drift)) if drift else None,
    }


def flicker_per_frame(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference (0-255 scale) between each frame and the one before it: (T - 1,)."""
    f = np.asarray(frames).astype(np.float32)
    return np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3))
