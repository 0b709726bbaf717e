"""Frame-wise fidelity of a test video to a reference video (normally the ``full``-cache render).

Definitions (frames are uint8 RGB ``[T, H, W, 3]``, peak value ``L = 255``):

* **PSNR** of a frame: ``10 log10(L^2 / MSE)``, MSE over every pixel and the three channels; ``inf`` for an
  identical frame. Means over frames skip identical frames (they are counted apart, in ``identical_frames``),
  so one bit-identical prefix (a windowed cache equals the full cache until the window fills) does not make
  the whole mean infinite.
* **SSIM** (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``, population
  (biased) variances, computed **per RGB channel** and averaged over the channels and over the *valid*
  window positions only (no padding; a 5-pixel border is left out). This equals scikit-image's
  ``structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255)``. Computed in float64.
* **Drift**: a metric's mean over the first ``seconds`` of frames against its mean over the last ``seconds``
  (windows capped at half the video so they never overlap); ``delta = last - first``.

Both videos in a pair are normally H.264 files, so even the reference is lossy: compare renders written by the
same writer settings, and read PSNR above ~45 dB as "codec noise", not as a method difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
PEAK = 255.0

# A scorer maps two uint8 batches [N, H, W, 3] to N per-frame values (e.g. the LPIPS hook).
FrameScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def check_frames(ref: np.ndarray, test: np.ndarray) -> None:
    """Raise ``ValueError`` naming what differs when two frame stacks cannot be compared.

    Example:
        >>> import numpy as np
        >>> check_frames(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((3, 8, 8, 3), np.uint8))
        Traceback (most recent call last):
        ...
        ValueError: videos differ in frame counts: reference 2 frames vs test 3 frames
    """
    for name, x in (("reference", ref), ("test", test)):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{name}: expected frames [T, H, W, 3], got shape {tuple(x.shape)}")
    if ref.shape[1:3] != test.shape[1:3]:
        raise ValueError(
            f"videos differ in frame sizes: reference {ref.shape[2]}x{ref.shape[1]} "
            f"vs test {test.shape[2]}x{test.shape[1]}"
        )
    if len(ref) != len(test):
        raise ValueError(f"videos differ in frame counts: reference {len(ref)} frames vs test {len(test)} frames")


def mse_per_frame(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Mean squared error of every frame, over pixels and channels (float64)."""
    check_frames(ref, test)
    diff = ref.astype(np.float64) - test.astype(np.float64)
    return (diff * diff).reshape(len(ref), -1).mean(axis=1)


