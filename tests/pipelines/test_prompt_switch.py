"""Prompt switching mid-stream (issue 21 part 3): LongLive's KV re-cache (``recache=True``), keeping the cache
(``recache=False``) and infinity-RoPE's KV flush (``recache="flush"``)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import genkv
from genkv.api import get_store
from genkv.testing import tiny_self_forcing_pipeline

CHUNK = 3
H = W = 32  # 4x4 latents, 4 tokens per frame
TPF = 4


@pytest.fixture(scope="module")
def setup():
    pipe = tiny_self_forcing_pipeline(seed=1)
    first = pipe.encode_prompt("a red circle bouncing left")
    second = pipe.encode_prompt("a blue square falls down fast")
    return pipe, first, second


def _noise(frames):
    return torch.randn(1, 16, frames, 4, 4, generator=torch.Generator().manual_seed(3))


def run(pipe, embeds, frames, **kw):
    return list(pipe.rollout(embeds, frames, H, W, generator=torch.Generator().manual_seed(0),
                             latents=_noise(frames), **kw))


def forced_reference(pipe, first, second, frames, switch):
    """The second prompt from the start, its history before ``switch`` forced to the first prompt's latents."""
    ref1 = torch.cat(run(pipe, first, frames), dim=2)
    force = lambda start, x0: ref1[:, :, start:start + x0.shape[2]] if start < switch else x0  # noqa: E731
    return ref1, torch.cat(run(pipe, second, frames, commit_latents=force), dim=2)


def held(pipe):
    cache = get_store(pipe.transformer).caches["cond"][0]
    return sorted(set(np.unique(cache.frame_host[: cache.length]).tolist()))


@pytest.mark.parametrize("switch", [CHUNK, 2 * CHUNK])
def test_full_recache_equals_second_prompt_with_forced_history(setup, switch):
    pipe, first, second = setup
    genkv.apply_genkv(pipe, "full")
    frames = 4 * CHUNK
    ref1, ref2 = forced_reference(pipe, first, second, frames, switch)
    out = torch.cat(run(pipe, first, frames, prompt_switches=[(switch, second)]), dim=2)
    assert pipe.last_recached_frames == list(range(switch))
    torch.testing.assert_close(out[:, :, :switch], ref1[:, :, :switch], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, switch:], ref2[:, :, switch:], rtol=1e-5, atol=1e-5)
    assert (out[:, :, switch:] - ref1[:, :, switch:]).abs().max() > 1e-3  # the switch changed the video


def test_recache_false_keeps_self_attention_and_uses_the_new_prompt(setup):
    pipe, first, second = setup
    genkv.apply_genkv(pipe, "full")
    frames, switch = 3 * CHUNK, CHUNK
    ref1, ref2 = forced_reference(pipe, first, second, frames, switch)
    kept = torch.cat(run(pipe, first, frames, prompt_switches=[(switch, second)], recache=False), dim=2)
    torch.testing.assert_close(kept[:, :, :switch], ref1[:, :, :switch], rtol=0, atol=0)
    assert (kept[:, :, switch:] - ref1[:, :, switch:]).abs().max() > 1e-3  # cross-attention: the new prompt
    assert (kept[:, :, switch:] - ref2[:, :, switch:]).abs().max() > 1e-4  # differs from the re-cache
    # The first chunk after the switch: the first prompt's cache (as a no-switch rollout has it) with the second
    # prompt's cross-attention, i.e. the second prompt over a history whose K/V were made under the first.
    store = get_store(pipe.transformer)
    assert store.stats()["frames_committed"] == frames


@pytest.mark.parametrize("method,kwargs,expect", [("full", {}, [CHUNK - 1]),
                                                  ("rolling", dict(sink_frames=1, window_frames=9), [0, CHUNK - 1])])
def test_flush_keeps_only_sinks_and_the_newest_frame(setup, method, kwargs, expect):
    pipe, first, second = setup
    genkv.apply_genkv(pipe, method, **kwargs)
    seen = []
    store = get_store(pipe.transformer)
    on = lambda x0: seen.append((store.chunk.frame_start, held(pipe)))  # noqa: E731  (before the chunk commits)
    out = run(pipe, first, 3 * CHUNK, prompt_switches=[(CHUNK, second)], recache="flush", on_denoised=on)
    assert seen[0] == (0, [])
    assert seen[1] == (CHUNK, expect)  # right after the switch
    assert seen[2] == (2 * CHUNK, expect + list(range(CHUNK, 2 * CHUNK)))
    assert torch.isfinite(torch.cat(out, dim=2)).all()


