"""Infinity's scale schedules (``infinity/utils/dynamic_resolution.py`` of the official code): per aspect ratio
``h / w``, 13 token-grid sizes (h, w); an image size ``pn`` uses the first 7 ('0.06M', 256px at 1:1), 10
('0.25M'), 12 ('0.60M') or all 13 ('1M', 1024px). The VAE's stride is 16 pixels per token. The released 2B/8B
weights are 1M-pixel models: smaller schedules give poor images.

Example:
    >>> scale_schedule("1M", 1.0)[-3:]
    ((40, 40), (48, 48), (64, 64))
    >>> sum(h * w for h, w in scale_schedule("0.06M", 1.0))
    521
    >>> scale_schedule("0.06M", 0.56)[-1]   # the nearest template ratio is 1.75's inverse, 0.571
    (12, 21)
"""

from __future__ import annotations

#: The 13 (h, w) grids of each template ratio h / w >= 1 (the inverse ratios swap h and w).
_GRIDS: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
            (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
            (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
            (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
            (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
            (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
            (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
            (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
            (90, 30), (111, 37)),
}

#: How many scales each image size uses.
PIXELS = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

VAE_STRIDE = 16


def _templates() -> dict[float, tuple[tuple[int, int], ...]]:
    grids = dict(_GRIDS)
    for ratio, hws in _GRIDS.items():
        if ratio != 1.0:
            # The official key of an inverse ratio is truncated to three decimals (1/1.75 -> 0.571).
            grids[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in hws)
    return grids


TEMPLATES = _templates()


def nearest_ratio(h_div_w: float) -> float:
    """The template ratio closest to ``h_div_w`` (the official code's ``argmin |h_div_w - template|``; the
    first template wins a tie)."""
    if h_div_w <= 0:
        raise ValueError(f"h_div_w must be positive, got {h_div_w}")
    return min(TEMPLATES, key=lambda r: abs(h_div_w - r))


def scale_schedule(pn: str = "1M", h_div_w: float = 1.0) -> tuple[tuple[int, int], ...]:
    """The (h, w) token grids Infinity samples for image size ``pn`` at the template ratio nearest ``h_div_w``."""
    if pn not in PIXELS:
        raise ValueError(f"unknown pn {pn!r}: choose one of {', '.join(PIXELS)}")
    return TEMPLATES[nearest_ratio(h_div_w)][: PIXELS[pn]]


def full_schedule(schedule: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The 1M schedule whose prefix ``schedule`` is (RoPE positions are normalised by its last grid)."""
    for grids in TEMPLATES.values():
        if tuple(grids[: len(schedule)]) == tuple(schedule):
            return grids
    raise ValueError(f"scale schedule {list(schedule)} is not a prefix of any official schedule")
