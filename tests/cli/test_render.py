"""`genkv render`: outputs, every bad input's one-line error, and partial videos on interruption."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genkv.cli.main import main
from genkv.video import count_frames, read_frames


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle bouncing\n\n# a comment line\na blue square falling\n")
    return path


# The CLI's mechanics (outputs, errors, interruption, launchers) are checked on the random-weight model, which
# renders a chunk in milliseconds; the shipped default model has its own tests (tests/core/test_shipped_models.py).
FAST_MODEL = ["--model", "tiny-random"]


def run(argv, capsys):
    argv = [str(a) for a in argv]
    if argv[:1] == ["render"] and "--model" not in argv:
        argv += FAST_MODEL
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_render_writes_one_mp4_per_prompt_with_exactly_the_frames(tmp_path, prompts, capsys):
    out = tmp_path / "videos"
    code, _, err = run(["render", prompts, "--frames", 30, "--out", out, "--method", "rolling",
                        "--set", "window_frames=6", "--set", "sink_frames=1"], capsys)
    assert code == 0, err
    videos = sorted(out.glob("*.mp4"))
    assert [v.name for v in videos] == ["000-a-red-circle-bouncing.mp4", "001-a-blue-square-falling.mp4"]
    assert all(count_frames(v) == 30 for v in videos)
    assert all("_" not in v.stem for v in videos)
    summary = json.loads((out / "000-a-red-circle-bouncing.json").read_text())
    assert summary["frames"] == 30 and summary["method"]["window_frames"] == 6 and summary["kv_bytes"] > 0
    assert "frames/s" in err and "KV" in err


def test_render_with_a_preset_config_file(tmp_path, prompts, capsys):
    repo = Path(__file__).resolve().parents[2]
    code, _, err = run(["render", prompts, "--frames", 9, "--out", tmp_path / "o",
                        "--config", repo / "configs" / "longlive.yaml"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "o" / "001-a-blue-square-falling.json").read_text())
    assert summary["method"] == {"method": "rolling", "sink_frames": 3, "window_frames": 9,
                                 "rebase_positions": True, "max_position": None}


def _bad_inputs(tmp_path, prompts):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n# only a comment\n")
    unreadable = tmp_path / "binary.txt"
    unreadable.write_bytes(b"\xff\xfe\xfa bad utf8")
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    bad_ckpt = tmp_path / "model"
    bad_ckpt.mkdir()
    (tmp_path / "file_out").write_text("x")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "000-a-red-circle-bouncing.mp4").write_bytes(b"old")
    return [
        (["render", tmp_path / "missing.txt"], "not found"),
        (["render", empty], "has no prompts"),
        (["render", unreadable], "cannot read prompt file"),
        (["render", tmp_path], "is a directory"),
        (["render", prompts, "--frames", 0], "--frames must be a positive"),
        (["render", prompts, "--frames", -5], "--frames must be a positive"),
        (["render", prompts, "--method", "nope"], "valid methods: .*full.*rolling"),
        (["render", prompts, "--method", "scalekv"], "next-scale \\(VAR\\) image models"),
        (["render", prompts, "--method", "rolling", "--set", "windows=3"], "unknown setting 'windows'"),
        (["render", prompts, "--method", "rolling", "--set", "window_frames=abc"], "expects an integer"),
        (["render", prompts, "--method", "rolling", "--set", "window_frames"], "is not key=value"),
        (["render", prompts, "--method", "rolling", "--set", "window_frames=2", "--out", tmp_path / "w"],
         "smaller than a chunk"),
        (["render", prompts, "--config", tmp_path / "none.yaml"], "not found"),
        (["render", prompts, "--model", tmp_path / "no_such_model"], "--model .* not found"),
        (["render", prompts, "--model", not_a_model], "no model_index.json"),
        (["render", prompts, "--checkpoint", tmp_path / "x.pt"], "--checkpoint needs a real --model"),
        (["render", prompts, "--out", tmp_path / "file_out"], "is a file"),
        (["render", prompts, "--out", existing], "already exists; pass --overwrite"),
        (["render", prompts, "--height", 40, "--out", tmp_path / "h"], "--height must be a positive multiple"),
        (["render", prompts, "--device", "quantum"], "is not a device"),
    ]


def test_every_bad_input_gets_one_line_and_exit_2(tmp_path, prompts, capsys):
    for argv, message in _bad_inputs(tmp_path, prompts):
        code, out, err = run(argv, capsys)
        assert code == 2, (argv, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("genkv: error:"), (argv, err)
        import re

        assert re.search(message, lines[0]), (argv, lines[0])
        assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when no CUDA device exists")
def test_cuda_without_cuda(prompts, capsys):
    code, _, err = run(["render", prompts, "--device", "cuda"], capsys)
    assert code == 2 and "no CUDA device is visible; use --device cpu" in err


def test_unwritable_output_folder(tmp_path, prompts, capsys):
    if os.geteuid() == 0:
        # root writes anywhere: make the output folder's parent a file instead of changing permissions.
        blocker = tmp_path / "blocker"
        blocker.write_text("")
        target = blocker / "videos"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "videos"
    code, _, err = run(["render", prompts, "--out", target], capsys)
    assert code == 2 and "cannot write to --out" in err


def test_wrong_format_checkpoint(tmp_path, prompts, capsys):
    from genkv.testing import tiny_self_forcing_pipeline

    folder = tmp_path / "model"
    tiny_self_forcing_pipeline().save_pretrained(folder)
    bad = tmp_path / "model.pt"
    bad.write_text("this is not a checkpoint")
    code, _, err = run(["render", prompts, "--model", folder, "--checkpoint", bad, "--out", tmp_path / "o"], capsys)
    last = err.strip().splitlines()[-1]  # model-loading progress bars may come first
    assert code == 2 and "is not a PyTorch checkpoint" in last and last.startswith("genkv: error:")
    assert "Traceback" not in err


def test_saved_model_folder_renders(tmp_path, prompts, capsys):
    from genkv.testing import tiny_self_forcing_pipeline

    folder = tmp_path / "model"
    tiny_self_forcing_pipeline().save_pretrained(folder)
    code, _, err = run(["render", prompts, "--model", folder, "--frames", 13, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert count_frames(tmp_path / "o" / "001-a-blue-square-falling.mp4") == 13


def test_an_error_mid_render_keeps_every_frame_produced(tmp_path, prompts, capsys, monkeypatch):
    from genkv.pipelines import SelfForcingPipeline

    original = SelfForcingPipeline.rollout

    def failing_rollout(self, *args, **kwargs):
        for i, chunk in enumerate(original(self, *args, **kwargs)):
            if i == 4:
                raise RuntimeError("CUDA out of memory (simulated)")
            yield chunk

    monkeypatch.setattr(SelfForcingPipeline, "rollout", failing_rollout)
    out = tmp_path / "o"
    code, _, err = run(["render", prompts, "--frames", 200, "--out", out], capsys)
    assert code == 1
    assert "CUDA out of memory (simulated)" in err and "kept 45 frames" in err and "Traceback" not in err
    video = out / "000-a-red-circle-bouncing.mp4"
    frames = read_frames(video)
    assert frames.shape == (45, 64, 64, 3)  # 9 + 3 x 12 frames from the 4 chunks done


def test_ctrl_c_leaves_a_playable_partial_video(tmp_path, prompts):
    out = tmp_path / "o"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "genkv.cli.main", "render", str(prompts), "--frames", "4000", "--out", str(out),
         *FAST_MODEL],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
        # A shell starts background jobs with SIGINT ignored and children inherit that: give the render the
        # default disposition, as an interactive terminal does, whatever launched the tests.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    video = out / "000-a-red-circle-bouncing.mp4"
    deadline = time.time() + 120
    while time.time() < deadline and (not video.exists() or video.stat().st_size < 20_000):
        time.sleep(0.2)
    assert video.exists(), proc.communicate(timeout=30)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    summary = json.loads((out / "000-a-red-circle-bouncing.json").read_text())
    assert summary["interrupted"] and 0 < summary["frames"] < 4000
    assert count_frames(video) == summary["frames"]
    assert not (out / "001-a-blue-square-falling.mp4").exists()  # the render stops at the interruption


def test_methods_command_lists_methods_and_presets(capsys):
    code, out, _ = run(["methods"], capsys)
    assert code == 0 and "rolling" in out and "longlive" in out and "window_frames=9" in out


def test_multi_process_launch_splits_prompts_without_collisions(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt number {i}" for i in range(3)))
    out = tmp_path / "o"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "genkv.cli.main", "render",
         str(prompts), "--frames", "9", "--out", str(out), *FAST_MODEL],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert [s["prompt"] for s in summaries] == [f"prompt number {i}" for i in range(3)]
    assert proc.stderr.count("rank 0:") >= 2 and proc.stderr.count("rank 1:") >= 1  # 2 prompts + 1 prompt
    assert all(count_frames(Path(s["video"])) == 9 for s in summaries)


def test_profile_prints_and_records_the_time_split(tmp_path, prompts, capsys):
    code, _, err = run(["render", prompts, "--frames", 33, "--out", tmp_path / "o", "--profile"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "o" / "000-a-red-circle-bouncing.json").read_text())
    phases = summary["profile_ms"]
    for name in ("denoise", "kv_commit", "decode", "to_host"):
        assert phases[f"{name}_gpu_ms"] >= 0 and phases[f"{name}_host_ms"] >= 0
    assert phases["denoise_host_ms"] > 0 and "write_host_ms" in phases
    assert "time per chunk" in err and "kv_commit" in err


def test_a_bundled_model_renders_by_name_and_a_checkpoint_is_refused_for_it(tmp_path, prompts, capsys, monkeypatch):
    from genkv import zoo
    from genkv.testing import tiny_self_forcing_pipeline

    tiny_self_forcing_pipeline().save_pretrained(tmp_path / "assets" / "bundled-tiny")
    monkeypatch.setattr(zoo, "ASSETS", tmp_path / "assets")
    monkeypatch.setitem(zoo.SHIPPED, "bundled-tiny", "a test model")
    monkeypatch.chdir(tmp_path)  # no folder named bundled-tiny here
    code, _, err = run(["render", prompts, "--model", "bundled-tiny", "--frames", 9, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert count_frames(tmp_path / "o" / "001-a-blue-square-falling.mp4") == 9
    code, _, err = run(["render", prompts, "--model", "bundled-tiny", "--checkpoint", tmp_path / "x.pt"], capsys)
    assert code == 2 and "bundled with genkv" in err.strip().splitlines()[-1]
    monkeypatch.setitem(zoo.SHIPPED, "missing-model", "not installed")
    code, _, err = run(["render", prompts, "--model", "missing-model"], capsys)
    assert code == 2 and "missing from this install" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback when no CUDA device exists")
def test_cuda_graphs_without_cuda_say_why_and_render_the_same_video(tmp_path, prompts, capsys):
    args = ["render", prompts, "--frames", 21, "--method", "rolling", "--set", "window_frames=6"]
    code, _, err = run([*args, "--out", tmp_path / "plain"], capsys)
    assert code == 0, err
    code, _, err = run([*args, "--out", tmp_path / "graphs", "--cuda-graphs"], capsys)
    assert code == 0, err
    assert "rendered without CUDA graphs: CUDA graphs need a CUDA device" in err and "Traceback" not in err
    name = "000-a-red-circle-bouncing"
    summary = json.loads((tmp_path / "graphs" / f"{name}.json").read_text())
    assert summary["cuda_graphs"]["recorded"] == 0 and "CUDA device" in summary["cuda_graphs"]["off_reason"]
    plain, graphed = read_frames(tmp_path / "plain" / f"{name}.mp4"), read_frames(tmp_path / "graphs" / f"{name}.mp4")
    assert graphed.shape == plain.shape and (graphed == plain).all()


def test_compile_failure_is_a_note_and_the_render_finishes(tmp_path, prompts, capsys, monkeypatch):
    import torch._dynamo
    import torch._inductor.compile_fx

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", no_compiler)
    torch._dynamo.reset()
    out = tmp_path / "videos"
    code, _, err = run(["render", prompts, "--frames", 21, "--out", out, "--compile"], capsys)
    torch._dynamo.reset()
    assert code == 0, err
    assert "note: compiling the transformer blocks failed (RuntimeError: no C++ compiler found); running them " \
           "eagerly" in " ".join(err.split())
    assert "Traceback" not in err and "RuntimeWarning" not in err
    assert all(count_frames(v) == 21 for v in out.glob("*.mp4")) and len(list(out.glob("*.mp4"))) == 2


def test_checkpoint_without_ema_weights_names_the_flag_and_no_ema_loads_it(tmp_path, prompts, capsys):
    from genkv.pipelines.self_forcing.checkpoint import to_upstream_state_dict
    from genkv.testing import tiny_self_forcing_pipeline, tiny_wan_transformer

    folder = tmp_path / "model"
    tiny_self_forcing_pipeline().save_pretrained(folder)
    ckpt = tmp_path / "self_forcing.pt"
    torch.save({"generator": to_upstream_state_dict(tiny_wan_transformer(seed=1))}, ckpt)
    argv = ["render", prompts, "--model", folder, "--checkpoint", ckpt, "--frames", 9]
    code, _, err = run(argv + ["--out", tmp_path / "a"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("genkv: error:") and "--no-ema" in last and "use_ema" not in last
    code, _, err = run(argv + ["--out", tmp_path / "b", "--no-ema"], capsys)
    assert code == 0, err
    assert count_frames(tmp_path / "b" / "000-a-red-circle-bouncing.mp4") == 9
