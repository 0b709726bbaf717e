"""A seed gives the same frames whatever ``torch.get_num_threads()`` (a loaded machine is a thread-count change)."""

import numpy as np
import pytest
import torch

import genkv
from genkv.zoo import load_shipped

SETTINGS = {
    "full": {},
    "tempcache": dict(budget_frames=4, sink_frames=1),
    # small blocks, small top_k and a small budget: the routed path, merging and eviction all run
    "fastar": dict(top_k=2, block_m=64, block_n=64, budget_frames=4, sink_frames=1, prompt_top_k=4),
}


@pytest.fixture(scope="module")
def sprites():
    return load_shipped("sprites-tiny")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_same_seed_same_frames_with_one_or_two_threads(sprites, restore_threads, method):
    genkv.apply_genkv(sprites, method, **SETTINGS[method])
    videos = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = sprites("a red circle moving left", num_frames=25, output_type="uint8",
                      generator=torch.Generator().manual_seed(0))
        videos.append(out.frames)
    if method == "fastar":
        assert genkv.cache_stats(sprites)["self_density"] < 1.0  # the routed path really ran
    assert np.array_equal(videos[0], videos[1])
