"""The model bundled with genkv (``genkv.zoo``): it is installed, fits the size budget, is what ``genkv render``
uses without ``--model``, renders deterministically on a CPU, draws each colour a prompt asks for and not the
others, keeps both sprites of a pair and moves them the way the prompt says."""

import json

import numpy as np
import pytest
import torch

from genkv.data import COLORS
from genkv.metrics.persistence import colour_tracks
from genkv.zoo import ASSETS, SHIPPED, load_shipped

MODEL = "sprites-tiny"


@pytest.fixture(scope="module")
def pipe():
    return load_shipped(MODEL)


def render(pipe, prompt: str, seed: int, frames: int = 16) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=prompt, num_frames=frames, output_type="uint8", generator=generator).frames[0]


def colour_share(frames: np.ndarray, colour: str) -> float:
    """Mean share of a frame's pixels near ``colour`` (the persistence measure's colour match)."""
    area = colour_tracks(frames, {colour: COLORS[colour]})[colour]["area"]
    return float(area.mean() / (frames.shape[1] * frames.shape[2]))


def test_the_sprite_model_ships_within_the_size_budget():
    assert MODEL in SHIPPED
    files = [f for f in (ASSETS / MODEL).rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20


def test_a_render_is_deterministic_for_a_seed_and_differs_between_prompts(pipe):
    a = render(pipe, "a red circle moving left", seed=0)
    b = render(pipe, "a red circle moving left", seed=0)
    c = render(pipe, "a blue square moving down", seed=0)
    assert a.shape == (16, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 2.0  # another prompt, same noise: another video


ASKED = {  # one grammar prompt per colour the model follows (since v2: every colour of the grammar)
    "red": "a red circle moving left",
    "blue": "a blue square moving down",
    "green": "a green circle moving up",
    "white": "a white square moving right",
    "magenta": "a magenta triangle moving left",
    "yellow": "a yellow circle moving up",
}


@pytest.fixture(scope="module")
def renders(pipe):
    return {colour: [render(pipe, prompt, seed) for seed in (0, 1)] for colour, prompt in ASKED.items()}


@pytest.mark.parametrize("colour", list(ASKED))
def test_each_colour_asked_appears_and_is_absent_where_not_asked(renders, colour):
    """Over 16 frames and seeds 0-1: the asked colour covers > 2% of the frame (the smallest, magenta's triangle:
    v2 3.5%, v3 3.2%, v6 3.4%, v7 2.6%: v7's decoder draws it smaller; a sprite of radius 8 px covers 5%, a
    triangle in that circle 2.1%), and more than 8x what it covers in any video that asked for another colour,
    where it is absent: under 0.5% of the frame (v7 at most 0.13%, magenta, 20x below its asked share; v6 0.71%,
    which this bound, tightened for v7, would fail; v7's transformer through v6's decoder 0.57%, green). v1 fails
    it: green and yellow came out at about 1%, magenta showed up where red was asked."""
    asked = np.mean([colour_share(frames, colour) for frames in renders[colour]])
    not_asked = max(np.mean([colour_share(frames, colour) for frames in renders[other]]) for other in ASKED
                    if other != colour)
    assert asked > 0.02
    assert not_asked < 0.005
    assert asked > 8 * not_asked


OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def test_single_sprites_move_the_asked_way_and_not_the_opposite(renders):
    """Issue 24's motion target on the renders above (16 frames: the first second at 16 fps), seeds 0-1: the
    sprite moves the asked way (``genkv.metrics.prompt_following``'s measure) in at least 10 of the 12 videos, and
    in at most one of them would it pass for the opposite word. v6 moves the asked way in 0.96 of the sprites on
    the 32 x 2 protocol (v5 0.80, v4 0.62) and in all 12 here; a model or pipeline that ignores the direction word
    or plays its frames backwards fails."""
    from genkv.metrics.prompt_following import prompt_following

    asked = opposite = 0
    for colour, prompt in ASKED.items():
        word = prompt.split()[-1]
        flipped = prompt.replace(word, OPPOSITE[word])
        for frames in renders[colour]:
            asked += all(prompt_following(frames, prompt)["direction_matches"].values())
            opposite += all(prompt_following(frames, flipped)["direction_matches"].values())
    assert asked >= 10, asked
    assert opposite <= 1, opposite


PAIRS = ("a red circle moving left and a blue square moving down",
         "a green square moving right and a yellow circle moving up")


def test_two_sprite_prompts_keep_both_colours(pipe):
    """The issue's two-sprite target on the first 48 frames (past the training clips' 45), seeds 0-1: both asked
    colours present (``genkv.metrics.prompt_following``'s measure, >= 12 px each) in >= 42 of the 48 frames of every
    video (the issue asks 80% on average; v6: 44-48 here, 0.97 on the 32 x 2 protocol; v3 0.96 there). v2 (0.53)
    draws red and blue as blue and magenta blobs, and its yellow turns magenta."""
    from genkv.metrics.prompt_following import prompt_following

    for prompt in PAIRS:
        for seed in (0, 1):
            both = prompt_following(render(pipe, prompt, seed, frames=48), prompt)["all_present"]
            assert both >= 42 / 48, (prompt, seed, both)


def test_render_without_model_uses_the_shipped_model(tmp_path):
    from genkv.cli.main import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    assert main(["render", str(prompts), "--frames", "9", "--out", str(tmp_path / "o")]) == 0
    summary = json.loads((tmp_path / "o" / "000-a-red-circle-moving-left.json").read_text())
    assert summary["model"] == MODEL and summary["frames"] == 9


def test_words_outside_the_grammar_are_named(pipe):
    from genkv.cli.render import unknown_words
    from genkv.data import vocabulary

    assert unknown_words(pipe, "a red circle bouncing left, Falling") == ["bouncing", "falling"]
    assert unknown_words(pipe, " ".join(vocabulary())) == []
