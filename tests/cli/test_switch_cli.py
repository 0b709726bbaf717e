"""`genkv render` prompt switching: the prompt file's `@FRAME prompt` lines, `--recache`, every bad switch line's
one-line error (found before torch loads and before any file is written), and a render that equals the Python
API's for the same switches."""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from genkv.cli import render
from genkv.cli.main import main
from genkv.video import count_frames

from .test_usage import _one_error_line

EXAMPLE = """\
a red circle moving left
@160 a blue square moving right
@320 a green circle moving up
a yellow square moving down
"""


@pytest.fixture
def parsed(monkeypatch):
    """Run the real entry point up to the model load and return what it would render: (options, prompts)."""
    seen = {}

    def loaded(options, prompts, names, method, device, dtype):
        seen.update(options=options, prompts=prompts)
        return 0

    monkeypatch.setattr(render, "_run_loaded", loaded)

    def parse(tmp_path, text: str, *extra) -> tuple[render.RenderOptions, list[str]]:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text(text)
        assert main(["render", str(prompts), "--out", str(tmp_path / "o"), *map(str, extra)]) == 0
        return seen["options"], seen["prompts"]

    return parse


def _switches(options) -> list[list[tuple[int, str, int]]]:
    return [[(s.frame, s.text, s.line) for s in video] for video in options.switches]


def test_the_documented_example_is_two_videos_the_first_switching_twice(tmp_path, parsed):
    options, prompts = parsed(tmp_path, EXAMPLE, "--frames", 480)
    assert prompts == ["a red circle moving left", "a yellow square moving down"]
    assert _switches(options) == [[(160, "a blue square moving right", 2), (320, "a green circle moving up", 3)], []]
    assert options.recache == "on"


def test_comments_blank_lines_and_a_context_prefix_around_switches(tmp_path, parsed):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "start.png")
    text = "# two videos\n\n[image=start.png] a red circle moving left\n# about to switch\n\n@1\ta blue square\n" \
           "@479   a green circle  \nan orange square\n"
    options, prompts = parsed(tmp_path, text, "--frames", 480)
    assert prompts == ["a red circle moving left", "an orange square"]
    assert _switches(options) == [[(1, "a blue square", 6), (479, "a green circle", 7)], []]
    assert options.contexts[0]["source"] == str(tmp_path / "start.png") and options.contexts[1] == {}


@pytest.mark.parametrize("value", ["on", "off", "flush"])
def test_recache_takes_each_mode_and_maps_it_to_the_pipeline(tmp_path, parsed, value):
    options, _ = parsed(tmp_path, EXAMPLE, "--frames", 480, "--recache", value)
    assert options.recache == value
    assert render.RECACHE[value] == {"on": True, "off": False, "flush": "flush"}[value]


def test_recache_is_in_the_help_with_each_mode(capsys):
    assert main(["render", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "--recache" in out and "on|off|flush" in out
    assert all(f"{mode} {what}" in out for mode, what in (("on", "re-computes"), ("off", "keeps"),
                                                          ("flush", "keeps only")))
    assert "'@FRAME prompt'" in out


def test_a_bad_recache_is_one_usage_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(EXAMPLE)
    assert main(["render", str(prompts), "--recache", "sometimes"]) == 2
    assert "Invalid value for '--recache'" in _one_error_line(capsys.readouterr().err)


# (prompt file, --frames, the line the error names, what it says)
BAD_FILES = [
    ("@160 a blue square\na red circle\n", 480, 1, "comes before any prompt"),
    ("# a comment\n\n@160 a blue square\n", 480, 3, "comes before any prompt"),
    ("a red circle\n@ a blue square\n", 480, 2, "'@' has no frame number"),
    ("a red circle\n@\n", 480, 2, "'@' has no frame number"),
    ("a red circle\n@abc a blue square\n", 480, 2, "'@abc' is not a whole frame number"),
    ("a red circle\n@1.5 a blue square\n", 480, 2, "'@1.5' is not a whole frame number"),
    ("a red circle\n@160a blue square\n", 480, 2, "'@160a' is not a whole frame number"),
    ("a red circle\n@0 a blue square\n", 480, 2, "switch frame 0 must be > 0"),
    ("a red circle\n@-5 a blue square\n", 480, 2, "switch frame -5 must be > 0"),
    ("a red circle\n@480 a blue square\n", 480, 2, r"switch frame 480 is not inside the video \(--frames 480"),
    ("a red circle\n@81 a blue square\n", 81, 2, "switch frame 81 is not inside the video"),
    ("a red circle\n@200 a blue square\n@100 a green circle\n", 480, 3, "200; order a video's switch lines"),
    ("a red circle\n@200 a blue square\n@200 a green circle\n", 480, 3, "frame 200 is not after"),
    ("a red circle\n@160\n", 480, 2, "switch '@160' has no prompt"),
    ("a red circle\n@160   \n", 480, 2, "switch '@160' has no prompt"),
    ("a red circle\n@160 [image=start.png] a blue square\n", 480, 2, r"cannot take \[image=\.\.\.\]"),
    ("a red circle\n@160 [extend=clip.mp4] a blue square\n", 480, 2, r"cannot take \[extend=\.\.\.\]"),
]


@pytest.mark.parametrize("text, frames, line, message", BAD_FILES)
def test_every_bad_switch_line_is_one_line_naming_it_before_the_model_loads(tmp_path, capsys, monkeypatch, text,
                                                                           frames, line, message):
    def too_late(*args, **kwargs):
        raise AssertionError("torch was imported before the prompt file was checked")

    monkeypatch.setattr(render, "resolve_method", too_late)  # the CLI's first torch import
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(text)
    out = tmp_path / "o"
    assert main(["render", str(prompts), "--frames", str(frames), "--out", str(out)]) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert f"{prompts} line {line}: " in error and re.search(message, error), error
    assert not out.exists()


_NO_TORCH = textwrap.dedent("""
    import sys
    from pathlib import Path
    from genkv.cli import render
    from genkv.cli.main import main

    def model_stage(*args, **kwargs):  # a line let through would render 480 frames: stop at the model instead
        raise RuntimeError("reached the model")

    render.resolve_method = model_stage
    folder = Path(sys.argv[1])
    codes = []
    for number, text in enumerate(sys.argv[2:]):
        prompts = folder / f"p{number}.txt"
        prompts.write_text(text)
        try:
            codes.append(main(["render", str(prompts), "--frames", "480", "--out", str(folder / "o")]))
        except RuntimeError as err:
            codes.append(str(err))
    print({"codes": codes, "torch": "torch" in sys.modules})
""")


def test_bad_switch_lines_never_import_torch(tmp_path):
    texts = [text for text, frames, _, _ in BAD_FILES if frames == 480]
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(tmp_path), *texts], capture_output=True, text=True,
                          timeout=120)
    result = eval(proc.stdout.strip().splitlines()[-1])
    assert result == {"codes": [2] * len(texts), "torch": False}, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == len(texts) and "Traceback" not in proc.stderr


