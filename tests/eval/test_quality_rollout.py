"""eval/quality_rollout.py end to end on the tiny random model (plumbing; the measures themselves are tested in
tests/data/test_persistence.py)."""

import json
import math

import pytest

from . import import_eval_script


def _quality_rollout():
    return import_eval_script("quality_rollout")


def test_full_against_itself_is_identical_and_a_sparse_method_is_not(tmp_path):
    quality_rollout = _quality_rollout()
    out = tmp_path / "q.json"
    quality_rollout.main(["--model", "tiny-random", "--frames", "21", "--methods", "full", "full",
                          "fastar:budget_frames=2,top_k=1,prompt_top_k=2",
                          "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    again = results["full"]  # the second `full` overwrote the key: same seed, same frames
    assert again["psnr_mean"] is None or math.isinf(again["psnr_mean"]) or again["psnr_mean"] > 99
    assert again["ssim_mean"] == 1.0
    sparse = results["fastar:budget_frames=2,top_k=1,prompt_top_k=2"]
    assert len(sparse["psnr"]) == 21 and sparse["ssim_mean"] < 1.0
    assert len(sparse["flicker"]) == 20 and "objects_kept" in sparse["persistence"]


def test_teacher_forcing_gives_each_chunk_the_full_history():
    quality_rollout = _quality_rollout()
    import torch

    from genkv.testing import tiny_self_forcing_pipeline

    pipe = tiny_self_forcing_pipeline(seed=0)
    device = torch.device("cpu")
    history = quality_rollout.teacher_forced_latents(pipe, "full", "a red circle", 33, 0, device, None)
    # full fed its own history reproduces itself; a window that holds every frame is full, exactly
    same = quality_rollout.teacher_forced_latents(pipe, "full", "a red circle", 33, 0, device, history)
    wide = quality_rollout.teacher_forced_latents(pipe, "rolling:window_frames=30", "a red circle", 33, 0, device,
                                                  history)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(history, same, wide))
    assert math.isinf(quality_rollout.psnr_of_mean_error(quality_rollout.teacher_forced_psnr(pipe, history, same)))
    # a 3-frame window forgets: chunks 2+ differ, chunk 1 (nothing forgotten yet) is identical
    narrow = quality_rollout.teacher_forced_latents(pipe, "rolling:window_frames=3", "a red circle", 33, 0, device,
                                                    history)
    assert torch.equal(narrow[0], history[0]) and not torch.equal(narrow[-1], history[-1])
    psnr = quality_rollout.teacher_forced_psnr(pipe, history, narrow)
    assert len(psnr) == 33 and all(math.isinf(p) for p in psnr[:9]) and math.isfinite(min(psnr[9:]))
    # the decode of a teacher-forced chunk continues the full video's VAE cache: equal latents, equal pixels
    assert quality_rollout.psnr_of_mean_error([float("inf"), 48.13080360867909]) > 48.1


def test_teacher_forced_table_column(tmp_path):
    quality_rollout = _quality_rollout()
    out = tmp_path / "q.json"
    quality_rollout.main(["--model", "tiny-random", "--frames", "21", "--methods", "full", "rolling:window_frames=3",
                          "--teacher-forced", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert len(results["rolling:window_frames=3"]["teacher_forced_psnr"]) == 21


def test_the_renders_are_the_pipelines_own_output():
    """Methods are rendered as chunk latents (so full's can serve as the teacher-forced history) and decoded as
    `pipe.stream` decodes them: the frames are the pipeline's own for the same seed."""
    import numpy as np
    import torch

    quality_rollout = _quality_rollout()
    from genkv.testing import tiny_self_forcing_pipeline

    pipe = tiny_self_forcing_pipeline(seed=0)
    chunks = quality_rollout.teacher_forced_latents(pipe, "rolling:window_frames=3", "a red circle", 21, 4,
                                                    torch.device("cpu"), None)
    got = quality_rollout.decode_chunks(pipe, chunks, 21)
    import genkv

    genkv.apply_genkv(pipe, "rolling", window_frames=3)
    want = np.concatenate(list(pipe.stream("a red circle", num_frames=21, generator=torch.Generator().manual_seed(4))))
    assert got.shape == want.shape == (21, 64, 64, 3) and np.array_equal(got, want)


def test_a_run_stopped_by_a_later_method_keeps_what_it_measured(tmp_path, monkeypatch):
    """The JSON is written after every method: a run that a later method stops (here its render fails) still
    holds the methods before it, marked incomplete; a finished run is marked complete."""
    quality_rollout = _quality_rollout()
    out = tmp_path / "q.json"
    render = quality_rollout.teacher_forced_latents

    def failing_render(pipe, spec, *args):
        if spec == "rolling:window_frames=2":
            raise RuntimeError("out of memory (simulated)")
        return render(pipe, spec, *args)

    monkeypatch.setattr(quality_rollout, "teacher_forced_latents", failing_render)
    with pytest.raises(RuntimeError, match="simulated"):
        quality_rollout.main(["--model", "tiny-random", "--frames", "9", "--methods", "full",
                              "rolling:window_frames=3", "rolling:window_frames=2", "--out", str(out)])
    monkeypatch.setattr(quality_rollout, "teacher_forced_latents", render)
    kept = json.loads(out.read_text())
    assert kept["complete"] is False and list(kept["results"]) == ["full", "rolling:window_frames=3"]
    assert len(kept["results"]["rolling:window_frames=3"]["psnr"]) == 9
    quality_rollout.main(["--model", "tiny-random", "--frames", "9", "--methods", "full", "--out", str(out)])
    assert json.loads(out.read_text())["complete"] is True


@pytest.mark.parametrize("script", ["quality_rollout", "rollout_seeds"])
def test_a_bad_method_spec_stops_the_run_before_anything_renders(script, tmp_path, capsys, monkeypatch):
    """Every --methods entry is checked before the model loads: a value a method refuses, third in the list,
    exits at once with one line naming it (not after the first two methods have rendered)."""
    module = import_eval_script(script)
    monkeypatch.setattr(module, "load_pipeline", lambda *a: pytest.fail("the model loaded before the check"))
    with pytest.raises(SystemExit) as stop:
        module.main(["--model", "tiny-random", "--frames", "9", "--methods", "full", "rolling:window_frames=3",
                     "tempcache:max_count=0", "--out", str(tmp_path / "o.json")])
    assert stop.value.code == 2
    assert "--methods tempcache:max_count=0: " in capsys.readouterr().err
