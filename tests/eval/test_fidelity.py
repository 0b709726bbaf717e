"""Fidelity metrics and the `genkv eval` commands."""

import json
import math

import numpy as np
import pytest

from genkv.cli.main import main
from genkv.metrics import compare_videos, psnr_per_frame, ssim_per_frame
from genkv.video import Mp4Writer, read_frames


def _frames(seed, n=6, h=32, w=48):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_identical_videos_give_infinite_psnr_and_ssim_one():
    a = _frames(0)
    assert np.isinf(psnr_per_frame(a, a)).all()
    np.testing.assert_allclose(ssim_per_frame(a, a), 1.0)


def test_known_perturbation_gives_the_hand_computed_psnr():
    a = np.full((3, 16, 16, 3), 100, np.uint8)
    b = a.copy()
    b[:, :8] += 10  # half the pixels off by 10: MSE = 50
    np.testing.assert_allclose(psnr_per_frame(a, b), 10 * math.log10(255**2 / 50.0))


def test_ssim_matches_an_independent_implementation():
    skimage = pytest.importorskip("skimage.metrics")
    a = _frames(1)
    b = np.clip(a.astype(int) + np.random.default_rng(2).integers(-25, 25, a.shape), 0, 255).astype(np.uint8)
    want = [skimage.structural_similarity(a[i], b[i], channel_axis=2, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=255) for i in range(len(a))]
    np.testing.assert_allclose(ssim_per_frame(a, b), want, rtol=1e-10)


def test_mismatched_videos_are_clear_errors():
    with pytest.raises(ValueError, match="frame counts"):
        psnr_per_frame(_frames(0, n=4), _frames(0, n=5))
    with pytest.raises(ValueError, match="frame sizes"):
        psnr_per_frame(_frames(0, h=32), _frames(0, h=16))


def test_drift_compares_the_first_and_last_seconds():
    a = _frames(3, n=8)
    b = a.copy()
    b[-2:] = 255 - b[-2:]  # the end drifts away
    result = compare_videos(a, b, fps=2, drift_seconds=1)
    assert result["drift"]["psnr_first"] == float("inf") and result["drift"]["psnr_last"] < 10


def _write(folder, name, frames):
    folder.mkdir(parents=True, exist_ok=True)
    with Mp4Writer(folder / name) as w:
        w.append(frames)


def test_fidelity_command_pairs_videos_by_name_and_writes_json_and_png(tmp_path, capsys):
    frames = _frames(4, n=10, h=64, w=64) // 32 * 32  # blocky content survives H.264 well
    _write(tmp_path / "full", "000-a.mp4", frames)
    _write(tmp_path / "full", "001-b.mp4", frames)
    _write(tmp_path / "test", "000-a.mp4", frames)
    _write(tmp_path / "test", "001-b.mp4", np.ascontiguousarray(frames[::-1]))
    _write(tmp_path / "test", "002-only-here.mp4", frames)
    out, png = tmp_path / "fid.json", tmp_path / "fid.png"
    code = main(["eval", "fidelity", str(tmp_path / "full"), str(tmp_path / "test"), "--out", str(out),
                 "--plot", str(png)])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["videos"]) == {"000-a.mp4", "001-b.mp4"}
    assert report["videos"]["000-a.mp4"]["identical"] and report["videos"]["000-a.mp4"]["ssim_mean"] == 1.0
    # The reversed video against the decoded reference, recomputed here from the files.
    ref, test = read_frames(tmp_path / "full" / "001-b.mp4"), read_frames(tmp_path / "test" / "001-b.mp4")
    np.testing.assert_allclose(report["videos"]["001-b.mp4"]["psnr_mean"], psnr_per_frame(ref, test).mean())
    assert png.is_file() and png.stat().st_size > 0


def test_fidelity_errors_are_one_line(tmp_path, capsys):
    _write(tmp_path / "a", "x.mp4", _frames(0, n=4))
    _write(tmp_path / "b", "y.mp4", _frames(0, n=4))
    assert main(["eval", "fidelity", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "no videos with the same name" in capsys.readouterr().err
    _write(tmp_path / "c", "x.mp4", _frames(0, n=5))
    assert main(["eval", "fidelity", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "o.json")]) == 2
    assert "frame counts" in capsys.readouterr().err


def test_report_collects_renders_fidelity_and_benchmarks(tmp_path, capsys):
    for run, fps, kv in (("full", 5.0, 2**31), ("fastar", 12.5, 2**30)):
        folder = tmp_path / "runs" / run
        folder.mkdir(parents=True)
        (folder / "000-x.json").write_text(json.dumps({
            "prompt": "x", "fps": fps, "peak_memory_bytes": 3 * 2**30, "kv_bytes": kv,
            "method": {"method": run}}))
    (tmp_path / "runs" / "fastar" / "vbench.json").write_text(json.dumps({"quality": 0.8123}))
    (tmp_path / "runs" / "fidelity.json").write_text(json.dumps({
        "test": str(tmp_path / "runs" / "fastar"), "videos": {}, "summary": {"psnr_mean": 31.5, "ssim_mean": 0.91}}))
    (tmp_path / "runs" / "bench.json").write_text(json.dumps({"runs": [{
        "spec": "rolling", "frames": 2000, "fps_steady": 15.0, "chunk_median_s": 0.8, "peak_memory_bytes": 2**34,
        "kv_bytes_final": 2**32}]}))
    out = tmp_path / "report.md"
    assert main(["eval", "report", str(tmp_path / "runs"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| fastar | fastar | 1 | 12.50 | 3.00 GiB | 1.00 GiB | 31.50 dB | 0.9100 | 0.8123 |" in text
    assert "| full | full | 1 | 5.00 | 3.00 GiB | 2.00 GiB | - | - | - |" in text
    assert "| bench.json | rolling | 2000 | 15.00 | 800 ms | 16.00 GiB | 4.00 GiB |" in text
    assert main(["eval", "report", str(tmp_path / "nothing")]) == 2
