"""Mp4Writer: chunks of any length, each encoded on its own, join into exactly the frames appended, in order."""

import time

import numpy as np
import pytest

from genkv.video import Mp4Writer, read_frames


@pytest.mark.parametrize("sizes", [(1, 12, 8), (2, 12), (9, 12, 12, 1)])
def test_short_segments_join_without_repeated_frames(tmp_path, sizes):
    """An image-to-video first block is 1 frame, a last chunk may be 1 or 2: with B-frames such a segment had no
    reordering delay while the others had one, and readers filled the gap with repeated frames (21 -> 23)."""
    path = tmp_path / "v.mp4"
    level = iter(range(8, 256, 7))  # each frame one flat grey level: repeats and reordering are visible
    want = []
    with Mp4Writer(path, fps=16) as writer:
        for n in sizes:
            chunk = np.stack([np.full((32, 32, 3), next(level), np.uint8) for _ in range(n)])
            want.extend(chunk[:, 0, 0, 0])
            writer.append(chunk)
            deadline = time.time() + 60
            while writer.frames_written < len(want) and time.time() < deadline:  # each chunk a segment of its own
                time.sleep(0.02)
    got = read_frames(path)
    assert len(got) == sum(sizes)
    np.testing.assert_allclose(got.reshape(len(got), -1).mean(1), want, atol=3)
