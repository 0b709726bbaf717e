"""CUDA graphs of a chunk's forwards: which forwards may share a graph, and that nothing falls back silently.

The signatures (which forwards take the same path through the readers) are checked on any device; recording
and replaying need CUDA, so those tests run on the GPU machine (``TRITON_INTERPRET=0 pytest -k graph``) and
are skipped elsewhere.
"""

import numpy as np
import pytest
import torch

import genkv
from genkv.testing import tiny_self_forcing_pipeline

BLOCKS = dict(block_m=16, block_n=16)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="recording CUDA graphs needs a CUDA device")


def _signatures(pipe, prompt: str, num_frames: int) -> list[tuple]:
    """(latent frame of the chunk, step, signature) of every transformer forward of a render."""
    store = genkv.get_store(pipe)
    seen = []
    flow_at = pipe._flow_at

    def recording(*args, **kwargs):
        seen.append((store.chunk.frame_start, store.step_index, store.graph_signature()))
        return flow_at(*args, **kwargs)

    pipe._flow_at = recording
    for _ in pipe.stream(prompt, num_frames=num_frames, generator=torch.Generator().manual_seed(0)):
        pass
    return seen


def test_a_fixed_layout_method_runs_a_whole_video_on_two_signatures():
    """fastar keeps one cache layout for the whole video: past the video's first forward (it allocates the
    caches and projects the prompt), every chunk's routing forward shares one signature and every routed
    forward (steps 2-4 and the clean pass) another, so two graphs serve every chunk."""
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=3), "fastar", top_k=2, prompt_top_k=2, **BLOCKS)
    seen = _signatures(pipe, "a red circle", 45)  # 4 chunks x (4 steps + clean pass)
    assert len(seen) == 20
    assert seen[0][2] is None
    routing = {row[2] for row in seen[5::5]}
    routed = {row[2] for i, row in enumerate(seen) if i % 5}
    assert len(routing) == 1 and len(routed) == 1 and None not in routing | routed
    assert ("route",) in next(iter(routing)) and ("routed",) in next(iter(routed))


def test_a_growing_cache_gets_new_signatures_every_chunk_and_dense_steps_their_own():
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=3), "annsa", top_k=2, dense_steps=2, **BLOCKS)
    seen = _signatures(pipe, "a red circle", 33)
    assert seen[0][2] is None  # the video's first forward allocates the caches and projects the prompt
    rows = seen[5:10]  # the second chunk: dense (grows the cache), dense, routing, routed, routed clean pass
    dense, routing, routed = rows[1][2], rows[2][2], rows[3][2]
    assert rows[0][2] is None and dense is not None
    assert routing is not None and len({dense, routing, routed}) == 3 and rows[4][2] == routed
    # the full cache grew by a chunk: its layout (first element) and so every signature of chunk 3 is new
    assert seen[10][2] is None and seen[11][2][0] != dense[0]
    assert not {row[2] for row in seen[11:15]} & {row[2] for row in rows}


def test_with_guidance_both_branches_are_ready_after_the_videos_first_forward():
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=3), "fastar", top_k=2, prompt_top_k=2, **BLOCKS)
    store = genkv.get_store(pipe)
    seen = []
    flow_at = pipe._flow_at

    def recording(*args, **kwargs):
        seen.append(store.graph_signature())
        out = flow_at(*args, **kwargs)
        seen[-1] = (seen[-1], sorted(store.caches))  # the branches whose caches this forward wrote
        return out

    pipe._flow_at = recording
    list(pipe.stream("a red circle", num_frames=33, guidance_scale=3.0, generator=torch.Generator().manual_seed(0)))
    assert all(branches == ["cond", "uncond"] for _, branches in seen)
    signatures = [signature for signature, _ in seen]
    assert signatures[0] is None and None not in signatures[1:] and len(set(signatures[1:])) == 2
    assert {branch for branch, *_ in signatures[1][0]} == {"cond", "uncond"}  # both branches' layouts


def test_replayed_redoes_the_staging_bookkeeping():
    """A replayed forward runs no Python: the store marks the chunk staged in every layer, as stage() does."""
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=3), "fastar", top_k=2, prompt_top_k=2, **BLOCKS)
    store = genkv.get_store(pipe)
    rollout = pipe.rollout(pipe.encode_prompt("a red circle"), 6, 32, 32, generator=torch.Generator().manual_seed(0))
    next(rollout)  # chunk 0 committed: nothing staged
    layers = [c for layers in store.caches.values() for c in layers]
    assert layers and all(c.staged == 0 for c in layers)
    store.replayed()
    assert all(c.staged == store.chunk.num_tokens for c in layers)
    rollout.close()


