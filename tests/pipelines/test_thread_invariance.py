"""What a seed gives whatever ``torch.get_num_threads()``.

genkv's own work (the denoiser, routing, merging, eviction) must give the same latents bit for bit with 1 and 2
threads: a top-k or a merge decision that followed the thread count would change the video, not just its
rounding. The Wan VAE's CPU convolutions are another matter: oneDNN and MKL split their sums by thread count on
some CPUs (AVX-512 hosts: a 64-channel 3-D convolution differs by ~3e-6), which PyTorch does not promise to
avoid, so decoded pixels are held to one uint8 level there.
"""

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
def test_same_seed_same_latents_with_one_or_two_threads(sprites, restore_threads, method):
    genkv.apply_genkv(sprites, method, **SETTINGS[method])
    latents: dict[int, list[torch.Tensor]] = {1: [], 2: []}
    videos = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        # what the decoder is handed, chunk by chunk (before any VAE convolution)
        hook = sprites.vae.post_quant_conv.register_forward_pre_hook(
            lambda module, args, threads=threads: latents[threads].append(args[0].clone()))
        try:
            out = sprites("a red circle moving left", num_frames=25, output_type="uint8",
                          generator=torch.Generator().manual_seed(0))
        finally:
            hook.remove()
        videos[threads] = out.frames.astype(np.int16)
    if method == "fastar":
        assert genkv.cache_stats(sprites)["self_density"] < 1.0  # the routed path really ran
    assert len(latents[1]) == len(latents[2]) > 1
    for one, two in zip(latents[1], latents[2]):
        assert torch.equal(one, two)
    assert videos[1].shape == videos[2].shape
    assert np.abs(videos[1] - videos[2]).max() <= 1
