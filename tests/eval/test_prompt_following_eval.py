"""eval/prompt_following.py end to end on the tiny random model (plumbing: a random model follows nothing)."""

import json
import sys
from pathlib import Path

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
