"""Video fidelity measures that need no downloaded network (PSNR, SSIM, drift)."""

from .fidelity import compare_videos, pair_videos, psnr_per_frame, ssim_per_frame

__all__ = ["compare_videos", "pair_videos", "psnr_per_frame", "ssim_per_frame"]
