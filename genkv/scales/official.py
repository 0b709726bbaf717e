"""ScaleKV as its authors run it (github StargazerX0/ScaleKV, MIT: ``scale_kv.py``, ``enable_scale_kv_*.py``,
``budgets/*.json``), re-written from the published code for genkv's scale caches.

What the official code does, and what :class:`OfficialScaleCache` therefore does after each scale's attention
(per layer; ``n`` = tokens in the layer's cache, the current scale included):

- nothing until a cache first exceeds ``base_capacity`` tokens; from then on every scale is compressed (the
  official ``has_reached_base`` latch). The official scripts pass ``max_capacity=650`` as ``base_capacity``
  (the class default 121 crashes with the shipped files, which have no caps before scale 7);
- caps are absolute token counts per (layer, scale): from a budgets file, or :func:`official_style_caps`;
  a cache of at most ``cap`` tokens is left alone;
- the observation window: a ``sqrt(window)``-square grid over the current ``side x side`` scale, patch centres
  at ``i * (side // g) + (side // g - 1) // 2`` (side 10 -> 0, 2, 4, 6; 16 -> 1, 5, 9, 13); below ``g`` (or for a
  non-square ``window``) the last ``window`` tokens of the cache;
- scores: the window queries' raw logits ``q . k / sqrt(d)`` (no softmax) summed over the window, window columns
  at ``-inf``, a stride-1 max-pool of ``pool_kernel`` along the sequence, window tokens at ``-inf`` again;
  top-``(cap - window)`` per (batch row, head), kept with the window, in cache order.

Where genkv differs, on purpose:

- the start/class token (cache position 0) is never evicted (``keep_start``): it takes one of the
  non-window slots (the official code may drop it);
- a cap below the window (the official code raises ``UnboundLocalError``) keeps the window, as the official
  warning says it means to, plus the start token;
- scores are computed in float32 at least (the official code uses the cache's dtype) and in slices of the
  batch, so a large batch never holds a float32 copy of every key at once;
- the official code re-computes the scoring queries from the block input without ``q_bias``, the cosine
  normalisation, ``scale_mul`` or RoPE; genkv scores with the queries the attention used.

Budgets files (the official format): ``{"Scale 9": {"Block 0": 1, ..., "Max": 920, "Min": 632, ...}, ...}``; a
block marked 1 (a drafter) keeps ``Max`` tokens, the others ``Min``. ``"Scale N"`` serves scale index ``N - 2``
of Infinity's 13-scale 1M schedule, and the last scale (12) reuses ``"Scale 13"``, so a file fits a model with
13 scales and as many layers as it has blocks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .cache import FullScaleCache

#: scales of the model the official files are written for (Infinity 1M, 1:1: 1, 2, 4, ..., 64)
OFFICIAL_NUM_SCALES = 13


def cumulative(patch_nums: tuple[int, ...]) -> list[int]:
    """Tokens in a full cache after each scale.

    Example:
        >>> cumulative((1, 2, 4, 6))
        [1, 5, 21, 57]
    """
    out, seen = [], 0
    for p in patch_nums:
        seen += p * p
        out.append(seen)
    return out


def read_budgets_json(path: str | Path) -> dict:
    """The JSON object in a budgets file, or a one-line ``ValueError`` (missing file, not JSON)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"budgets file {str(path)!r} not found; write one with `genkv calibrate` or pass an "
                         f"official ScaleKV budgets/*.json")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"budgets file {str(path)!r} is not JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"budgets file {str(path)!r} holds a {type(data).__name__}, not a JSON object")
    return data


def is_official_format(data: dict) -> bool:
    """Whether a budgets JSON is in the official ScaleKV format (``"Scale N"`` keys)."""
    return bool(data) and all(key.startswith("Scale ") for key in data)


