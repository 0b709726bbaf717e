"""`genkv render --decoder taehv --decoder-weights PATH` and `--fp8`: wired through, and bad input in one line."""

import json

import pytest
import torch

from genkv.cli.main import main
from genkv.pipelines.self_forcing.taehv import TAEHVDecoder
from genkv.video import count_frames


def _render(argv, capsys):
    code = main(["render", *map(str, argv), "--model", "tiny-random"])
    return code, capsys.readouterr().err


def test_taehv_decoder_from_a_weights_file(tmp_path, prompts, capsys):
    weights = tmp_path / "taew2_1.pth"
    torch.save(TAEHVDecoder().state_dict(), weights)  # the published layout, random values
    out = tmp_path / "o"
    code, err = _render([prompts, "--frames", 21, "--out", out, "--decoder", "taehv", "--decoder-weights", weights],
                        capsys)
    assert code == 0, err
    assert count_frames(out / "000-a-red-circle-bouncing.mp4") == 21
    assert json.loads((out / "000-a-red-circle-bouncing.json").read_text())["decoder"] == "taehv"


@pytest.mark.parametrize("scaling", [None, "tensor"])
def test_fp8_render_on_the_cpu(tmp_path, prompts, capsys, scaling):
    out = tmp_path / "o"
    code, err = _render([prompts, "--frames", 9, "--out", out, "--fp8",
                         *(["--fp8-scaling", scaling] if scaling else [])], capsys)
    assert code == 0, err
    summary = json.loads((out / "000-a-red-circle-bouncing.json").read_text())
    assert summary["fp8_layers"] > 0 and summary["fp8_scaling"] == (scaling or "row")


@pytest.mark.parametrize("args, message", [
    (["--fp8-scaling", "tensor"], "--fp8-scaling is for --fp8"),
    (["--fp8", "--fp8-scaling", "block"], "--fp8-scaling 'block' is not one of row, tensor"),
])
def test_bad_fp8_arguments_are_one_line(tmp_path, prompts, capsys, args, message):
    code, err = _render([prompts, "--frames", 9, "--out", tmp_path / "o", *args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--decoder", "taehv"], "--decoder taehv needs --decoder-weights"),
    (["--decoder", "tiny"], "--decoder 'tiny' is not one of wan, taehv"),
    (["--decoder-weights", "w.pth"], "--decoder-weights is for --decoder taehv"),
    (["--decoder", "taehv", "--decoder-weights", "missing.pth"], "not found"),
    (["--decoder", "taehv", "--decoder-weights", "{bad}"], "is not a TAEHV decoder"),
])
def test_bad_decoder_arguments_are_one_line(tmp_path, prompts, capsys, args, message):
    bad = tmp_path / "bad.pth"
    torch.save({"decoder.0.weight": torch.zeros(3)}, bad)
    args = [str(bad) if a == "{bad}" else a for a in args]
    code, err = _render([prompts, "--frames", 9, "--out", tmp_path / "o", *args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert not any((tmp_path / "o").glob("*.mp4"))  # refused before anything was written


def _speed_flags(device: str, staged: bool = False, **options):
    from pathlib import Path

    from genkv.cli.render import RenderOptions, apply_speed_options
    from genkv.pipelines.self_forcing.pipeline import SelfForcingPipeline
    from genkv.testing import tiny_self_forcing_pipeline

    pipe = tiny_self_forcing_pipeline(seed=0)
    compiled = []
    pipe.enable_compile = lambda: compiled.append(1) or SelfForcingPipeline.enable_fast_decode(pipe)  # no compile
    apply_speed_options(pipe, RenderOptions(Path("prompts.txt"), **options), torch.device(device), staged=staged)
    return pipe.cuda_graphs, [getattr(pipe, flag) for flag in pipe.FAST_DECODE_FLAGS], bool(compiled)


def test_a_cuda_render_without_compile_gets_graphs_and_the_fast_decoder():
    """Only flags are set, so a CPU checks the CUDA choice: graphs and every fast-decode flag on, nothing compiled;
    --no-cuda-graphs and a split over GPUs keep the fast decoder without graphs; a CPU render keeps the reference."""
    graphs, flags, compiled = _speed_flags("cuda")
    assert graphs and all(flags) and not compiled
    graphs, flags, _ = _speed_flags("cuda", cuda_graphs=False)
    assert not graphs and all(flags)
    graphs, flags, _ = _speed_flags("cuda", staged=True)
    assert not graphs and all(flags)
    graphs, flags, compiled = _speed_flags("cpu")
    assert not graphs and not any(flags) and not compiled
    graphs, flags, compiled = _speed_flags("cpu", compile=True, cuda_graphs=True)
    assert graphs and all(flags) and compiled
