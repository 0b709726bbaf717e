"""TempCache commits all layers of a LayerStack at once: the result must be each layer committed on its own."""

import pytest
import torch

from genkv.cache import ChunkInfo, LayerKVCache, LayerStack
from genkv.keep.tempcache import TemporalMerge


def _layer_keys(g, layers, chunk, tpf, heads, dim):
    """Per layer, 3 frames that are noisy copies of one base frame (so many tokens merge), and values."""
    out = []
    for _ in range(layers):
        base = torch.randn(1, tpf, heads, dim, generator=g)
        scale = torch.rand(1, generator=g) * 0.4  # layers differ in how much merges
        keys = torch.cat([base + scale * torch.randn(base.shape, generator=g) for _ in range(3)], 1)
        # outlier channels that differ by layer (as real keys have): each layer gets its own smoothing factors
        keys = keys * torch.exp(2 * torch.randn(dim, generator=g))
        out.append((keys, torch.randn(keys.shape, generator=g)))
    return out


def _commit(keeper, caches, staged, chunk):
    for cache, (k, v) in zip(caches, staged):
        cache.stage(k, v)
        cache.label_staged(chunk)
    keeper.commit_layers(caches, chunk)
    for cache in caches:
        cache.staged = 0


def _fields(cache: LayerKVCache) -> dict[str, torch.Tensor]:
    """What a commit leaves in a cache: K/V (or their codes, scales and smoothing factors) and the slot records."""
    out = {name: getattr(cache, name) for name in ("frame_index", "token_pos", "token_count")}
    if cache.quant is None:
        out.update(k=cache.k, v=cache.v)
    else:
        from genkv.kernels.quant_kv import code_fields

        out.update({f"code{i}": t for i, t in enumerate(code_fields(cache.quant.codes))})
        out["key_channel_scale"] = cache.quant.codes.key_channel_scale
    return out


@pytest.mark.parametrize("radius,threshold,kv_dtype", [(1, 0.9, "bf16"), (0, 0.8, "bf16"), (1, 1.5, "bf16"),
                                                       (1, 0.9, "int8"), (1, 0.9, "int4")])
def test_a_stacked_commit_equals_committing_each_layer_alone(radius, threshold, kv_dtype):
    g = torch.Generator().manual_seed(7)
    grid, heads, dim, layers, budget_frames = (3, 4), 2, 8, 7, 5  # 7 layers: quantized writes go in slices
    tpf = grid[0] * grid[1]
    keeper = TemporalMerge(threshold=threshold, radius=radius, sink_frames=1, budget_frames=budget_frames,
                           max_tokens=None)
    stacked = [LayerKVCache(budget_frames * tpf, fixed=True, kv_dtype=kv_dtype) for _ in range(layers)]
    stack = LayerStack(stacked)
    alone = [LayerKVCache(budget_frames * tpf, fixed=True, kv_dtype=kv_dtype) for _ in range(layers)]
    for c in range(7):  # fills the budget, then merges and evicts every chunk
        chunk = ChunkInfo(3 * c, 3, tpf, 3 * c, grid)
        staged = _layer_keys(g, layers, c, tpf, heads, dim)
        _commit(keeper, stacked, staged, chunk)
        for cache, pair in zip(alone, staged):
            _commit(keeper, [cache], [pair], chunk)
    assert stack.covers(stacked)  # the stacked path ran (not the per-layer fallback)
    merged = 0
    for s, a in zip(stacked, alone):
        got, want = _fields(s), _fields(a)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
        assert int(s.info["merged_groups"]) == int(a.info["merged_groups"])
        merged += int(a.info["merged_groups"])
    if threshold <= 1.0:
        assert merged > 0  # the comparison covered merges, not only appends and evictions


def test_a_store_with_a_fixed_layout_keeper_stacks_its_layers():
    """KVCacheStore gives a fixed-layout keeper's layers views of one allocation per branch."""
    import genkv
    from genkv.testing import tiny_self_forcing_pipeline

    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(), "tempcache")
    pipe("a prompt", num_frames=12, output_type="latent", generator=torch.Generator().manual_seed(0))
    store = genkv.get_store(pipe)
    assert store.caches
    for layers in store.caches.values():
        stack = layers[0].stack
        assert stack is not None and stack.covers(layers)
        assert stack.k.shape[1] == len(layers)