def test_rolling_recache_is_bounded_and_equals_forced_history(setup):
    pipe, first, second = setup
    genkv.apply_genkv(pipe, "rolling", sink_frames=1, window_frames=9)  # history: 1 + 6 frames
    frames, switch = 6 * CHUNK, 2 * CHUNK  # the switch comes before any eviction: the window holds 0..5
    ref1, ref2 = forced_reference(pipe, first, second, frames, switch)
    rings, tokens = [], []

    def on(x0):
        rings.append(sorted(pipe._recache_ring))
        tokens.append(genkv.cache_stats(pipe)["tokens"])

    out = torch.cat(run(pipe, first, frames, prompt_switches=[(switch, second)], on_denoised=on), dim=2)
    torch.testing.assert_close(out[:, :, switch:], ref2[:, :, switch:], rtol=1e-5, atol=1e-5)
    assert pipe.last_recached_frames == list(range(switch))
    assert max(len(r) for r in rings) <= 7 and max(tokens) <= 7 * TPF * 2
    assert rings[-1] == [0] + list(range(frames - CHUNK - 6, frames - CHUNK))  # sink + window only
    # A later switch, after eviction: the sink and the window's frames are re-cached (in their blocks).
    run(pipe, first, frames, prompt_switches=[(switch, second), (4 * CHUNK, first)])
    assert pipe.last_recached_frames == [0] + list(range(4 * CHUNK - 6, 4 * CHUNK))


@pytest.mark.parametrize("method,kwargs", [("tempcache", dict(sink_frames=1, budget_frames=8)), ("fastar", {})])
@pytest.mark.parametrize("recache", [True, "flush"])
def test_merging_methods_fall_back_to_keeping_the_cache(setup, method, kwargs, recache):
    pipe, first, second = setup
    genkv.apply_genkv(pipe, method, **kwargs)
    frames = 4 * CHUNK
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.cat(run(pipe, first, frames, prompt_switches=[(2 * CHUNK, second)], recache=recache), dim=2)
    notes = [str(w.message) for w in caught if str(w.message).startswith("genkv: recache")]
    assert len(notes) == 1 and method in notes[0] and "\n" not in notes[0]
    kept = torch.cat(run(pipe, first, frames, prompt_switches=[(2 * CHUNK, second)], recache=False), dim=2)
    torch.testing.assert_close(out, kept, rtol=0, atol=0)
    plain = torch.cat(run(pipe, first, frames), dim=2)
    assert (out[:, :, 2 * CHUNK:] - plain[:, :, 2 * CHUNK:]).abs().max() > 1e-3


def test_graph_signature_changes_at_a_switch(setup):
    """CUDA graphs key on the store's signature: a switch gives the next forwards another one (no stale replay)."""
    pipe, first, second = setup
    genkv.apply_genkv(pipe, "fastar")
    store = get_store(pipe.transformer)
    sigs = {}
    on = lambda x0: sigs.setdefault(store.chunk.frame_start, store.graph_signature())  # noqa: E731
    run(pipe, first, 4 * CHUNK, prompt_switches=[(2 * CHUNK, second)], recache=False, on_denoised=on)
    assert sigs[CHUNK] is not None and sigs[2 * CHUNK] is not None
    assert sigs[CHUNK][0] == sigs[2 * CHUNK][0]  # same fixed layout...
    assert sigs[CHUNK][1] != sigs[2 * CHUNK][1]  # ...but another prompt version
    assert sigs[2 * CHUNK] == sigs[3 * CHUNK]


def _one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_rounding_note_and_bad_inputs(setup):
    pipe, first, second = setup
    genkv.apply_genkv(pipe, "full")
    call = lambda switches, prompt="a red circle", **kw: pipe(  # noqa: E731
        prompt, num_frames=33, height=H, width=W, output_type="latent", prompt_switches=switches,
        generator=torch.Generator().manual_seed(0), **kw).frames
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exact = call([(9, "a blue square")])
    assert not [w for w in caught if "genkv:" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moved = call([(5, "a blue square")])  # latent 2: applied from the chunk at latent 3 (frame 9)
    notes = [str(w.message) for w in caught if str(w.message).startswith("genkv:")]
    assert len(notes) == 1 and "5 -> 9" in notes[0]
    torch.testing.assert_close(moved, exact, rtol=0, atol=0)
    _one_line_error(lambda: call([(0, "b")]), "> 0")
    _one_line_error(lambda: call([(-4, "b")]), "> 0")
    _one_line_error(lambda: call([(21, "b"), (9, "c")]), "strictly increasing")
    _one_line_error(lambda: call([(9, "b"), (9, "c")]), "strictly increasing")
    _one_line_error(lambda: call([(33, "b")]), "beyond")
    _one_line_error(lambda: call([(25, "b")]), "no chunk starts")
    _one_line_error(lambda: call([(10, "b"), (12, "c")]), "same chunk boundary")
    _one_line_error(lambda: call([(9, "b")], prompt=["a", "b"]), "not a list of prompts")
    _one_line_error(lambda: call([(9, "b")], recache="yes"), "recache must be")
    _one_line_error(lambda: list(pipe.rollout(first, 9, H, W, prompt_switches=[(4, second)])), "not a generated")
