"""Persistence and flicker measures against the generator's ground truth and exact identities."""

import numpy as np

from genkv.data import COLORS, make_video
from genkv.metrics.persistence import colour_tracks, flicker_per_frame, object_persistence


def test_colour_centroids_follow_the_ground_truth_tracks_of_unoccluded_sprites():
    errors = []
    for seed in range(15):
        video = make_video(seed, 24)
        tracks = colour_tracks(video.frames)
        for i, obj in enumerate(video.objects):
            for t in range(24):
                x, y, _ = video.tracks[t, i]
                # Only frames where no other sprite comes near (an occluder moves the visible centroid).
                near = any(np.hypot(x - video.tracks[t, j, 0], y - video.tracks[t, j, 1])
                           < 2.5 * max(obj.radius, other.radius)
                           for j, other in enumerate(video.objects) if j != i)
                if near:
                    continue
                if obj.shape == "triangle":  # a triangle's centroid is not its bounding circle's centre
                    continue
                cx, cy = tracks[obj.color]["centroid"][t]
                errors.append(np.hypot(cx - x, cy - y))
    assert len(errors) > 100 and np.median(errors) < 0.6 and max(errors) < 1.5


def test_persistence_of_a_ground_truth_video_keeps_every_object_without_breaks():
    video = make_video(4, 64)
    report = object_persistence(video.frames, fps=16)
    assert report["objects_first_second"] == len(video.objects) == report["objects_kept"]
    assert report["track_breaks"] == 0 and report["colour_drift_l1"] < 1e-6


def test_persistence_notices_a_sprite_that_vanishes():
    video = make_video(4, 64)
    frames = video.frames.copy()
    colour = np.array(COLORS[video.objects[0].color], dtype=np.uint8)
    hit = (frames[32:] == colour).all(-1)
    frames[32:][hit] = 30  # paint the first sprite out of the second half
    report = object_persistence(frames, fps=16)
    assert report["objects_kept"] == len(video.objects) - 1


def test_flicker_is_zero_for_a_still_video_and_exact_for_alternating_frames():
    still = np.repeat(make_video(2, 1).frames, 5, axis=0)
    assert np.all(flicker_per_frame(still) == 0)
    a = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    a[1::2] = 10
    assert np.allclose(flicker_per_frame(a), 10.0)
