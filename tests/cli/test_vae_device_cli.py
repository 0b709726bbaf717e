"""`genkv render --vae-device DEVICE`: wired through to the pipeline, and a device that is not there is one line."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import genkv.cli.render as render
from genkv.cli.main import main


def _render(argv, capsys):
    code = main(["render", *map(str, argv), "--model", "tiny-random", "--frames", "21"])
    return code, capsys.readouterr().err


def test_vae_device_renders_the_same_video(tmp_path, prompts, capsys):
    code, err = _render([prompts, "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    code, err = _render([prompts, "--out", tmp_path / "b", "--vae-device", "cpu"], capsys)
    assert code == 0, err
    name = "000-a-red-circle-bouncing"
    summary = json.loads((tmp_path / "b" / f"{name}.json").read_text())
    assert summary["vae_device"] == "cpu"
    assert json.loads((tmp_path / "a" / f"{name}.json").read_text())["vae_device"] is None
    np.testing.assert_array_equal(iio.imread(tmp_path / "b" / f"{name}.mp4"), iio.imread(tmp_path / "a" / f"{name}.mp4"))


@pytest.mark.parametrize("device, count, message", [
    ("cuda:1", 0, "--vae-device 'cuda:1': no CUDA device is visible here; drop --vae-device"),
    ("cuda:1", 1, "--vae-device 'cuda:1' does not exist: this machine has 1 CUDA device (cuda:0)"),
    ("gpu", 1, "--vae-device 'gpu' is not a device"),
])
def test_a_missing_device_is_one_line(tmp_path, prompts, capsys, monkeypatch, device, count, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    code, err = _render([prompts, "--out", tmp_path / "o", "--vae-device", device, "--device", "cpu"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # refused before writing


def test_not_with_several_processes(tmp_path, prompts, capsys, monkeypatch):
    monkeypatch.setattr(render, "process_rank", lambda: (0, 2, 0))
    code, err = _render([prompts, "--out", tmp_path / "o", "--vae-device", "cpu"], capsys)
    assert code == 2 and "--vae-device with 2 processes" in err and len(err.strip().splitlines()) == 1