@dataclass
class OfficialCaps:
    """Absolute caps ``caps[layer][scale]`` (None: the file has none for that scale) and the cache size past
    which compression starts."""

    caps: list[list[int | None]]
    base_capacity: int

    def start_scale(self, patch_nums: tuple[int, ...]) -> int:
        """The first scale whose full cache exceeds ``base_capacity`` (the official latch flips there)."""
        return next((s for s, n in enumerate(cumulative(patch_nums)) if n > self.base_capacity), len(patch_nums))

    def check(self, patch_nums: tuple[int, ...], where: str) -> None:
        """Refuse caps that leave a compressed scale without a cap (the official code crashes there)."""
        start = self.start_scale(patch_nums)
        for s in range(start, len(patch_nums) - 1):  # the last scale's cache is never read again
            if any(row[s] is None for row in self.caps):
                first = next(t for t in range(len(patch_nums)) if all(row[t] is not None for row in self.caps))
                raise ValueError(f"base_capacity={self.base_capacity} starts compression at scale {s}, but {where} "
                                 f"has caps only from scale {first} on; pass a base_capacity of at least "
                                 f"{cumulative(patch_nums)[first - 1]} (the official scripts pass 650)")


def load_official_budgets(path: str | Path, depth: int, patch_nums: tuple[int, ...],
                          base_capacity: int | None = None) -> OfficialCaps:
    """Caps from an official ``budgets/*.json`` as it is (module docstring). ``base_capacity`` None: compression
    starts at the first scale the file covers (what the official scripts' 650 does with the shipped files).

    Example:
        >>> import json, tempfile
        >>> scales = {f"Scale {n}": {"Block 0": 1, "Block 1": 0, "Max": 900, "Min": 600} for n in range(9, 14)}
        >>> path = tempfile.mkstemp(suffix=".json")[1]
        >>> _ = open(path, "w").write(json.dumps(scales))
        >>> infinity = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
        >>> caps = load_official_budgets(path, depth=2, patch_nums=infinity)
        >>> caps.caps[0][7], caps.caps[1][7], caps.caps[1][12], caps.caps[1][6], caps.base_capacity
        (900, 600, 600, None, 521)
        >>> load_official_budgets(path, depth=3, patch_nums=(1, 2, 3, 4))
        Traceback (most recent call last):
        ...
        ValueError: budgets file '...' is an official ScaleKV file for 2 layers x 13 scales (Infinity 1M); this model has 3 layers x 4 scales
    """
    data = read_budgets_json(path)
    if not is_official_format(data):
        raise ValueError(f"budgets file {str(path)!r} is not in the official ScaleKV format (\"Scale N\" keys)")
    blocks = {sum(key.startswith("Block ") for key in scale) for scale in data.values()}
    if len(blocks) != 1:
        raise ValueError(f"budgets file {str(path)!r} lists different numbers of blocks per scale: {sorted(blocks)}")
    (file_depth,) = blocks
    if file_depth != depth or len(patch_nums) != OFFICIAL_NUM_SCALES:
        raise ValueError(f"budgets file {str(path)!r} is an official ScaleKV file for {file_depth} layers x "
                         f"{OFFICIAL_NUM_SCALES} scales (Infinity 1M); this model has {depth} layers x "
                         f"{len(patch_nums)} scales")
    caps: list[list[int | None]] = [[None] * len(patch_nums) for _ in range(depth)]
    for s in range(len(patch_nums)):
        entry = data.get(f"Scale {min(s, OFFICIAL_NUM_SCALES - 2) + 2}")  # the last scale reuses the one before
        if entry is None:
            continue
        try:
            for layer in range(depth):
                caps[layer][s] = int(entry["Max"] if entry[f"Block {layer}"] == 1 else entry["Min"])
        except KeyError as err:
            raise ValueError(f"budgets file {str(path)!r}: 'Scale {min(s, 11) + 2}' has no {err}") from None
    covered = [s for s in range(len(patch_nums)) if caps[0][s] is not None]
    if not covered:
        raise ValueError(f"budgets file {str(path)!r} has no 'Scale 2'..'Scale 13' entry")
    if base_capacity is None:
        base_capacity = cumulative(patch_nums)[covered[0] - 1] if covered[0] > 0 else 0
    out = OfficialCaps(caps, base_capacity)
    out.check(tuple(patch_nums), f"budgets file {str(path)!r}")
    return out


