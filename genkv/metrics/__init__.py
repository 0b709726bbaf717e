"""Video fidelity measures that need no downloaded network (PSNR, SSIM, drift), and an offline-only LPIPS hook.

Example:
    >>> import numpy as np
    >>> from genkv.metrics import compare_frames
    >>> a = np.full((4, 16, 16, 3), 100, np.uint8)
    >>> round(compare_frames(a, a + 1, fps=2, drift_seconds=1)["psnr_mean"], 2)
    48.13
"""

from .fidelity import (
    FrameMetrics,
    VideoPairs,
    check_frames,
    compare_frames,
    compare_video_files,
    drift,
    drift_window,
    finite_mean,
    mse_per_frame,
    pair_videos,
    psnr_from_mse,
    psnr_per_frame,
    ssim_per_frame,
    video_fps,
)
from .perceptual import LpipsScorer, LpipsUnavailable, lpips_unavailable

__all__ = [
    "FrameMetrics",
    "LpipsScorer",
    "LpipsUnavailable",
    "VideoPairs",
    "check_frames",
    "compare_frames",
    "compare_video_files",
    "drift",
    "drift_window",
    "finite_mean",
    "lpips_unavailable",
    "mse_per_frame",
    "pair_videos",
    "psnr_from_mse",
    "psnr_per_frame",
    "ssim_per_frame",
    "video_fps",
]
