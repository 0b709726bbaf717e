"""The procedural sprite generator: determinism, piecewise generation, tracks that match the pixels."""

import numpy as np
import pytest

from genkv.data import COLORS, make_video, vocabulary


def test_same_seed_same_video_and_different_seeds_differ():
    a, b, c = make_video(5, 20), make_video(5, 20), make_video(6, 20)
    assert np.array_equal(a.frames, b.frames) and a.prompt == b.prompt and np.array_equal(a.tracks, b.tracks)
    assert not np.array_equal(a.frames, c.frames)


def test_a_long_video_made_piece_by_piece_equals_one_pass():
    whole = make_video(11, 60)
    later = make_video(11, 25, start=35)
    assert np.array_equal(whole.frames[35:], later.frames) and np.allclose(whole.tracks[35:], later.tracks)


def test_visible_track_centres_show_the_object_colour_and_hidden_ones_do_not():
    checked = hidden = 0
    for seed in range(40):
        video = make_video(seed, 30)
        for t in range(0, 30, 3):
            for i, obj in enumerate(video.objects):
                x, y, visible = video.tracks[t, i]
                pixel = video.frames[t, min(int(y), 63), min(int(x), 63)]
                shows_colour = np.array_equal(pixel, np.array(COLORS[obj.color], dtype=np.uint8))
                assert shows_colour == bool(visible), (seed, t, i)
                checked += 1
                hidden += not visible
    assert checked > 500 and hidden > 0  # occlusions do happen


def test_objects_move_by_their_velocity_and_stay_inside():
    video = make_video(2, 200)
    assert (video.tracks[..., :2] >= 0).all() and (video.tracks[..., :2] <= 64).all()
    step = np.abs(np.diff(video.tracks[:, :, :2], axis=0)).max()
    assert 0 < step <= 2.0 * 2  # at most the speed, twice over a wall reflection


def test_prompt_follows_the_grammar():
    for seed in range(20):
        video = make_video(seed, 2)
        words = video.prompt.split()
        assert set(words) <= set(vocabulary())
        assert video.prompt == " and ".join(f"a {o.color} {o.shape} moving {o.direction}" for o in video.objects)


def test_radius_range_sets_the_sprite_sizes_and_a_bad_range_is_refused():
    radii = [o.radius for seed in range(30) for o in make_video(seed, 1, radius=(0.2, 0.25)).objects]
    assert min(radii) >= 0.2 * 64 and max(radii) <= 0.25 * 64
    big = make_video(7, 1, max_objects=1, radius=(0.24, 0.24))
    colour = np.array(COLORS[big.objects[0].color], dtype=np.uint8)
    area = int((big.frames[0] == colour).all(-1).sum())
    assert area > 0.4 * np.pi * (0.24 * 64) ** 2  # a large sprite covers a large area (triangles: ~41% of the disc)
    with pytest.raises(ValueError, match="radius must be"):
        make_video(0, 1, radius=(0.3, 0.1))


def test_room_frames_starts_every_sprite_where_it_moves_the_asked_way_that_long_and_keeps_the_prompt():
    room, checked, bounced_without = 16, 0, 0
    for seed in range(60):
        plain, roomy = make_video(seed, room + 1, max_objects=2), make_video(seed, room + 1, max_objects=2,
                                                                              room_frames=room)
        # The same draws: prompt, background, looks and speeds; only the start positions move.
        assert roomy.prompt == plain.prompt and roomy.background == plain.background
        for a, b in zip(plain.objects, roomy.objects):
            assert (a.radius, a.vx, a.vy) == (b.radius, b.vx, b.vy)
        for i, obj in enumerate(roomy.objects):
            # Frame to frame, every step over the first `room` frames goes the asked way at full speed: no
            # reflection, which would reverse a component (an independent check: the rendered tracks).
            steps = np.diff(roomy.tracks[:, i, :2], axis=0)
            assert np.allclose(steps, [obj.vx, obj.vy], atol=1e-4), (seed, i, obj.direction)
            checked += 1
            bounced_without += not np.allclose(np.diff(plain.tracks[:, i, :2], axis=0), [obj.vx, obj.vy], atol=1e-4)
    # Uniform starts bounce within those frames often (what room_frames is for), so the check above can fail.
    assert checked > 80 and bounced_without > 10


def test_room_frames_defaults_to_uniform_starts_and_a_negative_room_is_refused():
    from genkv.data import sample_scene

    for seed in range(10):
        a, b = make_video(seed, 12), make_video(seed, 12, room_frames=0)
        assert np.array_equal(a.frames, b.frames)
    with pytest.raises(ValueError, match="room_frames must be >= 0"):
        sample_scene(0, room_frames=-1)
