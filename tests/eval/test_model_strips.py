"""eval/model_strips.py: one PNG per prompt (a row per seed, every n-th frame) and a JSON index."""

import json
import sys
from pathlib import Path

import imageio.v3 as iio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
import model_strips  # noqa: E402


def test_strips_have_a_row_per_seed_and_a_column_per_strip_frame(tmp_path):
    assert model_strips.main(["--model", "tiny-random", "--prompts", "a red circle", "a blue square moving up",
                              "--seeds", "0", "1", "--frames", "9", "--every", "4", "--out", str(tmp_path)]) == 0
    index = json.loads((tmp_path / "strips.json").read_text())
    assert [s["file"] for s in index["strips"]] == ["00-a-red-circle.png", "01-a-blue-square-moving-up.png"]
    strip = iio.imread(tmp_path / "00-a-red-circle.png")
    assert strip.shape == (2 * 64, 3 * 64, 3)  # seeds 0 and 1; frames 0, 4, 8
