"""eval/prompt_following.py end to end on the tiny random model (plumbing: a random model follows nothing)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))

import prompt_following  # noqa: E402


def test_the_eval_renders_every_prompt_and_seed_and_measures_the_data_too(tmp_path, capsys):
    out = tmp_path / "pf.json"
    assert prompt_following.main(["--model", "tiny-random", "--prompts", "2", "--seeds", "2", "--frames", "9",
                                  "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["videos"]) == 4 and len(result["data_videos"]) == 2
    assert [v["seed"] for v in result["videos"]] == [0, 1, 0, 1]
    assert {v["prompt"] for v in result["videos"]} == {v["prompt"] for v in result["data_videos"]}
    assert all(v["frames"] == 9 for v in result["videos"] + result["data_videos"])
    assert min(result["data_summary"]["colour_present"].values()) > 0.9  # the data shows its own prompts
    assert "present where asked" in capsys.readouterr().out


def test_the_data_reference_is_drawn_like_the_training_clips(tmp_path):
    """By default the reference videos are the training clips' kind (plain background, radius 0.13-0.21); the
    options give the generator's own defaults back. Same prompts either way. Checked against the measure run
    directly on the data videos; `--seeds 0` measures the data alone."""
    from genkv.data import make_video
    from genkv.metrics.prompt_following import prompt_following as measure

    runs = {}
    for name, extra in (("training", []), ("generator", ["--backgrounds", "plain", "checker", "stripes",
                                                          "--radius", "0.09", "0.16"])):
        out = tmp_path / f"{name}.json"
        assert prompt_following.main(["--model", "tiny-random", "--prompts", "3", "--seeds", "0", "--frames", "9",
                                      *extra, "--out", str(out)]) == 0
        runs[name] = json.loads(out.read_text())
    training = [make_video(seed=s, num_frames=9, max_objects=2, backgrounds=("plain",), radius=(0.13, 0.21))
                for s in range(3)]
    generator = [make_video(seed=s, num_frames=9, max_objects=2) for s in range(3)]
    for name, videos in (("training", training), ("generator", generator)):
        want = [json.loads(json.dumps(dict(prompt=v.prompt, **measure(v.frames, v.prompt)))) for v in videos]
        assert runs[name]["data_videos"] == want and runs[name]["videos"] == []
    assert [v.prompt for v in training] == [v.prompt for v in generator]
    assert runs["training"]["radius"] == [0.13, 0.21] and runs["training"]["backgrounds"] == ["plain"]
    assert runs["training"]["data_summary"]["edge_energy"] != runs["generator"]["data_summary"]["edge_energy"]
    with pytest.raises(SystemExit):
        prompt_following.main(["--model", "tiny-random", "--radius", "0.3", "0.6", "--out", str(tmp_path / "x")])


def test_room_frames_draws_the_reference_with_that_room_and_the_same_prompts(tmp_path):
    from genkv.data import make_video
    from genkv.metrics.prompt_following import prompt_following as measure

    out = tmp_path / "room.json"
    assert prompt_following.main(["--model", "tiny-random", "--prompts", "4", "--seeds", "0", "--frames", "17",
                                  "--room-frames", "16", "--out", str(out)]) == 0
    run = json.loads(out.read_text())
    videos = [make_video(seed=s, num_frames=17, max_objects=2, backgrounds=("plain",), radius=(0.13, 0.21),
                         room_frames=16) for s in range(4)]
    assert run["room_frames"] == 16
    assert run["data_videos"] == [json.loads(json.dumps(dict(prompt=v.prompt, **measure(v.frames, v.prompt))))
                                  for v in videos]
    with pytest.raises(SystemExit):
        prompt_following.main(["--model", "tiny-random", "--room-frames", "-1", "--out", str(tmp_path / "x")])


def test_steps_samples_with_that_many_evenly_spaced_steps(tmp_path, monkeypatch):
    from genkv.pipelines import SelfForcingPipeline

    calls = []
    original = SelfForcingPipeline.__call__

    def counting_call(self, *args, **kwargs):
        calls.append(len(self.scheduler.timesteps))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SelfForcingPipeline, "__call__", counting_call)
    out = tmp_path / "pf.json"
    assert prompt_following.main(["--model", "tiny-random", "--prompts", "1", "--seeds", "1", "--frames", "9",
                                  "--steps", "3", "--out", str(out)]) == 0  # tiny-random's own: 4 steps
    assert json.loads(out.read_text())["denoising_step_list"] == [1000, 667, 333] and calls == [3]
    assert prompt_following.even_steps(4) == [1000, 750, 500, 250]  # Self-Forcing's
    assert prompt_following.even_steps(16)[:4] == [1000, 938, 875, 812]  # the shipped sprite model's schedule


def test_split_measures_the_frames_before_and_from_it_apart(tmp_path, capsys):
    """`--split-at 5`: the summaries of the renders' frames [0, 5) and [5, end), against the measure run on the same
    renders' frames cut here (the renders are deterministic from prompt and seed)."""
    import torch

    import genkv
    from genkv.data import make_video
    from genkv.metrics.prompt_following import prompt_following as measure
    from genkv.metrics.prompt_following import summarize

    out = tmp_path / "pf.json"
    assert prompt_following.main(["--model", "tiny-random", "--prompts", "2", "--seeds", "1", "--frames", "9",
                                  "--split-at", "5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    pipe = prompt_following.load_pipeline("tiny-random", torch.device("cpu"))
    genkv.apply_genkv(pipe, "full")
    before, after = [], []
    for seed in range(2):
        prompt = make_video(seed=seed, num_frames=9, max_objects=2, size=pipe.config.default_height).prompt
        frames = pipe(prompt, num_frames=9, output_type="uint8", generator=torch.Generator().manual_seed(0)).frames[0]
        before.append(measure(frames[:5], prompt))
        after.append(measure(frames[5:], prompt))
    assert result["split_at"] == 5
    assert result["model_summary_before_split"] == json.loads(json.dumps(summarize(before)))
    assert result["model_summary_from_split"] == json.loads(json.dumps(summarize(after)))
    assert "     <5      >=5" in capsys.readouterr().out
    assert prompt_following.main(["--model", "tiny-random", "--prompts", "1", "--seeds", "1", "--frames", "9",
                                  "--out", str(out)]) == 0
    assert "split_at" not in json.loads(out.read_text())  # the default split (45) lies past a 9-frame render


def test_guidance_is_passed_to_every_render_and_checked(tmp_path, monkeypatch):
    import pytest

    from genkv.pipelines import SelfForcingPipeline

    scales = []
    original = SelfForcingPipeline.__call__

    def recording_call(self, *args, **kwargs):
        scales.append(kwargs.get("guidance_scale"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SelfForcingPipeline, "__call__", recording_call)
    out = tmp_path / "pf.json"
    assert prompt_following.main(["--model", "tiny-random", "--prompts", "2", "--seeds", "1", "--frames", "9",
                                  "--guidance", "3", "--out", str(out)]) == 0
    assert scales == [3.0, 3.0] and json.loads(out.read_text())["guidance_scale"] == 3.0
    assert prompt_following.main(["--model", "tiny-random", "--prompts", "1", "--seeds", "1", "--frames", "9",
                                  "--out", str(out)]) == 0
    assert scales[-1] is None  # the model's own default_guidance_scale
    with pytest.raises(SystemExit):
        prompt_following.main(["--model", "tiny-random", "--guidance", "0.5", "--out", str(out)])
