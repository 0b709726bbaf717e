"""The opt-in compiled path computes what the eager path computes (same method, same seed)."""

import numpy as np
import pytest

import genkv
from genkv.testing import tiny_self_forcing_pipeline


METHODS = {
    "rolling": dict(sink_frames=1, window_frames=6),
    # merged keys (a key bias), routed block-sparse reads and top-k prompt tokens: every island's path
    "fastar": dict(budget_frames=6, top_k=2, prompt_top_k=2, block_m=16, block_n=16),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_compiled_blocks_match_eager_and_do_not_recompile_as_the_cache_rolls(method, monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters

    import genkv.pipelines.self_forcing.vae_conv as vae_conv
    import genkv.pipelines.self_forcing.vae_upsample as vae_upsample

    # The fast path's decoder must run its fused pieces: count the tap sums (4 partials: a block's shortcut folded
    # in) and the up-samplers' transposed convolutions.
    fused = {"sums": [], "transposed": 0}
    real_sum, real_transposed = vae_conv.sum_partials, vae_upsample.F.conv_transpose2d
    monkeypatch.setattr(vae_conv, "sum_partials",
                        lambda parts, bias: fused["sums"].append(len(parts)) or real_sum(parts, bias))

    def counting_transposed(*args, **kwargs):
        fused["transposed"] += 1
        return real_transposed(*args, **kwargs)

    monkeypatch.setattr(vae_upsample.F, "conv_transpose2d", counting_transposed)

    torch._dynamo.reset()
    counters.clear()  # graph counts are process-wide: other tests' compiled functions must not count here
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=2), method, **METHODS[method])
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    eager = np.concatenate(list(pipe.stream("a red circle", num_frames=61, generator=gen())))
    assert fused == {"sums": [], "transposed": 0}  # the plain path's decoder
    pipe.enable_compile()
    compiled = np.concatenate(list(pipe.stream("a red circle", num_frames=61, generator=gen())))
    assert 4 in fused["sums"] and fused["transposed"] > 0
    assert compiled.shape == eager.shape == (61, 64, 64, 3)
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 1  # float32: at most one uint8 rounding step
    # The cache islands are opaque ops, not graph breaks: one graph, shared by every block and every chunk.
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_a_compiler_failure_says_why_and_the_blocks_run_eagerly():
    import torch._dynamo

    from genkv.compile import compile_transformer

    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler on this machine")

    torch._dynamo.reset()
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=2), "rolling", sink_frames=1, window_frames=6)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    eager = np.concatenate(list(pipe.stream("a red circle", num_frames=21, generator=gen())))
    compile_transformer(pipe.transformer, backend=broken_backend)
    with pytest.warns(RuntimeWarning, match="compiling the transformer blocks failed.*no compiler on this machine"):
        frames = np.concatenate(list(pipe.stream("a red circle", num_frames=21, generator=gen())))
    np.testing.assert_array_equal(frames, eager)
    assert all(block._compiled_call_impl is None for block in pipe.transformer.blocks)
    assert "forward" not in pipe.transformer.__dict__
    torch._dynamo.reset()
