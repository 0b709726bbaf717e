"""PSNR and SSIM per frame between a reference video (e.g. the ``full``-cache render) and a test video.

PSNR: ``10 log10(255^2 / MSE)`` over all pixels and channels of a frame (infinite for identical frames).
SSIM: Wang et al. 2004 with the usual constants (11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, L 255),
computed per RGB channel over the valid (unpadded) window positions and averaged over channels, in float64.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _check(ref: np.ndarray, test: np.ndarray) -> None:
    if ref.shape != test.shape:
        what = "frame counts" if ref.shape[1:] == test.shape[1:] else "frame sizes"
        raise ValueError(f"videos differ in {what}: reference {ref.shape} vs test {test.shape}")
    if ref.ndim != 4 or ref.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got shape {ref.shape}")


def psnr_per_frame(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """PSNR in dB of every frame (``inf`` where the frames are identical).

    Example:
        >>> import numpy as np
        >>> a = np.zeros((2, 4, 4, 3), np.uint8)
        >>> psnr_per_frame(a, a + 1).round(2).tolist()
        [48.13, 48.13]
    """
    _check(ref, test)
    diff = ref.astype(np.float64) - test.astype(np.float64)
    mse = (diff**2).reshape(len(ref), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(mse == 0, np.inf, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-300)))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_per_frame(ref: np.ndarray, test: np.ndarray, batch: int = 32) -> np.ndarray:
    """Mean SSIM of every frame (1.0 where identical); frames smaller than the 11x11 window are an error."""
    _check(ref, test)
    if min(ref.shape[1:3]) < 11:
        raise ValueError(f"SSIM needs frames of at least 11x11 pixels, got {ref.shape[1:3]}")
    g = _gaussian_window()
    win_h = g.view(1, 1, -1, 1).repeat(3, 1, 1, 1)
    win_w = g.view(1, 1, 1, -1).repeat(3, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid positions only
        return F.conv2d(F.conv2d(x, win_h, groups=3), win_w, groups=3)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = []
    for start in range(0, len(ref), batch):
        x = torch.from_numpy(ref[start : start + batch]).permute(0, 3, 1, 2).double()
        y = torch.from_numpy(test[start : start + batch]).permute(0, 3, 1, 2).double()
        mx, my = blur(x), blur(y)
        sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        ssim = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
        out.append(ssim.mean(dim=(1, 2, 3)).numpy())
    return np.concatenate(out)


def pair_videos(ref_dir: str | Path, test_dir: str | Path) -> list[tuple[Path, Path]]:
    """Pairs of mp4 files with the same name in both folders (sorted); an error if none match."""
    ref_dir, test_dir = Path(ref_dir), Path(test_dir)
    for folder in (ref_dir, test_dir):
        if not folder.is_dir():
            raise ValueError(f"{str(folder)!r} is not a folder of videos")
    ref = {p.name: p for p in ref_dir.glob("*.mp4")}
    test = {p.name: p for p in test_dir.glob("*.mp4")}
    common = sorted(ref.keys() & test.keys())
    if not common:
        raise ValueError(
            f"no videos with the same name in {str(ref_dir)!r} ({len(ref)} mp4) and {str(test_dir)!r} ({len(test)} mp4)"
        )
    return [(ref[n], test[n]) for n in common]


def compare_videos(ref: np.ndarray, test: np.ndarray, fps: float = 16.0, drift_seconds: float = 2.0) -> dict:
    """Per-frame PSNR/SSIM plus means and drift (first vs last ``drift_seconds`` of the video)."""
    psnr = psnr_per_frame(ref, test)
    ssim = ssim_per_frame(ref, test)
    n = max(1, min(len(psnr) // 2, int(round(fps * drift_seconds))))

    def mean(x: np.ndarray) -> float:
        finite = x[np.isfinite(x)]
        return float("inf") if len(finite) == 0 else float(finite.mean()) if len(finite) == len(x) else float("inf")

    return {
        "frames": int(len(psnr)),
        "psnr": [float(v) for v in psnr],
        "ssim": [float(v) for v in ssim],
        "psnr_mean": mean(psnr),
        "ssim_mean": float(ssim.mean()),
        "drift": {
            "seconds": drift_seconds,
            "psnr_first": mean(psnr[:n]),
            "psnr_last": mean(psnr[-n:]),
            "ssim_first": float(ssim[:n].mean()),
            "ssim_last": float(ssim[-n:].mean()),
        },
    }


def finite_or_none(value: float) -> float | None:
    """JSON has no infinity: identical videos report PSNR as null with ``identical: true``."""
    return None if not math.isfinite(value) else value
