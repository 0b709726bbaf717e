"""A new video frees the last video's KV cache at once, not whenever Python's garbage collector runs.

A fixed-layout cache (``tempcache``, ``fastar``) keeps every layer's buffers as slices of one ``LayerStack``, and
the stack and its layers refer to each other. Clearing the store's dict alone left that cycle, and with it a whole
cache (5.6 GiB at Wan2.1-1.3B shapes), allocated into the next video until a gc pass: on an H200 a timed video
after a warm-up one peaked at 22.5 GiB against 16.8 alone, the difference one cache. These tests run with the
collector off, so only reference counting frees.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import genkv
from genkv.api import get_store
from genkv.testing import tiny_self_forcing_pipeline

H = W = 32  # 4x4 latents


@pytest.fixture(scope="module")
def setup():
    pipe = tiny_self_forcing_pipeline(seed=1)
    return pipe, pipe.encode_prompt("a red circle moving left")


def _render(pipe, embeds, frames: int = 9) -> None:
    for _ in pipe.rollout(embeds, frames, H, W, generator=torch.Generator().manual_seed(0)):
        pass


def _buffers(pipe) -> list[weakref.ref]:
    """Weak references to every tensor the store's layer caches hold (K/V or codes, and the slot records)."""
    refs = []
    for layers in get_store(pipe.transformer).caches.values():
        for cache in layers:
            held = [cache.k, cache.v, cache.frame_index, cache.token_pos, cache.token_count]
            if cache.quant is not None and cache.quant.codes is not None:
                held += [t for t in vars(cache.quant.codes).values() if isinstance(t, torch.Tensor)]
            if cache.stack is not None:
                held += [cache.stack.k, cache.stack.v, cache.stack.frame_index]
            refs += [weakref.ref(t) for t in held if isinstance(t, torch.Tensor)]
    return refs


@pytest.mark.parametrize("method,fields", [("fastar", dict(budget_frames=3, sink_frames=1)),
                                           ("tempcache", dict(budget_frames=3)),
                                           ("fastar", dict(budget_frames=3, kv_dtype="int4")),
                                           ("rolling", dict(window_frames=3)), ("full", {})])
@pytest.mark.parametrize("how", ["next_video", "remove"])
def test_the_last_videos_cache_is_freed_without_the_garbage_collector(setup, method, fields, how):
    pipe, embeds = setup
    genkv.apply_genkv(pipe, method, **fields)
    _render(pipe, embeds)
    refs = _buffers(pipe)
    assert len(refs) >= 5 and all(r() is not None for r in refs)  # the cache stays after the video (cache_stats)
    gc.collect()
    gc.disable()
    try:
        if how == "next_video":
            # the next video's first step resets the store; its own cache is allocated after that
            get_store(pipe.transformer).reset()
        else:
            genkv.remove_genkv(pipe)
        alive = sum(r() is not None for r in refs)
    finally:
        gc.enable()
    assert alive == 0, f"{alive} of {len(refs)} cache tensors still allocated after {how}"
    genkv.remove_genkv(pipe)


def test_a_second_video_equals_the_first_after_the_release(setup):
    """Freeing the buffers eagerly must not change what the next video computes (same seed, same output)."""
    pipe, embeds = setup
    genkv.apply_genkv(pipe, "fastar", budget_frames=3, sink_frames=1)
    first = torch.cat(list(pipe.rollout(embeds, 15, H, W, generator=torch.Generator().manual_seed(0))), dim=2)
    second = torch.cat(list(pipe.rollout(embeds, 15, H, W, generator=torch.Generator().manual_seed(0))), dim=2)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    genkv.remove_genkv(pipe)


def test_emptying_in_place_keeps_the_stack(setup):
    """A prompt switch's re-cache empties a fixed layout in its own buffers (``empty_caches``): the layers must
    stay slices of their one stack (the stacked commit), at the same addresses (recorded CUDA graphs read them)."""
    pipe, embeds = setup
    genkv.apply_genkv(pipe, "fastar", budget_frames=3, sink_frames=1)
    _render(pipe, embeds)
    store = get_store(pipe.transformer)
    layers = store.caches["cond"]
    stack, addresses = layers[0].stack, [cache.buffer_address() for cache in layers]
    store.empty_caches()
    assert store.caches["cond"] is layers and stack is not None and stack.layers == layers
    assert all(cache.stack is stack for cache in layers)
    assert [cache.buffer_address() for cache in layers] == addresses
    genkv.remove_genkv(pipe)