def official_style_caps(depth: int, patch_nums: tuple[int, ...], budget: float, drafters: tuple[int, ...] = (0,),
                        window: int = 16, refiner_floor: float = 0.3, base_capacity: int | None = None
                        ) -> OfficialCaps:
    """Caps shaped like the official files when there is no file (the official repository ships no budget
    generator and no drafter calibration; this is genkv's rule, checked against the shipped files):

    - every layer's mean cap is ``C = round(budget x T)``, ``T`` the largest cache ever kept (all scales but the
      last: Infinity 1M 0.1 x 6425 = 642; the shipped "10%" files hold 650);
    - ``base_capacity`` defaults to ``C`` (the official scripts pass the files' mean cap, 650);
    - from the first compressed scale on, ``drafters`` keep their whole cache (the files' drafters keep all but
      1-19 tokens), refiners share the rest so the layer mean stays ``C`` (with the files' drafters and C = 650
      this gives 631, 593, 525, 418 where the 2B file has 632, 594, 526, 420); refiners keep at least
      ``max(window, refiner_floor x C)`` (the 8B file's last scale: 200 = 0.31 x 650), drafters give way;
    - ``budget`` 1.0 keeps everything.

    Example:
        >>> infinity = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
        >>> caps = official_style_caps(32, infinity, 0.1, drafters=(0, 23))
        >>> caps.base_capacity, [caps.caps[0][s] for s in (7, 8, 9, 10)], [caps.caps[1][s] for s in (7, 8, 9, 10)]
        (642, [921, 1497, 2521, 4121], [623, 585, 516, 410])
        >>> [official_style_caps(32, infinity, 650 / 6425, drafters=(0, 23)).caps[1][s] for s in (7, 8, 9, 10)]
        [631, 593, 525, 418]
    """
    cum = cumulative(patch_nums)
    largest = cum[-2] if len(cum) > 1 else cum[-1]
    if budget >= 1.0:
        return OfficialCaps([list(cum) for _ in range(depth)], base_capacity=cum[-1])
    mean = max(1, round(budget * largest))
    base = mean if base_capacity is None else base_capacity
    out = OfficialCaps([list(cum) for _ in range(depth)], base)
    start = out.start_scale(tuple(patch_nums))
    n_d = len(drafters)
    total, floor = depth * mean, max(window, math.ceil(refiner_floor * mean))
    drafter_cache = 0
    for s in range(start, len(patch_nums)):
        drafter_cache = cum[s] if s == start else drafter_cache + patch_nums[s] ** 2
        if n_d in (0, depth):
            row = [mean] * depth
        else:
            drafter_cap = max(0, min(drafter_cache, (total - (depth - n_d) * floor) // n_d))
            refiner_cap = (total - n_d * drafter_cap) // (depth - n_d)
            row = [drafter_cap if layer in drafters else refiner_cap for layer in range(depth)]
            drafter_cache = drafter_cap
        for layer in range(depth):
            out.caps[layer][s] = row[layer]
    return out


def official_window(side: int, n: int, window: int) -> list[int]:
    """Cache positions of the observation window for a ``side x side`` current scale at the end of an
    ``n``-token cache (the official grid of patch centres, or its fallback to the last ``window`` tokens).

    Example:
        >>> official_window(10, 100, 16)[:4], official_window(16, 256, 16)[:4], official_window(3, 14, 16)[:2]
        ([0, 2, 4, 6], [17, 21, 25, 29], [0, 1])
    """
    grid = math.isqrt(window)
    if grid * grid != window or side < grid:
        return list(range(n - min(window, n), n))
    patch = side // grid
    centres = [min(side - 1, i * patch + (patch - 1) // 2) for i in range(grid)]
    start = n - side * side
    return sorted({start + r * side + c for r in centres for c in centres})


class OfficialScaleCache(FullScaleCache):
    """ScaleKV's per-layer compression as the official ``ScaleKVCluster.update_kv`` does it (module docstring).

    Example:
        >>> import torch
        >>> cache = OfficialScaleCache(1, (1, 2, 3), [[1, 5, 5]], base_capacity=1, window=4, pool_kernel=1)
        >>> k = v = torch.randn(1, 1, 14, 8)
        >>> kept_k, _ = cache.keep(0, 2, torch.randn(1, 1, 9, 8), k, v)
        >>> kept_k.shape[2], bool((kept_k[0, 0, 0] == k[0, 0, 0]).all())  # 4 window tokens + the start token
        (5, True)
    """

    name = "scalekv"

    def __init__(self, num_layers: int, patch_nums: tuple[int, ...], caps: list[list[int | None]],
                 base_capacity: int, window: int = 16, pool_kernel: int = 5, pooling: str = "maxpool",
                 keep_start: bool = True, slice_elements: int = 2**27) -> None:
        self.caps, self.base_capacity, self.window = caps, base_capacity, window
        self.pool_kernel, self.pooling, self.keep_start = pool_kernel, pooling, keep_start
        self.slice_elements = slice_elements
        self.start = OfficialCaps(caps, base_capacity).start_scale(tuple(patch_nums))
        # (side, cache length, device) -> (window, its list, start protected?): built once, not once per layer
        self._windows: dict[tuple[int, int, torch.device], tuple[torch.Tensor, list[int], bool]] = {}
        super().__init__(num_layers, patch_nums)

    def keep(self, layer: int, scale: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        n = k.shape[2]
        cap = self.caps[layer][scale]
        if scale < self.start or cap is None or n <= cap:
            return k, v
        idx = self.select(q, k, cap, self.patch_nums[scale])
        gather = idx[..., None].expand(-1, -1, -1, k.shape[-1])
        return k.gather(2, gather), v.gather(2, gather)

    def select(self, q: torch.Tensor, k: torch.Tensor, cap: int, side: int) -> torch.Tensor:
        """Sorted cache positions (B, H, kept) to keep of ``k`` (B, H, n, D), ``q`` the current scale's queries."""
        b, h, n, d = k.shape
        key = (side, n, k.device)
        if key not in self._windows:
            win_list = official_window(side, n, self.window)
            self._windows[key] = (torch.tensor(win_list, device=k.device), win_list,
                                  self.keep_start and 0 not in win_list)
        win, win_list, protect = self._windows[key]
        if cap <= len(win_list):  # no room beyond the window (the official code crashes below it)
            keep = win if not protect else torch.cat([win.new_zeros(1), win])
            return keep.expand(b, h, -1)
        current = q.shape[2]
        # window queries: the official code clamps positions before the current scale to its first query
        local = (win - (n - current)).clamp(0, current - 1)
        rows = max(1, self.slice_elements // max(1, h * n * d))
        scores = torch.cat([self._scores(q[i : i + rows].index_select(2, local), k[i : i + rows], win)
                            for i in range(0, b, rows)])
        if protect:
            scores[..., 0] = float("inf")
        rest = scores.topk(min(cap - len(win_list), n - len(win_list)), dim=-1).indices
        return torch.cat([rest, win.expand(b, h, -1)], dim=-1).sort(dim=-1).values

    def _scores(self, wq: torch.Tensor, k: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
        """The official score in the official order of operations (bitwise equal on float32 inputs)."""
        wide = torch.promote_types(k.dtype, torch.float32)
        logits = torch.matmul(wq.to(wide), k.to(wide).transpose(2, 3)) / math.sqrt(k.shape[-1])
        logits.index_fill_(3, win, float("-inf"))
        scores = logits.sum(dim=2)
        pool = F.avg_pool1d if self.pooling == "avgpool" else F.max_pool1d
        pooled = pool(scores, self.pool_kernel, padding=self.pool_kernel // 2, stride=1)
        return pooled.index_fill_(2, win, float("-inf"))