def test_a_reader_that_does_not_declare_its_forwards_blocks_graphs_with_a_reason():
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=3), "rolling", window_frames=6)
    store = genkv.get_store(pipe)
    assert store.graph_blocker() is None

    class Opaque:
        def attend(self, *args, **kwargs):  # pragma: no cover - never called here
            raise AssertionError

    store.readers = (store.readers[0], Opaque())
    assert "Opaque" in store.graph_blocker() and "graph_signature" in store.graph_blocker()


@pytest.mark.parametrize("method, settings, frames", [
    ("rolling", dict(window_frames=6), 21),
    # 4 chunks: from chunk 2 on the TempCache commit goes the recordable way (frame_start a device value)
    ("fastar", dict(top_k=2, prompt_top_k=2, **BLOCKS), 45),
])
def test_graphs_requested_off_cuda_say_why_and_render_the_plain_path(method, settings, frames):
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=4), method, **settings)
    plain = np.concatenate(list(pipe.stream("a blue square", num_frames=frames,
                                            generator=torch.Generator().manual_seed(0))))
    pipe.cuda_graphs = True
    with pytest.warns(RuntimeWarning, match="without CUDA graphs: CUDA graphs need a CUDA device"):
        frames = list(pipe.stream("a blue square", num_frames=frames, generator=torch.Generator().manual_seed(0)))
    np.testing.assert_array_equal(np.concatenate(frames), plain)
    assert pipe.last_graphs.captures == 0 and "CUDA device" in pipe.last_graphs.reason


def test_compile_turns_graphs_on_only_for_a_cuda_model():
    pipe = tiny_self_forcing_pipeline(seed=4)
    assert not pipe.enable_compile().cuda_graphs  # CPU: nothing to record, and nothing was asked for
    assert pipe.enable_compile(cuda_graphs=True).cuda_graphs
    torch._dynamo.reset()


def _render_cuda(pipe, frames: int = 45) -> np.ndarray:
    gen = torch.Generator(device="cuda").manual_seed(0)
    return np.concatenate(list(pipe.stream("a red circle", num_frames=frames, generator=gen)))


@cuda
@pytest.mark.parametrize("method", ["rolling", "fastar"])
@pytest.mark.parametrize("compiled", [False, True])
def test_graph_replay_gives_the_frames_of_the_eager_forwards(method, compiled, monkeypatch):
    # The tiny model's head dim (12) is below what the Triton kernel and FlexAttention take: the dense-mask
    # backend (no host syncs) stands in for them here.
    monkeypatch.setenv("GENKV_KERNEL_BACKEND", "torch")
    settings = dict(window_frames=6) if method == "rolling" else dict(top_k=2, prompt_top_k=2, **BLOCKS)
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=5, device="cuda", dtype=torch.float16), method,
                             **settings)
    if compiled:
        torch._dynamo.reset()
        pipe.enable_compile(cuda_graphs=False)
    eager = _render_cuda(pipe)
    pipe.cuda_graphs = True
    graphed = _render_cuda(pipe)
    graphs = pipe.last_graphs
    assert graphs.reason is None
    # Two graphs of forwards for the whole video, every forward but the video's first replays: 3 + (1 + 4) + 5 +
    # 5. fastar (fixed layout): the routed forward (recorded at chunk 0's step 2, after a warm-up run) and the
    # routing forward (chunk 1's step 1, replayed once to give its output); and its TempCache commit, eager at
    # chunks 0 (sink frames: other merging frames) and 1, recorded at chunk 2 and replayed at chunks 2 and 3.
    # rolling: chunk 0's later forwards (empty history), then, with the window full from chunk 1 on, one graph
    # for every forward (all dense); its commit is not recorded.
    captures, replays = (2, 18) if method == "rolling" else (3, 20)
    assert (graphs.captures, graphs.replays) == (captures, replays)
    assert np.abs(graphed.astype(int) - eager.astype(int)).max() <= 1


