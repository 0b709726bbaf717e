"""Rolling re-base with sink frames against a reference that never re-bases a key.

What re-basing means (genkv.keep.rolling.SinkWindow): keys keep the RoPE position they were committed with until
the next chunk would pass ``max_position``; then every non-sink key moves back so the oldest frame the chunk
sees after the sinks sits right after them (position ``sink_frames``), sinks stay where they are, and later
chunks are numbered from there. With sinks this *changes* what attention sees (the sinks come closer), so the
property is not "equals no re-basing" but "equals attention with those explicit positions".

The reference has no cache and rotates nothing: each chunk's forward runs over all frames so far with the
windowed block mask, in float64, with every token's position computed in the test from the rule above and read
directly from the model's RoPE table (all positions stay inside it). Each chunk's query rows use the positions
of *its* time (the shift in force when that chunk was generated), since that is when its K/V were made.
"""

import pytest
import torch

import genkv
from genkv.testing import tiny_self_forcing_pipeline

from .float64_reference import QueryGroup, ReferenceSelfAttention, forward_with

CHUNK = 3


def shifts(num_chunks, sink, window, max_position):
    """Frames subtracted from non-sink positions while each chunk is generated (the documented rule)."""
    shift, out = 0, []
    for c in range(num_chunks):
        start = c * CHUNK
        if start - shift + CHUNK > max_position:
            oldest = max(sink, start - (window - CHUNK))  # oldest non-sink frame this chunk attends to
            shift = max(shift, oldest - sink)
        out.append(shift)
    return out


def reference_rollout(pipe, embeds, init_noise, seed, sink, window, max_position):
    transformer, sched = pipe.transformer, pipe.scheduler
    rows_h, cols_w = init_noise.shape[3] // 2, init_noise.shape[4] // 2
    tpf = rows_h * cols_w
    num_chunks = init_noise.shape[2] // CHUNK
    shift_of = shifts(num_chunks, sink, window, max_position)
    gen = torch.Generator().manual_seed(seed)
    clean = []
    for c in range(num_chunks):
        start = c * CHUNK
        x = init_noise[:, :, start : start + CHUNK]
        n = start + CHUNK
        frame = torch.arange(n).repeat_interleave(tpf)
        h_pos = (torch.arange(tpf) // cols_w).repeat(n)
        w_pos = (torch.arange(tpf) % cols_w).repeat(n)
        end = (frame // CHUNK + 1) * CHUNK  # each query's window ends with its own chunk's last frame
        kf = frame[None, :]
        mask = (kf < end[:, None]) & ((kf < sink) | (kf >= end[:, None] - window))
        groups = []
        for cc in range(c + 1):
            rows = torch.nonzero(frame // CHUNK == cc).flatten()
            s = shift_of[cc]
            key_t = torch.where(frame < sink, frame, frame - s)
            seen = mask[rows].any(0)  # frames this chunk attends to; evicted ones get any valid position
            assert int(key_t[seen].min()) >= 0
            key_t = key_t.clamp(min=0)
            groups.append(QueryGroup(rows, frame[rows] - s, key_t))
            assert int((frame[rows] - s).max()) < max_position  # the chunk is inside the allowed positions
        proc = ReferenceSelfAttention(transformer.rope, groups, h_pos, w_pos, mask)
        for k, (t, sigma) in enumerate(zip(sched.timesteps, sched.sigmas)):
            seq = torch.cat(clean + [x], dim=2)
            ts = torch.cat([torch.zeros(start), torch.full((CHUNK,), float(t))])
            flow = forward_with(transformer, seq, ts, embeds, tpf, proc)[:, :, start:]
            x0 = sched.predict_x0(x, flow, float(sigma))
            if k + 1 < len(sched):
                x = sched.add_noise(x0, torch.randn(x.shape, generator=gen), float(sched.sigmas[k + 1]))
        clean.append(x0)
    return torch.cat(clean, dim=2), shift_of


@pytest.fixture(scope="module")
def setup():
    pipe = tiny_self_forcing_pipeline(seed=3)
    embeds = pipe.encode_prompt("a blue square drifting")
    noise = torch.randn(1, 16, 6 * CHUNK, 4, 4, generator=torch.Generator().manual_seed(12))
    return pipe, embeds, noise


@pytest.mark.parametrize("sink,window,max_position", [(1, 6, 9), (2, 6, 8), (3, 9, 13)])
def test_rolling_rebase_with_sinks_equals_explicit_position_reference(setup, sink, window, max_position):
    pipe, embeds, noise = setup
    genkv.apply_genkv(pipe, "rolling", sink_frames=sink, window_frames=window, max_position=max_position)
    gen = torch.Generator().manual_seed(7)
    got = torch.cat(list(pipe.rollout(embeds, noise.shape[2], 32, 32, generator=gen, latents=noise)), dim=2)
    want, shift_of = reference_rollout(pipe, embeds, noise, 7, sink, window, max_position)
    shift = genkv.cache_stats(pipe)["position_shift"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert shift_of[-1] > 0 and shift == shift_of[-1]


def test_the_explicit_position_reference_is_the_block_causal_forward_without_rebasing(setup):
    """Sanity of the reference itself: with no shift it is diffusers' masked forward (tests/core/helpers)."""
    from .helpers import frame_mask, masked_forward

    pipe, embeds, noise = setup
    genkv.apply_genkv(pipe, "full")
    seq, tpf = noise[:, :, : 2 * CHUNK], 4
    ts = torch.tensor([0.0] * CHUNK + [500.0] * CHUNK)
    frame = torch.arange(2 * CHUNK).repeat_interleave(tpf)
    mask = frame[None, :] // CHUNK <= frame[:, None] // CHUNK
    groups = [QueryGroup(torch.arange(frame.numel()), frame, frame)]
    pos = torch.arange(tpf)
    proc = ReferenceSelfAttention(pipe.transformer.rope, groups, (pos // 2).repeat(2 * CHUNK), (pos % 2).repeat(2 * CHUNK),
                                  mask)
    got = forward_with(pipe.transformer, seq, ts, embeds, tpf, proc)
    want = masked_forward(pipe.transformer, seq, ts, embeds, frame_mask(2 * CHUNK, tpf, lambda q, k: k // CHUNK <= q // CHUNK), tpf)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
