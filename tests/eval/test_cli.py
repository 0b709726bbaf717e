"""`genkv eval fidelity` and `genkv eval report` through the real entry point."""

import json

import numpy as np
import pytest

from genkv.cli.main import main
from genkv.metrics import compare_frames
from genkv.video import Mp4Writer, read_frames


def _smooth(seed, n=10, h=48, w=64):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = [128 + 60 * np.sin(xx / 9 + rng.uniform(0, 6)) * np.cos(yy / 7 + t / 3) for t in range(n)]
    return np.clip(np.stack(frames)[..., None].repeat(3, -1), 0, 255).astype(np.uint8)


def _write(path, frames, fps=8.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    with Mp4Writer(path, fps=fps) as w:
        w.append(frames)


def _summary(path, **fields):
    data = {"prompt": "p", "video": str(path.with_suffix(".mp4")), "model": "m", "method": {"method": "full"},
            "seed": 0, "height": 48, "width": 64, "fps_video": 8.0, "device": "cpu", "frames_requested": 10,
            "frames": 10, "seconds": 2.0, "fps": 5.0, "chunk_seconds": [1.0], "peak_memory_bytes": None,
            "kv_bytes": 1024, "kv_tokens": 8, "interrupted": False}
    data.update(fields)
    path.write_text(json.dumps(data))


def test_fidelity_command_writes_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    full, test = tmp_path / "full", tmp_path / "test"
    a, b = _smooth(0), _smooth(1)
    _write(full / "000-a.mp4", a)
    _write(full / "001-b.mp4", a)
    _write(full / "005-only-ref.mp4", a)
    _write(test / "000-a.mp4", a)
    _write(test / "001-b.mp4", b)
    _write(test / "002-only-here.mp4", a)
    _summary(full / "001-b.json", seed=1, method={"method": "rolling"})
    _summary(test / "001-b.json", seed=2)
    out, png = tmp_path / "out" / "fid.json", tmp_path / "out" / "fid.png"
    code = main(["eval", "fidelity", str(full), str(test), "--out", str(out), "--plot", str(png),
                 "--drift-seconds", "0.25"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "genkv-fidelity" and report["test"] == str(test.resolve())
    assert set(report["videos"]) == {"000-a.mp4", "001-b.mp4"}
    assert report["unmatched"] == {"reference_only": ["005-only-ref.mp4"], "test_only": ["002-only-here.mp4"]}
    same = report["videos"]["000-a.mp4"]
    # Same frames through the same encoder decode identically.
    assert same["identical_frames"] == 10 and same["psnr_mean"] is None and same["ssim_mean"] == pytest.approx(1.0)
    # The other pair, recomputed from the decoded files.
    want = compare_frames(read_frames(full / "001-b.mp4"), read_frames(test / "001-b.mp4"), fps=8.0,
                          drift_seconds=0.25)
    got = report["videos"]["001-b.mp4"]
    assert got["fps"] == 8.0 and got["drift"]["psnr"]["frames"] == 2
    np.testing.assert_allclose(got["psnr_mean"], want["psnr_mean"], rtol=1e-9)
    np.testing.assert_allclose(got["ssim"], want["ssim"], rtol=1e-9)
    assert report["summary"]["videos"] == 2 and report["summary"]["psnr_mean"] == pytest.approx(want["psnr_mean"])
    assert report["summary"]["ssim_mean"] == pytest.approx((1.0 + want["ssim_mean"]) / 2)
    notes = " ".join(report["notes"])
    assert "LPIPS skipped" in notes and "seed differs" in notes and "005-only-ref.mp4" in notes
    assert "rendered with method 'rolling', not 'full'" in notes
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 videos" in capsys.readouterr().out


def test_fidelity_fps_option_sets_the_drift_window(tmp_path):
    _write(tmp_path / "a" / "x.mp4", _smooth(0))
    _write(tmp_path / "b" / "x.mp4", _smooth(1))
    out = tmp_path / "o.json"
    assert main(["eval", "fidelity", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--fps", "2",
                 "--drift-seconds", "1", "--no-lpips"]) == 0
    video = json.loads(out.read_text())["videos"]["x.mp4"]
    assert video["fps"] == 2.0 and video["drift"]["ssim"]["frames"] == 2


def test_fidelity_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    _write(tmp_path / "a" / "x.mp4", _smooth(0, n=4))
    _write(tmp_path / "b" / "y.mp4", _smooth(0, n=4))
    _write(tmp_path / "c" / "x.mp4", _smooth(0, n=5))
    out = str(tmp_path / "o.json")
    assert main(["eval", "fidelity", str(tmp_path / "a"), str(tmp_path / "b"), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "no video file names in common" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "fidelity", str(tmp_path / "a"), str(tmp_path / "c"), "--out", out]) == 2
    assert "x.mp4: videos differ in frame counts: reference 4 frames vs test 5 frames" in capsys.readouterr().err
    assert main(["eval", "fidelity", str(tmp_path / "a"), str(tmp_path / "nope"), "--out", out]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["eval", "fidelity", str(tmp_path / "a"), str(tmp_path / "a"), "--out", out,
                 "--drift-seconds", "0"]) == 2
    assert not (tmp_path / "o.json").exists()


def _bench(path):
    path.write_text(json.dumps({"environment": {"torch": "x"}, "runs": [
        {"spec": "rolling:window_frames=21", "method": {"method": "rolling"}, "compile": True, "frames": 2000,
         "fps_total": 14.2, "fps_steady": 15.04, "chunk_median_s": 0.7981, "flatness_last20_over_20to40": 1.0123,
         "peak_memory_bytes": 2**34, "kv_bytes_final": 2**32, "chunks": []},
        {"spec": "full", "method": {"method": "full"}, "compile": False, "frames": 960, "oom_at_frame": 960,
         "fps_total": 3.0, "fps_steady": 3.5, "chunk_median_s": 2.5, "flatness_last20_over_20to40": None,
         "peak_memory_bytes": 80 * 2**30, "kv_bytes_final": None, "chunks": []}]}))


def test_report_builds_the_markdown_tables(tmp_path, capsys):
    runs = tmp_path / "runs"
    rolling = {"method": "rolling", "sink_frames": 1, "window_frames": 21}
    for run, method, fps, kv in (("full", {"method": "full"}, 5.0, 2**31), ("rolling", rolling, 12.5, 2**30)):
        (runs / run).mkdir(parents=True)
        _summary(runs / run / "000-x.json", method=method, fps=fps, kv_bytes=kv, peak_memory_bytes=3 * 2**30)
        _summary(runs / run / "001-y.json", method=method, fps=fps + 1, kv_bytes=kv // 2, peak_memory_bytes=2**30,
                 frames=8, interrupted=run == "rolling")
    # Fidelity JSON written elsewhere, pointing at the run folder on another machine: matched by folder name.
    (runs / "rolling-fidelity.json").write_text(json.dumps({
        "kind": "genkv-fidelity", "test": "/elsewhere/videos/rolling", "videos": {}, "notes": ["LPIPS skipped: x"],
        "summary": {"psnr_mean": 31.5, "ssim_mean": 0.91234, "drift": {"psnr": {"delta": -2.345}}}}))
    (runs / "rolling" / "vbench.json").write_text(json.dumps({
        "kind": "genkv-vbench-long", "videos_dir": str(runs / "rolling"), "quality": 0.81234,
        "dimensions": ["subject_consistency", "dynamic_degree"],
        "aggregate": {"subject_consistency": 0.95, "dynamic_degree": 0.5}}))
    (runs / "cpu" / "nested").mkdir(parents=True)  # CPU render: no peak memory, a KV cache of KiB
    _summary(runs / "cpu" / "nested" / "000-x.json", kv_bytes=165376, method={"method": "tempcache"})
    _bench(runs / "bench.json")
    (runs / "junk.json").write_text("{not json")
    out = tmp_path / "report.md"
    assert main(["eval", "report", str(runs), "--out", str(out)]) == 0
    text = out.read_text()
    assert ("| full | full | 2 | 8-10 | 5.50 | 3.00 GiB | 2.00 GiB | - | - | - | - | - |") in text
    assert ("| rolling | rolling (sink_frames=1, window_frames=21) | 2 (1 incomplete) | 8-10 | 13.00 | 3.00 GiB | "
            "1.00 GiB | 31.50 | 0.9123 | - | -2.35 | 81.23 |") in text
    assert "| cpu/nested | tempcache | 1 | 10 | 5.00 | - | 161.5 KiB | - | - | - | - | - |" in text
    assert "| run | subject_consistency | dynamic_degree | Quality |" in text
    assert "| rolling | 95.00 | 50.00 | 81.23 |" in text
    assert ("| bench.json | rolling:window_frames=21 | yes | 2000 | 14.20 | 15.04 | 798 ms | 1.012 | 16.00 GiB | "
            "4.00 GiB |") in text
    assert "| bench.json | full | no | 960 (OOM at 960) | 3.00 | 3.50 | 2500 ms | - | 80.00 GiB | - |" in text
    assert "- rolling: LPIPS skipped: x" in text
    assert "3 runs, 2 benchmark rows" in capsys.readouterr().out


def test_report_of_an_evaluation_without_renders_and_errors(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "fid.json").write_text(json.dumps({
        "kind": "genkv-fidelity", "test": "/x/fastar", "summary": {"psnr_mean": 30.0, "ssim_mean": 0.5}}))
    out = tmp_path / "report.md"
    assert main(["eval", "report", str(tmp_path / "r"), "--out", str(out)]) == 0
    assert "| fastar | - | - | - | - | - | - | 30.00 | 0.5000 | - | - | - |" in out.read_text()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "other.json").write_text(json.dumps({"hello": 1}))
    assert main(["eval", "report", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "no genkv render summaries" in capsys.readouterr().err
    assert main(["eval", "report", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "is not a folder" in capsys.readouterr().err