@pytest.mark.parametrize("text, frames, line, message", [
    # 13 and 15 decode from latent frames of one chunk (the chunk starting at frame 9)
    ("a red circle\n@13 a blue square\n@15 a green circle\n", 33, 3, "fall on the same chunk boundary"),
    # a 21-frame video has two chunks; frame 13 is inside the last, and no chunk starts after it
    ("a red circle\n\n@13 a blue square\n", 21, 3, "no chunk starts at or after it"),
])
def test_a_switch_the_model_cannot_place_is_one_line_before_any_video(tmp_path, capsys, text, frames, line, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(text)
    out = tmp_path / "o"
    assert main(["render", str(prompts), "--frames", str(frames), "--out", str(out), "--model", "tiny-random"]) == 2
    err = capsys.readouterr().err
    error = err.strip().splitlines()[-1]  # after the model's loading bars
    assert error.startswith(f"genkv: error: {prompts} line {line}: ") and message in error, err
    assert "one chunk" in error and "Traceback" not in err
    assert not list(out.glob("*"))


def _api_frames(prompt: str, frames: int, switches, recache) -> np.ndarray:
    """The Python API's video for the CLI's defaults (seed 0, rolling with sink 1 / window 21)."""
    import torch

    import genkv
    from genkv.cli.render import DEFAULT_METHOD, DEFAULT_SETTINGS
    from genkv.zoo import load_shipped

    settings = {k: int(v) for k, v in DEFAULT_SETTINGS.items()}
    pipe = genkv.apply_genkv(load_shipped("sprites-tiny"), DEFAULT_METHOD, **settings)
    return pipe(prompt, num_frames=frames, generator=torch.Generator().manual_seed(0), output_type="uint8",
                prompt_switches=switches, recache=recache).frames[0]


@pytest.fixture
def written(monkeypatch):
    """The frames the CLI hands its mp4 writer. They are compared, not the mp4's: H.264 is lossy and the writer
    encodes the chunks waiting for it as one segment, so the file's pixels depend on the encoder's timing."""
    import genkv.video

    frames = []

    class Spy(genkv.video.Mp4Writer):
        def append(self, chunk):
            frames.append(np.array(chunk))
            super().append(chunk)

    monkeypatch.setattr(genkv.video, "Mp4Writer", Spy)
    return frames


def test_a_render_with_a_switch_equals_the_python_api_and_not_the_render_without(tmp_path, capsys, written):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n@10 a blue square moving right\n")
    out = tmp_path / "o"
    # sprites-tiny is the default model; --recache off, not the default, so a lost mapping shows
    assert main(["render", str(prompts), "--frames", "21", "--out", str(out), "--recache", "off"]) == 0
    err = capsys.readouterr().err
    name = "000-a-red-circle-moving-left"
    assert f"{name}: switch at frame 10: 'a blue square moving right' (recache off)" in err.splitlines(), err
    # the pipeline moved the switch to the chunk boundary (frame 9); the CLI says so in one line, once
    assert err.splitlines().count("note: prompt switches apply at chunk boundaries; moved frame 10 -> 9") == 1, err
    assert "UserWarning: genkv" not in err and "Traceback" not in err  # torch's own warnings may show
    summary = json.loads((out / f"{name}.json").read_text())
    assert summary["prompt_switches"] == [{"frame": 10, "prompt": "a blue square moving right"}]
    assert summary["recache"] == "off" and count_frames(out / f"{name}.mp4") == 21
    cli = np.concatenate(written)
    switched = _api_frames("a red circle moving left", 21, [(10, "a blue square moving right")], False)
    assert cli.shape == switched.shape == (21, 64, 64, 3)
    assert np.array_equal(cli, switched)
    plain = _api_frames("a red circle moving left", 21, None, False)
    assert np.array_equal(cli[:9], plain[:9])  # the first chunk is the first prompt's
    assert np.abs(cli[9:].astype(int) - plain[9:].astype(int)).mean() > 1.0  # the switch changes the video (by 2.4)