def psnr_from_mse(mse: np.ndarray, peak: float = PEAK) -> np.ndarray:
    """``10 log10(peak^2 / mse)``, ``inf`` where ``mse`` is 0."""
    mse = np.asarray(mse, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(mse == 0, np.inf, 10.0 * np.log10(peak**2 / np.where(mse == 0, 1.0, mse)))


def psnr_per_frame(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """PSNR in dB of every frame (``inf`` where the frames are identical).

    Example:
        >>> import numpy as np
        >>> a = np.zeros((2, 4, 4, 3), np.uint8)
        >>> psnr_per_frame(a, a + 1).round(2).tolist()   # MSE 1 -> 20 log10(255)
        [48.13, 48.13]
    """
    return psnr_from_mse(mse_per_frame(ref, test))


def _gaussian_1d(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def ssim_per_frame(
    ref: np.ndarray, test: np.ndarray, batch: int = 16, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Mean SSIM of every frame (per RGB channel, then averaged; 1.0 where identical), float64.

    Frames smaller than the 11x11 window are an error. ``device="cuda"`` runs the filtering on a GPU.

    Example:
        >>> import numpy as np
        >>> a = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
        >>> ssim_per_frame(a, a).tolist()
        [1.0, 1.0]
    """
    check_frames(ref, test)
    if min(ref.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {ref.shape[2]}x{ref.shape[1]}"
        )
    device = torch.device(device)
    g = _gaussian_1d(SSIM_WINDOW, SSIM_SIGMA, device)
    # The 2-D Gaussian is separable: a vertical then a horizontal pass, each channel on its own (groups=3).
    win_v = g.view(1, 1, -1, 1).expand(3, 1, -1, 1).contiguous()
    win_h = g.view(1, 1, 1, -1).expand(3, 1, 1, -1).contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:  # valid positions only: no padding enters the statistics
        return F.conv2d(F.conv2d(x, win_v, groups=3), win_h, groups=3)

    c1, c2 = (SSIM_K1 * PEAK) ** 2, (SSIM_K2 * PEAK) ** 2
    out = []
    for start in range(0, len(ref), batch):
        x = torch.from_numpy(np.ascontiguousarray(ref[start : start + batch])).to(device).permute(0, 3, 1, 2).double()
        y = torch.from_numpy(np.ascontiguousarray(test[start : start + batch])).to(device).permute(0, 3, 1, 2).double()
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out.append(ssim.mean(dim=(1, 2, 3)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def finite_mean(values: np.ndarray | list[float]) -> float | None:
    """Mean of the finite values; ``None`` when there are none (e.g. every frame identical)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else None


def drift_window(frames: int, fps: float, seconds: float) -> int:
    """Frames in each drift window: ``round(fps * seconds)``, at least 1, at most half the video.

    Example:
        >>> drift_window(160, fps=16, seconds=2), drift_window(20, fps=16, seconds=2)
        (32, 10)
    """
    if fps <= 0 or seconds <= 0:
        raise ValueError(f"drift needs fps > 0 and seconds > 0, got fps={fps}, seconds={seconds}")
    return max(1, min(frames // 2, int(round(fps * seconds))))


def drift(values: np.ndarray | list[float], fps: float, seconds: float) -> dict:
    """Mean of a per-frame metric over the first vs the last ``seconds`` and ``delta = last - first``.

    Non-finite values (identical frames' PSNR) are left out of each mean; a window with none gives ``None``.

    Example:
        >>> drift([30, 30, 30, 20, 20, 20], fps=1, seconds=2)
        {'frames': 2, 'first': 30.0, 'last': 20.0, 'delta': -10.0}
    """
    values = np.asarray(values, dtype=np.float64)
    n = drift_window(len(values), fps, seconds)
    first, last = finite_mean(values[:n]), finite_mean(values[-n:])
    delta = None if first is None or last is None else last - first
    return {"frames": n, "first": first, "last": last, "delta": delta}


@dataclass
class FrameMetrics:
    """Per-frame metrics of one video pair, accumulated batch by batch."""

    mse: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)

    def add(self, ref: np.ndarray, test: np.ndarray, device: str | torch.device = "cpu",
            scorers: dict[str, FrameScorer] | None = None) -> None:
        self.mse += mse_per_frame(ref, test).tolist()
        self.ssim += ssim_per_frame(ref, test, device=device).tolist()
        for name, score in (scorers or {}).items():
            self.extra.setdefault(name, []).extend(float(v) for v in score(ref, test))

    def summary(self, fps: float, drift_seconds: float) -> dict:
        """JSON-ready result: per-frame lists, means and drift (PSNR ``inf`` is written as ``None``)."""
        psnr = psnr_from_mse(np.array(self.mse))
        mean_mse = float(np.mean(self.mse)) if self.mse else 0.0
        result: dict = {
            "frames": len(self.mse),
            "fps": fps,
            "identical_frames": int(np.sum(~np.isfinite(psnr))),
            "psnr_mean": finite_mean(psnr),
            # PSNR of the video-level MSE: finite unless every frame is identical, and less swayed by near-copies.
            "psnr_of_mean_mse": float(psnr_from_mse(np.array([mean_mse]))[0]) if mean_mse > 0 else None,
            "ssim_mean": finite_mean(self.ssim),
            "drift": {"seconds": drift_seconds, "psnr": drift(psnr, fps, drift_seconds),
                      "ssim": drift(self.ssim, fps, drift_seconds)},
            "psnr": [float(v) if math.isfinite(v) else None for v in psnr],
            "ssim": self.ssim,
        }
        for name, values in self.extra.items():
            result[f"{name}_mean"] = finite_mean(values)
            result["drift"][name] = drift(values, fps, drift_seconds)
            result[name] = values
        return result


def compare_frames(ref: np.ndarray, test: np.ndarray, fps: float = 16.0, drift_seconds: float = 2.0,
                   scorers: dict[str, FrameScorer] | None = None) -> dict:
    """Per-frame PSNR/SSIM (and any extra ``scorers``), their means and drift, for two frame stacks in memory.

    Example:
        >>> import numpy as np
        >>> a = np.full((4, 16, 16, 3), 100, np.uint8)
        >>> r = compare_frames(a, a + 1, fps=2, drift_seconds=1)
        >>> round(r["psnr_mean"], 2), r["ssim_mean"] > 0.99, r["drift"]["psnr"]["delta"]
        (48.13, True, 0.0)
    """
    check_frames(ref, test)
    acc = FrameMetrics()
    acc.add(ref, test, scorers=scorers)
    return acc.summary(fps, drift_seconds)


# -- files -------------------------------------------------------------------------------------------------
def _open_video(path: Path) -> tuple[dict, Iterator[bytes]]:
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration) as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read video {str(path)!r}: {reason}") from None
    return meta, reader


def _batches(reader: Iterator[bytes], height: int, width: int, batch: int) -> Iterator[np.ndarray]:
    frames: list[np.ndarray] = []
    for raw in reader:
        frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3))
        if len(frames) == batch:
            yield np.stack(frames)
            frames = []
    if frames:
        yield np.stack(frames)


def video_fps(path: str | Path) -> float:
    """The frame rate stored in an mp4 (what ``genkv render --fps`` wrote)."""
    meta, reader = _open_video(Path(path))
    reader.close()
    return float(meta.get("fps") or 0.0)


def compare_video_files(ref_path: str | Path, test_path: str | Path, fps: float | None = None,
                        drift_seconds: float = 2.0, scorers: dict[str, FrameScorer] | None = None,
                        device: str | torch.device = "cpu", batch: int = 16) -> dict:
    """:func:`compare_frames` for two mp4 files, decoded in lockstep ``batch`` frames at a time.

    Memory stays at a few batches even for 2000-frame videos. ``fps`` (for the drift windows) defaults to the
    reference file's frame rate. Different sizes or frame counts raise ``ValueError`` naming both.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from genkv.video import Mp4Writer
        >>> d = tempfile.mkdtemp()
        >>> for name in ("a.mp4", "b.mp4"):
        ...     with Mp4Writer(os.path.join(d, name), fps=8) as w:
        ...         w.append(np.full((8, 32, 32, 3), 128, np.uint8))
        >>> r = compare_video_files(os.path.join(d, "a.mp4"), os.path.join(d, "b.mp4"))
        >>> r["frames"], r["fps"], r["ssim_mean"]
        (8, 8.0, 1.0)
    """
    ref_path, test_path = Path(ref_path), Path(test_path)
    ref_meta, ref_reader = _open_video(ref_path)
    test_meta, test_reader = _open_video(test_path)
    try:
        (rw, rh), (tw, th) = ref_meta["size"], test_meta["size"]
        if (rw, rh) != (tw, th):
            raise ValueError(f"videos differ in frame sizes: reference {rw}x{rh} vs test {tw}x{th}")
        fps = float(fps if fps is not None else (ref_meta.get("fps") or 16.0))
        acc = FrameMetrics()
        ref_batches = _batches(ref_reader, rh, rw, batch)
        test_batches = _batches(test_reader, th, tw, batch)
        while True:
            a, b = next(ref_batches, None), next(test_batches, None)
            if a is None and b is None:
                break
            if a is None or b is None or len(a) != len(b):
                # Count the rest of both so the message gives the real frame counts.
                n_ref = len(acc.mse) + (0 if a is None else len(a)) + sum(len(x) for x in ref_batches)
                n_test = len(acc.mse) + (0 if b is None else len(b)) + sum(len(x) for x in test_batches)
                raise ValueError(f"videos differ in frame counts: reference {n_ref} frames vs test {n_test} frames")
            acc.add(a, b, device=device, scorers=scorers)
    finally:
        ref_reader.close()
        test_reader.close()
    if not acc.mse:
        raise ValueError(f"{str(ref_path)!r} has no frames")
    return acc.summary(fps, drift_seconds)


@dataclass
class VideoPairs:
    """Videos matched by file name between a reference and a test folder."""

    pairs: list[tuple[Path, Path]]
    reference_only: list[str]
    test_only: list[str]


def pair_videos(ref_dir: str | Path, test_dir: str | Path, pattern: str = "*.mp4") -> VideoPairs:
    """Match the mp4 files of two folders by file name (``genkv render`` names them ``NNN-slug.mp4``).

    Raises ``ValueError`` if a folder is missing or no name is in both.

    Example:
        >>> import tempfile, pathlib
        >>> a, b = pathlib.Path(tempfile.mkdtemp()), pathlib.Path(tempfile.mkdtemp())
        >>> for p in (a / "000-x.mp4", a / "001-y.mp4", b / "001-y.mp4", b / "002-z.mp4"):
        ...     p.touch()
        >>> p = pair_videos(a, b)
        >>> [r.name for r, t in p.pairs], p.reference_only, p.test_only
        (['001-y.mp4'], ['000-x.mp4'], ['002-z.mp4'])
    """
    ref_dir, test_dir = Path(ref_dir), Path(test_dir)
    for folder in (ref_dir, test_dir):
        if not folder.is_dir():
            raise ValueError(f"{str(folder)!r} is not a folder; pass a folder of mp4 files (genkv render --out)")
    ref = {p.name: p for p in ref_dir.glob(pattern) if p.is_file()}
    test = {p.name: p for p in test_dir.glob(pattern) if p.is_file()}
    common = sorted(ref.keys() & test.keys())
    if not common:
        raise ValueError(
            f"no video file names in common between {str(ref_dir)!r} ({len(ref)} mp4) and {str(test_dir)!r} "
            f"({len(test)} mp4); render both from the same prompt file"
        )
    return VideoPairs(
        pairs=[(ref[n], test[n]) for n in common],
        reference_only=sorted(ref.keys() - test.keys()),
        test_only=sorted(test.keys() - ref.keys()),
    )
