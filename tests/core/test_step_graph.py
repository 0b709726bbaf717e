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


def test_routed_forwards_share_a_signature_once_the_chunk_is_routed():
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=3), "fastar", top_k=2, prompt_top_k=2, **BLOCKS)
    seen = _signatures(pipe, "a red circle", 33)  # 3 chunks x (4 steps + clean pass)
    assert len(seen) == 15
    for chunk in range(3):
        rows = seen[5 * chunk : 5 * chunk + 5]
        assert rows[0][2] is None  # the chunk's first forward routes (host block lists): never recorded
        assert len({row[2] for row in rows[1:]}) == 1 and rows[1][2] is not None  # steps 1-3 and the clean pass
    later = [seen[5 * c + 1][2] for c in range(3)]
    assert len(set(later)) == 3  # a new chunk (new cache lengths, new routes) never replays the last one's graph


def test_dense_steps_and_routing_step_get_their_own_signatures():
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=3), "annsa", top_k=2, dense_steps=2, **BLOCKS)
    seen = _signatures(pipe, "a red circle", 21)
    # The video's first forward also projects the prompt's K/V: a path of its own.
    assert seen[0][2] != seen[1][2]
    rows = seen[5:10]  # the second chunk: dense, dense, routing, routed, routed clean pass
    dense, routing, routed = rows[1][2], rows[2][2], rows[3][2]
    assert rows[0][2] == dense and dense is not None
    assert routing is None
    assert routed is not None and routed != dense and rows[4][2] == routed


def test_with_guidance_both_branches_are_ready_after_the_chunks_first_forward():
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
    list(pipe.stream("a red circle", num_frames=21, guidance_scale=3.0, generator=torch.Generator().manual_seed(0)))
    assert all(branches == ["cond", "uncond"] for _, branches in seen)
    for chunk in range(2):
        rows = [signature for signature, _ in seen[5 * chunk : 5 * chunk + 5]]
        assert rows[0] is None and rows[1] is not None and len(set(rows[1:])) == 1


def test_a_reader_that_does_not_declare_its_forwards_blocks_graphs_with_a_reason():
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=3), "rolling", window_frames=6)
    store = genkv.get_store(pipe)
    assert store.graph_blocker() is None

    class Opaque:
        def attend(self, *args, **kwargs):  # pragma: no cover - never called here
            raise AssertionError

    store.readers = (store.readers[0], Opaque())
    assert "Opaque" in store.graph_blocker() and "graph_signature" in store.graph_blocker()


def test_graphs_requested_off_cuda_say_why_and_render_the_plain_path():
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=4), "rolling", window_frames=6)
    plain = np.concatenate(list(pipe.stream("a blue square", num_frames=21, generator=torch.Generator().manual_seed(0))))
    pipe.cuda_graphs = True
    with pytest.warns(RuntimeWarning, match="without CUDA graphs: CUDA graphs need a CUDA device"):
        frames = list(pipe.stream("a blue square", num_frames=21, generator=torch.Generator().manual_seed(0)))
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
    chunks = 4  # 45 frames
    assert graphs.captures == chunks and graphs.replays >= 3 * chunks  # steps 2-3 and the clean pass replay
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
    with pytest.warns(RuntimeWarning, match="recording the chunk's forward failed"):
        graphed = _render_cuda(pipe, 21)
    assert pipe.last_graphs.captures == 0
    np.testing.assert_array_equal(graphed, eager)
