"""Fidelity metrics (PSNR, SSIM, drift, pairing, LPIPS hook) against hand-computed and independent references."""

import math
import sys
import types

import numpy as np
import pytest

from genkv.metrics import (
    LpipsScorer,
    LpipsUnavailable,
    compare_frames,
    compare_video_files,
    drift,
    lpips_unavailable,
    pair_videos,
    psnr_per_frame,
    ssim_per_frame,
)
from genkv.video import Mp4Writer, read_frames


def _frames(seed, n=6, h=32, w=48):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Direct float64 SSIM of one RGB frame: every valid 11x11 window, weighted sums, per channel then mean."""
    x1 = np.arange(11) - 5.0
    g = np.exp(-(x1**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    h, wd = a.shape[:2]
    maps = []
    for c in range(3):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        win_x = np.lib.stride_tricks.sliding_window_view(x, (11, 11))  # [h-10, w-10, 11, 11]
        win_y = np.lib.stride_tricks.sliding_window_view(y, (11, 11))
        mx, my = (win_x * w).sum((-1, -2)), (win_y * w).sum((-1, -2))
        vx = (w * (win_x - mx[..., None, None]) ** 2).sum((-1, -2))
        vy = (w * (win_y - my[..., None, None]) ** 2).sum((-1, -2))
        cxy = (w * (win_x - mx[..., None, None]) * (win_y - my[..., None, None])).sum((-1, -2))
        maps.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    assert maps[0].shape == (h - 10, wd - 10)
    return float(np.mean(maps))


def test_identical_frames_give_infinite_psnr_and_ssim_one():
    a = _frames(0)
    assert np.isinf(psnr_per_frame(a, a)).all()
    np.testing.assert_allclose(ssim_per_frame(a, a), 1.0, rtol=0, atol=1e-12)
    r = compare_frames(a, a)
    assert r["identical_frames"] == 6 and r["psnr_mean"] is None and r["psnr"] == [None] * 6
    assert r["psnr_of_mean_mse"] is None and r["ssim_mean"] == pytest.approx(1.0)


def test_constant_offset_gives_the_hand_computed_psnr():
    a = np.full((3, 16, 16, 3), 100, np.uint8)
    for d in (1, 5, 40):
        np.testing.assert_allclose(psnr_per_frame(a, a + d), 10 * math.log10(255**2 / d**2))
    b = a.copy()
    b[:, :8] += 10  # half the pixels off by 10: MSE 50
    np.testing.assert_allclose(psnr_per_frame(a, b), 10 * math.log10(255**2 / 50.0))
    black, white = np.zeros_like(a), np.full_like(a, 255)
    np.testing.assert_allclose(psnr_per_frame(black, white), 0.0, atol=1e-12)


def test_ssim_matches_an_independent_float64_implementation():
    a = _frames(1, n=3, h=20, w=27)
    b = np.clip(a.astype(int) + np.random.default_rng(2).integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    got = ssim_per_frame(a, b)
    want = [_ssim_reference(a[i], b[i]) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert 0.3 < got.min() < got.max() < 0.99  # a real, non-trivial value


def test_ssim_matches_scikit_image():
    skimage = pytest.importorskip("skimage.metrics")
    a = _frames(3, n=2, h=40, w=33)
    b = np.clip(a.astype(int) + np.random.default_rng(4).integers(-25, 25, a.shape), 0, 255).astype(np.uint8)
    want = [skimage.structural_similarity(a[i], b[i], channel_axis=2, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=255) for i in range(len(a))]
    np.testing.assert_allclose(ssim_per_frame(a, b, batch=1), want, rtol=1e-10)


def test_ssim_of_constant_images_follows_the_luminance_term():
    # Constant frames have zero variance: SSIM reduces to (2 mx my + C1) / (mx^2 + my^2 + C1).
    a, b = np.full((1, 16, 16, 3), 50, np.uint8), np.full((1, 16, 16, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    np.testing.assert_allclose(ssim_per_frame(a, b), (2 * 50 * 150 + c1) / (50**2 + 150**2 + c1), rtol=1e-12)


def test_mismatched_videos_are_clear_errors():
    with pytest.raises(ValueError, match="frame counts: reference 4 frames vs test 5 frames"):
        psnr_per_frame(_frames(0, n=4), _frames(0, n=5))
    with pytest.raises(ValueError, match="frame sizes: reference 48x32 vs test 48x16"):
        ssim_per_frame(_frames(0, h=32), _frames(0, h=16))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_per_frame(_frames(0, h=8, w=8), _frames(0, h=8, w=8))


def test_drift_compares_the_first_and_last_seconds():
    assert drift([40, 40, 30, 30, 30, 20, 20, 20], fps=2, seconds=1) == {
        "frames": 2, "first": 40.0, "last": 20.0, "delta": -20.0}
    # Windows never overlap: capped at half the video.
    assert drift([1.0, 2.0, 3.0], fps=16, seconds=2)["frames"] == 1
    # Identical (infinite-PSNR) frames are left out of the window mean.
    assert drift([np.inf, 30.0, 10.0, 20.0], fps=1, seconds=2) == {"frames": 2, "first": 30.0, "last": 15.0,
                                                                    "delta": -15.0}
    a = _frames(3, n=8)
    b = a.copy()
    b[-2:] = 255 - b[-2:]  # the end drifts away
    r = compare_frames(a, b, fps=2, drift_seconds=1)
    assert r["drift"]["psnr"]["first"] is None and r["drift"]["psnr"]["last"] < 10
    assert r["drift"]["ssim"]["first"] == pytest.approx(1.0) and r["drift"]["ssim"]["delta"] < -0.5
    assert r["identical_frames"] == 6


def test_pairing_by_file_name(tmp_path):
    for folder, names in (("ref", ["000-a.mp4", "001-b.mp4", "002-c.mp4", "notes.txt"]),
                          ("test", ["001-b.mp4", "002-c.mp4", "003-d.mp4", "000-a.json"])):
        (tmp_path / folder).mkdir()
        for n in names:
            (tmp_path / folder / n).write_bytes(b"")
    p = pair_videos(tmp_path / "ref", tmp_path / "test")
    assert [(r.parent.name, r.name, t.parent.name, t.name) for r, t in p.pairs] == [
        ("ref", "001-b.mp4", "test", "001-b.mp4"), ("ref", "002-c.mp4", "test", "002-c.mp4")]
    assert p.reference_only == ["000-a.mp4"] and p.test_only == ["003-d.mp4"]
    with pytest.raises(ValueError, match="no video file names in common"):
        pair_videos(tmp_path / "ref", tmp_path / "ref" / "..")
    with pytest.raises(ValueError, match="is not a folder"):
        pair_videos(tmp_path / "ref", tmp_path / "missing")


def _write(path, frames, fps=8.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    with Mp4Writer(path, fps=fps) as w:
        w.append(frames)


def _smooth(seed, n=12, h=48, w=64):
    """Low-frequency content: survives H.264 closely, so lossy-codec tests stay meaningful."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = [128 + 60 * np.sin(xx / 9 + rng.uniform(0, 6)) * np.cos(yy / 7 + t / 3) for t in range(n)]
    return np.clip(np.stack(frames)[..., None].repeat(3, -1), 0, 255).astype(np.uint8)


