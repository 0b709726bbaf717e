"""`genkv render --pipeline-gpus N` (issue 25): the command starts its own stages (torch.distributed's launcher, gloo
on CPU processes here), and the video equals the one-process render; bad combinations are one line, nothing written.
"""

import json
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from genkv.cli.main import main

NAME = "000-a-red-circle-bouncing"


def _cli(args, tmp_path, method: str = "rolling") -> subprocess.CompletedProcess:
    # A fresh process with one thread per process for both renders: the same float reductions on each side.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "genkv.cli.main", "render", *map(str, args), "--model",
                           "tiny-random", "--frames", "21", "--device", "cpu", "--method", method],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


@pytest.mark.parametrize("method", ["rolling", "fastar"])  # per-layer caches; one stacked allocation
def test_two_stages_render_the_one_process_video(tmp_path, prompts, method):
    split = _cli([prompts, "--out", tmp_path / "split", "--pipeline-gpus", "2"], tmp_path, method)
    assert split.returncode == 0, split.stderr[-3000:]
    one = _cli([prompts, "--out", tmp_path / "one"], tmp_path, method)
    assert one.returncode == 0, one.stderr[-3000:]
    np.testing.assert_array_equal(iio.imread(tmp_path / "split" / f"{NAME}.mp4"),
                                  iio.imread(tmp_path / "one" / f"{NAME}.mp4"))
    summary = json.loads((tmp_path / "split" / f"{NAME}.json").read_text())
    reference = json.loads((tmp_path / "one" / f"{NAME}.json").read_text())
    assert summary["pipeline_gpus"] == 2 and reference["pipeline_gpus"] is None
    assert summary["frames"] == reference["frames"] == 21
    # each stage holds its own layers' caches: half of the one-process cache each (an even number of blocks)
    assert summary["stage_kv_bytes"] == [reference["kv_bytes"] // 2] * 2
    assert len(summary["stage_peak_memory_bytes"]) == 2 and min(summary["stage_peak_memory_bytes"]) > 0
    # one progress report, from the decoding stage; no launcher chatter, no traceback
    assert split.stderr.count("frames/s") == one.stderr.count("frames/s")
    assert "Traceback" not in split.stderr and "torch.distributed" not in split.stderr


@pytest.mark.parametrize("extra, message", [
    (["--pipeline-gpus", "1", "--device", "cpu"],
     "--pipeline-gpus 1: a split needs at least 2 GPUs (one per stage); with one GPU drop --pipeline-gpus"),
    (["--pipeline-gpus", "2", "--device", "cpu", "--compile"],
     "--pipeline-gpus runs eagerly (the hand-over between stages is not in a CUDA graph); drop --compile / "
     "--cuda-graphs"),
    (["--pipeline-gpus", "2", "--device", "cpu", "--vae-device", "cpu"],
     "--pipeline-gpus decodes on the last stage's GPU; drop --vae-device"),
    (["--pipeline-gpus", "2"],
     "--pipeline-gpus 2: no CUDA device is visible here; drop --pipeline-gpus, or pass --device cpu to run the "
     "stages as CPU processes (for testing)"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, prompts, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["render", str(prompts), "--model", "tiny-random", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err == f"genkv: error: {message}\n"
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_more_stages_than_gpus_and_a_foreign_launcher_are_refused(tmp_path, prompts, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv = ["render", str(prompts), "--model", "tiny-random", "--out", str(tmp_path / "o"), "--pipeline-gpus", "2"]
    assert main([*argv, "--device", "cuda"]) == 2
    assert capsys.readouterr().err == ("genkv: error: --pipeline-gpus 2: only 1 CUDA device(s) visible, and each "
                                       "stage needs its own; drop --pipeline-gpus\n")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main([*argv[:-1], "3", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.endswith("only 2 CUDA device(s) visible, and each stage needs its own; ask for at "
                                            "most 2\n")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main([*argv, "--device", "cuda:0"]) == 2
    assert "stage s runs on cuda:s; pass --device cuda (or auto)" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main([*argv, "--device", "cpu"]) == 2
    assert capsys.readouterr().err == ("genkv: error: --pipeline-gpus 2 under a launcher of 4 processes; start 2 "
                                       "processes (torchrun --nproc-per-node 2) or let genkv start them (run it "
                                       "without torchrun)\n")


def test_the_launch_runs_this_command_line_and_reports_the_decoding_stage(tmp_path, prompts, monkeypatch):
    import torch.distributed.launcher.api as launcher
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    started = []
    failures: dict = {}

    def fake_launch(config, entrypoint):
        def run(*args):
            started.append((config.nproc_per_node, config.max_restarts, entrypoint, args))
            if failures:
                raise ChildFailedError("genkv", failures)
        return run

    monkeypatch.setattr(launcher, "elastic_launch", fake_launch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["render", str(prompts), "--model", "tiny-random", "--out", str(tmp_path / "o"), "--device", "cpu",
            "--pipeline-gpus", "3"]
    assert main(argv) == 0
    assert started == [(3, 0, sys.executable, ("-m", "genkv.cli.main", *argv))]

    def failure(rank, code):
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file=str(tmp_path / "none"))

    failures.update({0: failure(0, -15), 2: failure(2, 130)})  # the decoding (last) stage was interrupted
    assert main(argv) == 130
    failures.clear()
    failures.update({0: failure(0, 1), 2: failure(2, -15)})  # stage 0 failed, the launcher stopped the last
    assert main(argv) == 1
    failures.clear()
    failures.update({1: failure(1, -15), 2: failure(2, -15)})  # all stopped by a SIGTERM from outside
    assert main(argv) == 143
