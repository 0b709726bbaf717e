"""eval/rollout_seeds.py: its per-video figures against a ground-truth video, and its resume logic (plumbing on the
tiny random model)."""

import json

import numpy as np
import pytest

from genkv.data import make_video

from . import import_eval_script


def _script():
    return import_eval_script("rollout_seeds")


def test_video_figures_follow_the_ground_truth_motion_and_a_still_video_has_none():
    rollout_seeds = _script()
    video = make_video(4, 820)
    row = rollout_seeds.video_row(video.frames, fps=16)
    true_steps = np.linalg.norm(np.diff(video.tracks[:, :, :2], axis=0), axis=-1)  # (T - 1, objects)
    assert abs(row["median_step_px"] - float(np.median(true_steps))) < 0.3
    assert row["median_step_px"] > 0.5
    assert len(video.objects) - 0.2 <= row["regions_500_800"] <= len(video.objects)
    assert row["objects_kept"] == len(video.objects) and len(row["objects_per_frame"]) == 820
    still = np.repeat(video.frames[:1], 120, axis=0)
    row = rollout_seeds.video_row(still, fps=16)
    assert row["median_step_px"] == 0 and row["flicker"] == 0 and row["regions_500_800"] is None


def test_a_rerun_measures_only_the_missing_pairs_and_refuses_another_runs_file(tmp_path, monkeypatch):
    rollout_seeds = _script()
    out = tmp_path / "seeds.json"
    args = ["--model", "tiny-random", "--frames", "9", "--device", "cpu", "--out", str(out),
            "--methods", "full", "rolling:window_frames=3"]
    rendered = []
    render = rollout_seeds.teacher_forced_latents

    def counting(pipe, spec, prompt, frames, seed, device, history):
        rendered.append(f"{spec}@{seed}")
        return render(pipe, spec, prompt, frames, seed, device, history)

    monkeypatch.setattr(rollout_seeds, "teacher_forced_latents", counting)
    rollout_seeds.main(args + ["--seeds", "0"])
    first = json.loads(out.read_text())
    rollout_seeds.main(args + ["--seeds", "0", "1"])
    assert rendered == ["full@0", "rolling:window_frames=3@0", "full@1", "rolling:window_frames=3@1"]
    payload = json.loads(out.read_text())
    assert payload["rows"]["full@0"] == first["rows"]["full@0"]  # kept, not measured again
    summary = payload["summary"]["rolling:window_frames=3"]
    assert summary["seeds"] == [0, 1]
    rows = [payload["rows"][f"rolling:window_frames=3@{s}"] for s in (0, 1)]
    assert summary["flicker"] == pytest.approx((rows[0]["flicker"] + rows[1]["flicker"]) / 2)
    assert summary["regions_500_800"] is None  # 9 frames have no frames 500-800
    for other in (["--frames", "12"], ["--frames", "9", "--fps", "8"]):  # measured otherwise: not added to
        with pytest.raises(SystemExit):
            rollout_seeds.main(["--model", "tiny-random", "--device", "cpu", "--out", str(out), "--methods", "full",
                                "--seeds", "2"] + other)
    assert json.loads(out.read_text()) == payload