def test_files_are_compared_in_lockstep_batches_like_the_decoded_arrays(tmp_path):
    a, b = _smooth(0, n=13), _smooth(1, n=13)
    _write(tmp_path / "a.mp4", a)
    _write(tmp_path / "b.mp4", b)
    got = compare_video_files(tmp_path / "a.mp4", tmp_path / "b.mp4", batch=4, drift_seconds=0.5)
    want = compare_frames(read_frames(tmp_path / "a.mp4"), read_frames(tmp_path / "b.mp4"), fps=8.0, drift_seconds=0.5)
    assert got["frames"] == 13 and got["fps"] == 8.0 and got["drift"]["psnr"]["frames"] == 4
    np.testing.assert_allclose(got["psnr"], want["psnr"], rtol=1e-12)
    np.testing.assert_allclose(got["ssim"], want["ssim"], rtol=1e-12)
    # The codec is lossy, but the metric of the files stays close to the metric of the source frames.
    assert abs(got["psnr_mean"] - compare_frames(a, b)["psnr_mean"]) < 1.5


def test_files_with_different_lengths_or_sizes_are_errors(tmp_path):
    _write(tmp_path / "a.mp4", _smooth(0, n=10))
    _write(tmp_path / "b.mp4", _smooth(0, n=7))
    _write(tmp_path / "c.mp4", _smooth(0, n=10, w=32))
    with pytest.raises(ValueError, match="frame counts: reference 10 frames vs test 7 frames"):
        compare_video_files(tmp_path / "a.mp4", tmp_path / "b.mp4", batch=4)
    with pytest.raises(ValueError, match="frame sizes: reference 64x48 vs test 32x48"):
        compare_video_files(tmp_path / "a.mp4", tmp_path / "c.mp4")


