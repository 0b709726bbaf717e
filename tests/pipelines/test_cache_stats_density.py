"""``cache_stats`` densities count only occupied key blocks (a fixed-layout cache's empty slots are not unread)."""

import pytest
import torch

import genkv
import genkv.kernels
from genkv.testing import tiny_self_forcing_pipeline

BLOCKS = dict(block_m=16, block_n=16)  # the tiny model's frames are 16 tokens: several key blocks per chunk


def _render(pipe, frames=45):
    pipe("a red circle", num_frames=frames, output_type="latent", generator=torch.Generator().manual_seed(0))
    return genkv.cache_stats(pipe)


def _occupied_fraction(indices, counts, key_bias, block):
    """Reference from the call's own inputs: per (batch, head, query block), listed blocks with a visible key
    over all blocks with one (float64, no genkv code)."""
    visible = (key_bias > -float("inf")).any(-1).any(0).double()  # (S_kv,)
    n = -(-visible.numel() // block)
    occupied = torch.nn.functional.pad(visible, (0, n * block - visible.numel())).view(n, block).amax(-1) > 0
    read = torch.zeros(counts.shape, dtype=torch.float64)
    for b, h, q in torch.cartesian_prod(*(torch.arange(s) for s in counts.shape)).tolist():
        listed = set(indices[b, h, q, : counts[b, h, q]].tolist())
        read[b, h, q] = sum(bool(occupied[j]) for j in listed)
    return float(read.mean() / occupied.sum())


@pytest.mark.parametrize("method, settings", [("fastar", dict(top_k=1000, threshold=2.0, **BLOCKS)),
                                              ("fastar", dict(top_k=1000)),
                                              ("tempcache", {})])
def test_exact_settings_report_density_one(method, settings):
    stats = _render(genkv.apply_genkv(tiny_self_forcing_pipeline(), method, **settings))
    assert stats["tokens"] < stats["layers"][0]["capacity"] * len(stats["layers"])  # empty budget slots exist
    assert stats.get("self_density", 1.0) == pytest.approx(1.0)


def test_sparse_density_is_the_fraction_of_occupied_blocks_read(monkeypatch):
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(), "fastar", top_k=2, threshold=2.0, **BLOCKS)
    calls = []
    original = genkv.kernels.block_sparse_attention

    def spy(q, k, v, indices, counts, *, key_bias=None, **kwargs):
        calls.append((indices.clone(), counts.clone(), key_bias.clone()))
        return original(q, k, v, indices, counts, key_bias=key_bias, **kwargs)

    monkeypatch.setattr(genkv.kernels, "block_sparse_attention", spy)
    stats = _render(pipe)
    layers = pipe.transformer.config.num_layers
    want = sum(_occupied_fraction(*call, 16) for call in calls[-layers:]) / layers
    assert 0.1 < want < 0.9
    assert stats["self_density"] == pytest.approx(want, abs=1e-6)
