"""The opt-in compiled path computes what the eager path computes (same method, same seed)."""

import numpy as np

import genkv
from genkv.testing import tiny_self_forcing_pipeline


def test_compiled_blocks_match_eager_and_do_not_recompile_as_the_cache_rolls():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # graph counts are process-wide: other tests' compiled functions must not count here
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=2), "rolling", sink_frames=1, window_frames=6)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    eager = np.concatenate(list(pipe.stream("a red circle", num_frames=61, generator=gen())))
    pipe.enable_compile()
    compiled = np.concatenate(list(pipe.stream("a red circle", num_frames=61, generator=gen())))
    assert compiled.shape == eager.shape == (61, 64, 64, 3)
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 1  # float32: at most one uint8 rounding step
    # The cache islands are opaque ops, not graph breaks: one graph, shared by every block and every chunk.
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
