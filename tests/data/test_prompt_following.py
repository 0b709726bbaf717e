"""The prompt-following measures against the sprite data itself (whose prompts are true by construction) and against
prompts it does not show."""

import numpy as np
import pytest

from genkv.data import COLORS, make_video
from genkv.metrics.prompt_following import edge_energy, parse_prompt, prompt_following, summarize

VIDEOS = [make_video(seed=s, num_frames=48, max_objects=2) for s in range(24)]


def test_the_datas_own_videos_follow_their_prompts():
    summary = summarize([prompt_following(v.frames, v.prompt) for v in VIDEOS])
    assert min(summary["colour_present"].values()) > 0.95
    assert max(summary["colour_shown_unasked"].values()) < 0.01
    assert summary["two_sprites_both_present"] > 0.95
    assert summary["axis_matches"] > 0.9  # bounces flip the sign, never the axis
    assert summary["direction_matches"] > 0.6


def test_prompts_the_video_does_not_show_are_measured_as_not_followed():
    swapped, turned = [], []
    others = {"left": "up", "right": "down", "up": "left", "down": "right", "diagonally": "left"}
    for v in VIDEOS:
        sprites = parse_prompt(v.prompt)
        asked = {c for c, _, _ in sprites}
        spare = [c for c in COLORS if c not in asked]
        wrong_colours = " and ".join(f"a {spare[i]} {s} moving {d}" for i, (_, s, d) in enumerate(sprites))
        swapped.append(prompt_following(v.frames, wrong_colours))
        wrong_ways = " and ".join(f"a {c} {s} moving {others[d]}" for c, s, d in sprites)
        turned.append(prompt_following(v.frames, wrong_ways))
    assert max(summarize(swapped)["colour_present"].values()) < 0.05
    assert min(summarize(swapped)["colour_shown_unasked"].values()) > 0.1  # the colours shown, now unasked
    assert summarize(turned)["axis_matches"] < 0.2


def test_blending_two_sprites_into_one_colour_shows_neither():
    video = next(v for v in VIDEOS if len(v.objects) == 2)
    blended = video.frames.copy()
    a, b = (np.array(COLORS[o.color]) for o in video.objects)
    for o in video.objects:  # each sprite's pixels take the mean of the two colours
        mask = (np.abs(video.frames.astype(int) - np.array(COLORS[o.color])).sum(-1) <= 90)
        blended[mask] = ((a + b) // 2).astype(np.uint8)
    report = prompt_following(blended, video.prompt)
    assert report["all_present"] < 0.05
    # one sprite erased: the other is present throughout, both never
    first, second = (o.color for o in video.objects)
    erased = video.frames.copy()
    erased[(np.abs(video.frames.astype(int) - np.array(COLORS[second])).sum(-1) <= 90)] = 0
    report = prompt_following(erased, video.prompt)
    assert report["colour_present"][first] > 0.9 and report["colour_present"][second] < 0.05
    assert report["all_present"] < 0.05


def test_a_blurred_video_has_less_edge_energy():
    frames = VIDEOS[0].frames.astype(np.float64)
    blurred = (frames + np.roll(frames, 1, 1) + np.roll(frames, -1, 1) + np.roll(frames, 1, 2)
               + np.roll(frames, -1, 2)) / 5
    assert edge_energy(blurred) < 0.8 * edge_energy(frames)


@pytest.mark.parametrize("prompt", ["a red dog moving left", "a red circle", "a purple square moving up",
                                    "a red circle moving left or a blue square moving up"])
def test_prompts_outside_the_grammar_are_one_line_errors(prompt):
    with pytest.raises(ValueError, match="sprite grammar") as info:
        parse_prompt(prompt)
    assert "\n" not in str(info.value)
