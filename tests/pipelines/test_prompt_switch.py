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


def live_slots(pipe) -> dict:
    """{(frame, position): (count, key row, value row)} of the live slots of the first conditional layer."""
    cache = get_store(pipe.transformer).caches["cond"][0]
    n = cache.length
    frames, pos, count = (cache.frame_index[:n].tolist(), cache.token_pos[:n].tolist(), cache.token_count[:n].tolist())
    return {(f, p): (c, cache.k[0, i].clone(), cache.v[0, i].clone())
            for i, (f, p, c) in enumerate(zip(frames, pos, count)) if c > 0}


# merging keepers at a threshold low enough that the tiny model's keys merge
MERGING = [("tempcache", dict(sink_frames=1, budget_frames=8, threshold=0.3)), ("fastar", dict(threshold=0.3))]


@pytest.mark.parametrize("method,kwargs", MERGING)
def test_merging_recache_equals_second_prompt_with_forced_history(setup, method, kwargs):
    """Within the budget (every frame so far among the newest ``budget - sinks``), a merging keeper's re-cache
    rebuilds the cache from the held frames' latents through its merges: the rollout then equals the second
    prompt's with its history forced to the first prompt's latents (merges made under the second prompt)."""
    pipe, first, second = setup
    genkv.apply_genkv(pipe, method, **kwargs)
    frames, switch = 4 * CHUNK, 2 * CHUNK
    ref1, ref2 = forced_reference(pipe, first, second, frames, switch)
    assert all(layer["merged_groups"] > 0 for layer in genkv.cache_stats(pipe)["layers"])  # the merges ran
    out = torch.cat(run(pipe, first, frames, prompt_switches=[(switch, second)]), dim=2)
    assert pipe.last_recached_frames == list(range(switch))
    torch.testing.assert_close(out[:, :, :switch], ref1[:, :, :switch], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, switch:], ref2[:, :, switch:], rtol=1e-5, atol=1e-5)
    kept = torch.cat(run(pipe, first, frames, prompt_switches=[(switch, second)], recache=False), dim=2)
    assert (kept[:, :, switch:] - ref2[:, :, switch:]).abs().max() > 1e-4  # keeping the cache differs


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_merging_recache_refills_its_own_buffers_and_equals_forced_history_quantized(setup, kv_dtype):
    """A fixed-layout cache is emptied in place for the re-cache (no second allocation: at Wan shapes that copy
    and the run-by-run growth after it cost 11 GiB of peak), and the result is still the forced-history one."""
    pipe, first, second = setup
    genkv.apply_genkv(pipe, "fastar", threshold=0.3, kv_dtype=kv_dtype)
    frames, switch = 4 * CHUNK, 2 * CHUNK
    _, ref2 = forced_reference(pipe, first, second, frames, switch)
    store = get_store(pipe.transformer)
    addresses = []
    on = lambda x0: addresses.append(store.caches["cond"][0].buffer_address())  # noqa: E731
    out = torch.cat(run(pipe, first, frames, prompt_switches=[(switch, second)], on_denoised=on), dim=2)
    assert pipe.last_recached_frames == list(range(switch))
    assert len(set(addresses[1:])) == 1  # the same buffers before and after the switch
    torch.testing.assert_close(out[:, :, switch:], ref2[:, :, switch:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_dtype", ["bf16", "int4"])
def test_emptying_in_place_equals_a_fresh_allocation(setup, kv_dtype, monkeypatch):
    """After evictions (the re-cache holds fewer tokens than the cache did), the emptied buffers must read as new
    ones: routing pools whole key blocks, empty slots included, so a stale key left in one would move it."""
    from genkv.cache import KVCacheStore

    pipe, first, second = setup
    genkv.apply_genkv(pipe, "fastar", threshold=0.3, sink_frames=1, budget_frames=4, top_k=1, kv_dtype=kv_dtype)
    frames, switch = 7 * CHUNK, 5 * CHUNK
    out = torch.cat(run(pipe, first, frames, prompt_switches=[(switch, second)]), dim=2)
    monkeypatch.setattr(KVCacheStore, "empty_caches", KVCacheStore.reset)  # new buffers, as a new video gets
    fresh = torch.cat(run(pipe, first, frames, prompt_switches=[(switch, second)]), dim=2)
    assert pipe.last_recached_frames == [0, switch - 3, switch - 2, switch - 1]
    torch.testing.assert_close(out, fresh, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8", "int4"])
def test_empty_caches_leaves_what_a_new_allocation_holds(setup, kv_dtype):
    from genkv.cache import EMPTY_FRAME
    from genkv.kernels.quant_kv import code_fields

    pipe, first, _ = setup
    genkv.apply_genkv(pipe, "fastar", threshold=0.3, kv_dtype=kv_dtype)
    run(pipe, first, 3 * CHUNK)
    store = get_store(pipe.transformer)
    caches = [c for layers in store.caches.values() for c in layers]
    buffers = [c.buffer_address() for c in caches]
    assert all(int((c.token_count > 0).sum()) > 0 for c in caches)  # something to empty
    store.empty_caches()
    assert [c.buffer_address() for c in store.caches["cond"] + store.caches.get("uncond", [])] == buffers
    for cache in caches:
        assert (cache.frame_index == EMPTY_FRAME).all() and (cache.token_pos == -1).all()
        assert (cache.token_count == 0).all() and cache.tokens_seen == 0 and cache.staged == 0
        if cache.quant is None:
            assert not cache.k.any() and not cache.v.any()
        else:
            k_codes, k_scale, v_codes, v_scale, *v_zero = code_fields(cache.quant.codes)
            assert (k_codes == (0x88 if kv_dtype == "int4" else 0)).all() and not v_codes.any()
            assert (k_scale == 1).all() and (v_scale == 1).all() and all(not z.any() for z in v_zero)
            assert not cache.quant.smoothing_set


def test_merging_recache_is_bounded_to_sinks_and_the_newest_frames(setup):
    pipe, first, second = setup
    genkv.apply_genkv(pipe, "tempcache", sink_frames=1, budget_frames=4, threshold=0.3)  # 1 sink + 3 newest
    frames, switch = 6 * CHUNK, 5 * CHUNK
    rings, after = [], {}
    store = get_store(pipe.transformer)

    def on(x0):
        rings.append(sorted(pipe._recache_ring))
        if store.chunk.frame_start == switch:  # after the re-cache, before this chunk commits
            after.update(live_slots(pipe))

    out = torch.cat(run(pipe, first, frames, prompt_switches=[(switch, second)], on_denoised=on), dim=2)
    assert pipe.last_recached_frames == [0, switch - 3, switch - 2, switch - 1]
    assert max(len(r) for r in rings) <= 4
    assert {f for f, _ in after} <= {0, switch - 3, switch - 2, switch - 1}  # nothing older survives
    assert {f for f, _ in after} >= {0, switch - 1}
    kept = torch.cat(run(pipe, first, frames, prompt_switches=[(switch, second)], recache=False), dim=2)
    assert (out[:, :, switch:] - kept[:, :, switch:]).abs().max() > 1e-4
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method,kwargs", MERGING)
def test_merging_flush_keeps_the_sinks_and_the_newest_frames_groups_as_they_were(setup, method, kwargs,
                                                                                   monkeypatch):
    pipe, first, second = setup
    genkv.apply_genkv(pipe, method, **kwargs)
    frames, switch = 4 * CHUNK, 2 * CHUNK
    store = get_store(pipe.transformer)
    before = {}
    flush = store.keeper.flush

    def snapshot_then_flush(caches):  # the cache as the switch finds it
        before.update(live_slots(pipe))
        flush(caches)

    monkeypatch.setattr(store.keeper, "flush", snapshot_then_flush)
    after = {}
    on = lambda x0: after.update(live_slots(pipe)) if store.chunk.frame_start == switch else None  # noqa: E731
    out = torch.cat(run(pipe, first, frames, prompt_switches=[(switch, second)], recache="flush",
                        on_denoised=on), dim=2)
    sinks = kwargs.get("sink_frames", 1)
    assert any(c > 1 for c, _, _ in before.values())  # merged groups among them
    want = {key: slot for key, slot in before.items() if key[0] < sinks or key[0] == switch - 1}
    assert sorted(after) == sorted(want) and len(want) < len(before)
    assert {f for f, _ in want} == set(range(sinks)) | {switch - 1}
    for key, (count, k, v) in want.items():
        assert after[key][0] == count
        assert torch.equal(after[key][1], k) and torch.equal(after[key][2], v)
    kept = torch.cat(run(pipe, first, frames, prompt_switches=[(switch, second)], recache=False), dim=2)
    assert (out[:, :, switch:] - kept[:, :, switch:]).abs().max() > 1e-4
    assert torch.isfinite(out).all()


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
