"""The command line's contract for mistakes: every usage error is one line on stderr and exit code 2, with no
traceback, and is found before torch is imported (so it takes well under a second, not a model load)."""

import json
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from genkv.cli.main import main


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("genkv: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _usage_errors(prompts):
    return [
        ([], "no command given"),
        (["--bogus"], "No such option: --bogus"),
        (["nope"], "No such command 'nope'"),
        (["render", prompts, "--frames", "abc"], "Invalid value for '--frames'"),
        (["render", prompts, "--out"], "'--out' requires an argument"),
        (["render"], "Missing argument"),
        (["render", prompts, "--fram", "3"], "No such option: --fram"),
        (["eval"], "no command given"),
        (["eval", "fidelity", "a", "b"], "Missing option '--out'"),
        (["calibrate", "tiny-random", "--budget", "x"], "Invalid value for '--budget'"),
    ]


def test_every_usage_error_is_one_line_and_exit_2(prompts, capsys):
    for argv, message in _usage_errors(prompts):
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        assert code == 2, (argv, captured.err)
        assert message in _one_error_line(captured.err), (argv, captured.err)


def test_bare_genkv_prints_the_commands_then_the_error(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "render" in captured.out and "methods" in captured.out
    _one_error_line(captured.err)


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"genkv {version('genkv')}"


def _bad_numbers(prompts, tmp_path):
    return [
        (["--frames", 0], "--frames must be a positive"),
        (["--frames", 10**9], "over the limit of 100000 frames"),
        (["--frames", 100_001], "ask for at most 100000"),
        (["--height", 0], "--height must be a positive number of pixels"),
        (["--height", -64], "--height must be a positive number of pixels"),
        (["--width", 0], "--width must be a positive number of pixels"),
        (["--fps", 0], "--fps must be positive"),
        (["--progress-every", 0], "--progress-every must be a positive"),
    ]


def test_numbers_are_checked_before_the_model_loads(prompts, tmp_path, capsys, monkeypatch):
    from genkv.cli import render

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(render, "load_pipeline", no_model)
    for extra, message in _bad_numbers(prompts, tmp_path):
        code = main(["render", str(prompts), "--out", str(tmp_path / "o"), *map(str, extra)])
        assert code == 2, extra
        assert re.search(message, _one_error_line(capsys.readouterr().err)), extra


def test_a_height_the_model_cannot_take_is_one_line_after_loading(prompts, tmp_path, capsys):
    code = main(["render", str(prompts), "--model", "tiny-random", "--height", "40", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "--height must be a positive multiple" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not list((tmp_path / "o").glob("*.mp4"))


_NO_TORCH = textwrap.dedent("""
    import sys, time
    start = time.perf_counter()
    from genkv.cli.main import main
    code = main(sys.argv[1:])
    print({"code": code, "torch": "torch" in sys.modules, "diffusers": "diffusers" in sys.modules,
           "seconds": time.perf_counter() - start})
""")


@pytest.mark.parametrize("argv", [
    ["render", "{tmp}/missing.txt"],
    ["render", "{prompts}", "--frames", "0"],
    ["render", "{prompts}", "--frames", "1000000000"],
    ["render", "{prompts}", "--height", "0"],
    ["render", "{prompts}", "--set", "window_frames"],
    ["render", "{prompts}", "--bogus"],
    ["eval", "fidelity", "{tmp}", "{tmp}"],
    ["eval", "fidelity", "{tmp}/none", "{tmp}", "--out", "{tmp}/f.json"],
    ["eval", "report", "{tmp}/none", "--out", "{tmp}/r.md"],
    ["--version"],
])
def test_bad_arguments_never_import_torch(argv, prompts, tmp_path):
    argv = [a.format(tmp=tmp_path, prompts=prompts) for a in argv]
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, *argv], capture_output=True, text=True, timeout=120)
    result = eval(proc.stdout.strip().splitlines()[-1])
    assert not result["torch"] and not result["diffusers"], (argv, result)
    if argv != ["--version"]:
        assert result["code"] == 2, (argv, proc.stderr)
        _one_error_line(proc.stderr)


def test_import_genkv_is_lazy_but_its_names_work():
    code = textwrap.dedent("""
        import sys, genkv
        assert "torch" not in sys.modules, "import genkv imported torch"
        from genkv import apply_genkv, GenKVMethod, get_method
        assert "torch" in sys.modules
        assert set(genkv.__all__) <= set(dir(genkv)) and all(getattr(genkv, n) for n in genkv.__all__)
        assert get_method("rolling").window_frames == 21 and genkv.SelfForcingPipeline.__name__ == "SelfForcingPipeline"
        assert genkv.cache is sys.modules["genkv.cache"]
        try:
            genkv.no_such_name
        except AttributeError as err:
            assert "no_such_name" in str(err)
        else:
            raise AssertionError("no AttributeError")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_the_installed_console_script_reports_a_bad_option_in_one_line(tmp_path):
    script = shutil.which("genkv") or (shutil.which("genkv", path=str(__import__("pathlib").Path(sys.executable).parent)))
    if script is None:
        pytest.skip("the genkv console script is not installed")
    proc = subprocess.run([script, "render", str(tmp_path / "p.txt"), "--no-such-option"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "No such option: --no-such-option" in _one_error_line(proc.stderr)
    assert proc.stdout == ""


def test_methods_lists_settings_with_defaults_and_meanings_video_and_image_apart(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    video, rest = out.split("image methods", 1)
    image, presets = rest.split("presets", 1)
    assert re.search(r"^  rolling .*\n(.*\n)*?      window_frames=21 +most recent latent frames", video, re.M)
    assert re.search(r"^      threshold=0\.95 +cosine similarity", video, re.M)  # tempcache and fastar
    assert re.search(r"^      prompt_top_k=32 +real prompt tokens", video, re.M)  # fastar's, documented by annca
    assert "  scalekv " in image and "  hack " in image and "  scalekv " not in video and "  hack " not in video
    assert re.search(r"^      budget=0\.1 +fraction of the full cache kept", image, re.M)
    assert "genkv render without --method or --config: rolling with sink_frames=1, window_frames=21" in video
    assert re.search(r"^  longlive +rolling: sink_frames=3, window_frames=9", presets, re.M)
    # every setting of every method has a meaning
    assert not re.search(r"^      \S+=\S+\s*$", out, re.M)
    # a meaning runs over its continuation lines, colons in them included
    assert re.search(r"^      budget_bytes=None +memory for the self-attention cache .* instead of a frame budget: a "
                     r"bounded method takes the most frames that fit", video, re.M)


def test_render_defaults_to_a_bounded_method_and_says_so(prompts, tmp_path, capsys):
    from genkv.cli.render import DEFAULT_METHOD, DEFAULT_SETTINGS, METHOD_HELP

    assert DEFAULT_METHOD != "full" and "rolling" in METHOD_HELP and "sink_frames=1" in METHOD_HELP
    out = tmp_path / "o"
    assert main(["render", str(prompts), "--model", "tiny-random", "--frames", "9", "--out", str(out)]) == 0
    summary = json.loads((out / "000-a-red-circle-bouncing.json").read_text())
    assert summary["method"]["method"] == "rolling"
    assert {k: str(summary["method"][k]) for k in DEFAULT_SETTINGS} == DEFAULT_SETTINGS
    # --set adjusts the default method; an explicit --method starts from that method's own defaults
    assert main(["render", str(prompts), "--model", "tiny-random", "--frames", "9", "--out", str(out), "--overwrite",
                 "--set", "window_frames=6"]) == 0
    summary = json.loads((out / "000-a-red-circle-bouncing.json").read_text())
    assert (summary["method"]["sink_frames"], summary["method"]["window_frames"]) == (1, 6)
    assert main(["render", str(prompts), "--model", "tiny-random", "--frames", "9", "--out", str(out), "--overwrite",
                 "--method", "full"]) == 0
    assert json.loads((out / "000-a-red-circle-bouncing.json").read_text())["method"] == {"method": "full"}
