"""The defining property of a correct KV cache, and of the rolling window: a chunk-causal rollout through the
cache equals one full-sequence forward with the corresponding block mask (diffusers' own processor)."""

import pytest
import torch

import genkv
from genkv.testing import tiny_self_forcing_pipeline

from .helpers import masked_forward, reference_sampling

CHUNK = 3


def reference_rollout(pipe, embeds, init_noise, seed, allowed):
    """Self-Forcing sampling without a cache, each frame attending to the frames ``allowed`` says."""
    return reference_sampling(
        pipe, init_noise, seed,
        lambda seq, ts, mask_of, tpf: masked_forward(pipe.transformer, seq, ts, embeds, mask_of(allowed), tpf),
    )


def cached_rollout(pipe, embeds, init_noise, seed):
    gen = torch.Generator().manual_seed(seed)
    h, w = init_noise.shape[3] * 8, init_noise.shape[4] * 8
    chunks = pipe.rollout(embeds, init_noise.shape[2], h, w, generator=gen, latents=init_noise)
    return torch.cat(list(chunks), dim=2)


@pytest.fixture(scope="module")
def setup():
    pipe = tiny_self_forcing_pipeline(seed=1)
    embeds = pipe.encode_prompt("a red circle bouncing left")
    noise = torch.randn(1, 16, 4 * CHUNK, 4, 4, generator=torch.Generator().manual_seed(5))
    return pipe, embeds, noise


def test_full_cache_equals_block_causal_forward(setup):
    pipe, embeds, noise = setup
    genkv.apply_genkv(pipe, "full")
    got = cached_rollout(pipe, embeds, noise, seed=3)
    want = reference_rollout(pipe, embeds, noise, 3, lambda q, k: k // CHUNK <= q // CHUNK)
    assert got.shape == want.shape == noise.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # A cache that leaked the current chunk across steps or skipped the clean pass would differ by far more.
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("sink,window", [(0, 6), (1, 6), (3, 9), (2, 3)])
def test_rolling_equals_windowed_block_causal_forward(setup, sink, window):
    pipe, embeds, noise = setup
    genkv.apply_genkv(pipe, "rolling", sink_frames=sink, window_frames=window)

    def allowed(qf, kf):
        end = (qf // CHUNK + 1) * CHUNK  # a chunk's window ends with its own last frame
        return kf < end and (kf < sink or kf >= end - window)

    got = cached_rollout(pipe, embeds, noise, seed=4)
    want = reference_rollout(pipe, embeds, noise, 4, allowed)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_rolling_with_window_covering_video_equals_full(setup):
    pipe, embeds, noise = setup
    genkv.apply_genkv(pipe, "full")
    full = cached_rollout(pipe, embeds, noise, seed=6)
    genkv.apply_genkv(pipe, "rolling", sink_frames=1, window_frames=noise.shape[2])
    rolling = cached_rollout(pipe, embeds, noise, seed=6)
    torch.testing.assert_close(rolling, full, rtol=1e-5, atol=1e-6)


def test_rolling_memory_is_flat_once_the_window_fills(setup):
    pipe, embeds, _ = setup
    genkv.apply_genkv(pipe, "rolling", sink_frames=1, window_frames=6)
    seen = []
    gen = torch.Generator().manual_seed(0)
    for _ in pipe.rollout(embeds, 60, 32, 32, generator=gen):
        stats = genkv.cache_stats(pipe)
        seen.append((stats["tokens"], stats["bytes"]))
    tokens_per_layer = (1 + 6 - CHUNK) * 4  # sink + window history frames, 4 tokens per 32x32 frame
    assert seen[-1][0] == tokens_per_layer * 2  # 2 layers
    steady = seen[2:]
    assert len(set(steady)) == 1, seen
    assert genkv.cache_stats(pipe)["tokens_seen"] == 60 * 4 * 2


def test_rebasing_positions_keeps_the_rollout_when_no_sink(setup):
    """Re-basing rotates window keys and later positions by the same amount: attention is unchanged."""
    pipe, embeds, noise = setup
    long_noise = torch.randn(1, 16, 8 * CHUNK, 4, 4, generator=torch.Generator().manual_seed(8))
    genkv.apply_genkv(pipe, "rolling", window_frames=6, rebase_positions=False)
    plain = cached_rollout(pipe, embeds, long_noise, seed=2)
    genkv.apply_genkv(pipe, "rolling", window_frames=6, max_position=9)
    rebased = cached_rollout(pipe, embeds, long_noise, seed=2)
    assert genkv.cache_stats(pipe)["position_shift"] > 0
    torch.testing.assert_close(rebased, plain, rtol=1e-4, atol=1e-5)


def test_rollout_past_the_rope_table_does_not_crash():
    pipe = tiny_self_forcing_pipeline(seed=0)
    pipe.transformer.rope.freqs_cos = pipe.transformer.rope.freqs_cos[:8]  # pretend an 8-frame table
    pipe.transformer.rope.freqs_sin = pipe.transformer.rope.freqs_sin[:8]
    genkv.apply_genkv(pipe, "rolling", sink_frames=1, window_frames=6, max_position=8)
    frames = sum(f.shape[0] for f in pipe.stream("a square", num_frames=97, height=32, width=32))
    assert frames == 97
    assert genkv.cache_stats(pipe)["position_shift"] > 0