def test_lpips_is_skipped_with_a_note_when_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # makes `import lpips` raise ImportError
    assert "not installed" in lpips_unavailable("alex")
    with pytest.raises(LpipsUnavailable, match="not installed"):
        LpipsScorer("alex")
    assert "unknown network" in lpips_unavailable("resnet")


def test_lpips_runs_only_when_the_backbone_file_is_local(tmp_path, monkeypatch):
    import torch

    # A stand-in lpips package: records its inputs, returns the mean absolute difference per frame.
    pkg = tmp_path / "fake_lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "weights" / "v0.1" / "alex.pth").write_bytes(b"head")
    seen = []

    class FakeLPIPS(torch.nn.Module):
        def __init__(self, net, verbose=True):
            super().__init__()

        def forward(self, x, y):
            seen.append((float(x.min()), float(x.max())))
            return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)

    module = types.ModuleType("lpips")
    module.__file__ = str(pkg / "__init__.py")
    module.LPIPS = FakeLPIPS
    monkeypatch.setitem(sys.modules, "lpips", module)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert "backbone weights not found at" in lpips_unavailable("alex")
    assert str(tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in lpips_unavailable("alex")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes(b"weights")
    assert lpips_unavailable("alex") is None
    score = LpipsScorer("alex")
    a = np.zeros((2, 16, 16, 3), np.uint8)
    b = np.full_like(a, 255)
    np.testing.assert_allclose(score(a, b), [2.0, 2.0])  # inputs mapped to [-1, 1]
    assert seen == [(-1.0, -1.0)]
    r = compare_frames(a, b, scorers={"lpips": score})
    assert r["lpips"] == [2.0, 2.0] and r["lpips_mean"] == 2.0 and r["drift"]["lpips"]["delta"] == 0.0


def test_a_close_interrupted_after_queueing_the_stop_can_be_repeated(tmp_path):
    path = tmp_path / "v.mp4"
    writer = Mp4Writer(path, fps=8.0)
    writer.append(_smooth(0))
    joins = []
    thread = writer._thread
    original_join = thread.join

    def interrupted_join(*args, **kwargs):  # Ctrl-C lands while waiting for the encoder thread
        if not joins:
            joins.append(1)
            raise KeyboardInterrupt
        return original_join(*args, **kwargs)

    thread.join = interrupted_join
    with pytest.raises(KeyboardInterrupt):
        writer.close()
    writer.close()  # the render's flush-anyway path: must not queue a second stop (with a full queue: a hang)
    assert writer._queue.empty()
    assert read_frames(path).shape[0] == 12
