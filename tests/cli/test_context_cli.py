"""`genkv render --image / --extend` and the prompt file's `[image=PATH]` / `[extend=PATH]` prefixes."""

import json

import numpy as np
import pytest
from PIL import Image

from genkv.cli.main import main
from genkv.video import Mp4Writer, count_frames


def _render(argv, capsys):
    code = main(["render", *map(str, argv), "--model", "tiny-random"])
    return code, capsys.readouterr().err


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "clip.mp4"
    with Mp4Writer(path, fps=16) as writer:
        writer.append(np.random.default_rng(1).integers(0, 256, (15, 64, 64, 3), dtype=np.uint8))
    return path


def test_image_for_every_prompt_and_a_per_line_prefix(tmp_path, image, capsys):
    prompts = tmp_path / "prompts.txt"
    other = tmp_path / "other.png"
    Image.open(image).transpose(Image.FLIP_LEFT_RIGHT).save(other)
    prompts.write_text("a red circle bouncing\n[image=other.png] a blue square falling\n")
    out = tmp_path / "o"
    code, err = _render([prompts, "--frames", 21, "--out", out, "--image", image], capsys)
    assert code == 0, err
    first = json.loads((out / "000-a-red-circle-bouncing.json").read_text())
    second = json.loads((out / "001-a-blue-square-falling.json").read_text())
    assert first["context"] == {"image": str(image)} and second["context"] == {"image": str(other)}
    assert count_frames(out / "000-a-red-circle-bouncing.mp4") == 21


def test_extend_a_clip(tmp_path, clip, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle bouncing\n")
    out = tmp_path / "o"
    code, err = _render([prompts, "--frames", 33, "--out", out, "--extend", clip], capsys)
    assert code == 0, err
    assert count_frames(out / "000-a-red-circle-bouncing.mp4") == 33
    assert json.loads((out / "000-a-red-circle-bouncing.json").read_text())["context"] == {"extend": str(clip)}


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png"], "--image 'missing.png' not found"),
    (["--image", "{image}", "--extend", "{clip}"], "--image and --extend both given"),
    (["--image", "{corrupt}"], "--image: cannot read image"),
    (["--extend", "{short}"], "--extend"),
])
def test_bad_context_input_is_one_line_and_writes_nothing(tmp_path, image, clip, capsys, args, message):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    short = tmp_path / "short.mp4"
    with Mp4Writer(short, fps=16) as writer:
        writer.append(np.zeros((5, 64, 64, 3), np.uint8))
    names = {"{image}": image, "{clip}": clip, "{corrupt}": corrupt, "{short}": short}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle bouncing\n")
    out = tmp_path / "o"
    code, err = _render([prompts, "--frames", 21, "--out", out, *[names.get(a, a) for a in args]], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not any(out.glob("*.mp4"))