@cuda
def test_a_forward_that_cannot_be_recorded_says_why_and_renders_the_plain_path():
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=5, device="cuda", dtype=torch.float16), "rolling",
                             window_frames=6)
    eager = _render_cuda(pipe, 21)
    reader = genkv.get_store(pipe).readers[0]
    attend = reader.attend

    def syncing_attend(query, *args, **kwargs):
        torch.cuda.synchronize()  # host work a graph cannot hold, under a reader that claims otherwise
        return attend(query, *args, **kwargs)

    reader.attend = syncing_attend
    pipe.cuda_graphs = True
    with pytest.warns(RuntimeWarning, match="recording a forward failed"):
        graphed = _render_cuda(pipe, 21)
    assert pipe.last_graphs.captures == 0
    np.testing.assert_array_equal(graphed, eager)


class _RunEagerly:
    """Stands in for ChunkGraphs: runs what would be recorded, and counts it (graphs replay the same kernels)."""

    def __init__(self):
        self.keys = []

    def run(self, key, fn, *inputs):
        self.keys.append(key)
        return fn(*inputs)


def test_a_recordable_tempcache_commit_keeps_each_group_at_its_newest_frame():
    """A static scene (every position's key repeats in every frame) with exact merging: each position ends as one
    group of every frame, stamped with the newest frame. From its second chunk of the same shape on, the commit
    goes the recordable way (frame_start a device value, the same kernels for every chunk), and must agree."""
    from genkv.cache import KVCacheStore
    from genkv.keep.tempcache import TemporalMerge

    grid, heads, dim, chunks = (2, 3), 2, 8, 4
    tpf = grid[0] * grid[1]
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, tpf, heads, dim, generator=g).repeat(1, 3, 1, 1)  # a chunk: 3 frames of one scene
    keeper = TemporalMerge(threshold=1.0, radius=1, sink_frames=0, budget_frames=100, max_tokens=None,
                           match="stored")
    store = KVCacheStore(keeper, num_layers=2, rope=None)
    graphs = _RunEagerly()
    values = []
    for c in range(chunks):
        store.begin_chunk(3 * c, 3, tpf, grid)
        v = torch.randn(1, 3 * tpf, heads, dim, generator=g)
        values.append(v)
        for layer in range(2):
            store.layer(layer).stage(keys, v)
        store.commit(graphs)
    # chunk 0 has one merging frame fewer (its first frame has no frame before it): chunks 1, 2, 3 share a key,
    # run eagerly at chunk 1 and the recordable way at chunks 2 and 3
    assert len(graphs.keys) == 2 and graphs.keys[0] == graphs.keys[1]
    all_v = torch.cat(values, 1).view(1, 3 * chunks, tpf, heads, dim)
    for layer in range(2):
        cache = store.layer(layer)
        live = cache.frame_index[: cache.length] >= 0
        assert int(live.sum()) == tpf  # one group per position
        assert (cache.frame_index[: cache.length][live] == 3 * chunks - 1).all()  # stamped with the newest frame
        assert (cache.token_count[: cache.length][live] == 3 * chunks).all()
        positions = cache.token_pos[: cache.length][live]
        torch.testing.assert_close(cache.v[0, : cache.length][live], all_v[0].mean(0)[positions])


def test_new_input_shapes_run_eagerly_once_before_they_are_recorded(monkeypatch):
    """cuDNN picks engines for a new convolution shape by running them, which a capture cannot: a forward whose
    input shapes never ran before (a switch's 1-frame re-cache block, a short last chunk) runs eagerly first."""
    from genkv.pipelines.self_forcing.step_graph import ChunkGraphs

    graphs = ChunkGraphs(torch.device("cpu"))
    # the recording policy alone: _record stands in for a capture; device -1 switches no device
    graphs.reason, graphs.device = None, -1
    recorded, ran = [], []
    monkeypatch.setattr(graphs, "_record", lambda key, fn, inputs: recorded.append(key) or fn(*inputs))
    forward = lambda x: ran.append(tuple(x.shape)) or x + 1  # noqa: E731
    three, one = torch.zeros(1, 16, 3, 4, 4), torch.zeros(1, 16, 1, 4, 4)
    graphs.run(None, forward, three)  # a video's first forward: eager
    graphs.run("k", forward, three)  # the same shapes under a key: recorded
    assert len(recorded) == 1 and len(ran) == 2
    graphs.run("k2", forward, one)  # new shapes: eager first
    assert len(recorded) == 1 and len(ran) == 3
    graphs.run("k2", forward, one)  # then recorded
    assert len(recorded) == 2 and len(ran) == 4
