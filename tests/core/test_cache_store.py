"""LayerKVCache storage rules: staging views, growth, atomic reallocation."""

import pytest
import torch

from genkv.cache import ChunkInfo, LayerKVCache


def _kv(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, 2, 4, generator=g), torch.randn(1, n, 2, 4, generator=g)


def test_stage_returns_history_plus_chunk_and_restaging_overwrites():
    cache = LayerKVCache()
    k0, v0 = _kv(6, 0)
    cache.stage(k0, v0)
    cache.label_staged(ChunkInfo(0, 3, 2, 0))
    cache.length += cache.staged
    k1, v1 = _kv(6, 1)
    cache.stage(k1, v1)
    k2, v2 = _kv(6, 2)
    k_all, v_all, bias = cache.stage(k2, v2)  # a later denoising step of the same chunk
    assert bias is None
    assert torch.equal(k_all, torch.cat([k0, k2], 1)) and torch.equal(v_all, torch.cat([v0, v2], 1))
    assert cache.frame_host[:6].tolist() == [0, 0, 1, 1, 2, 2]


def test_growth_falls_back_to_an_exact_fit_when_memory_is_tight(monkeypatch):
    cache = LayerKVCache()
    chunks = [_kv(6, i) for i in range(4)]
    original = LayerKVCache._allocate
    requests = []

    def tight(self, like, capacity):
        requests.append(capacity)
        if capacity > self.length + like.shape[1]:
            raise torch.OutOfMemoryError("simulated")
        original(self, like, capacity)

    monkeypatch.setattr(LayerKVCache, "_allocate", tight)
    for i, (k, v) in enumerate(chunks):
        cache.stage(k, v)
        cache.label_staged(ChunkInfo(3 * i, 3, 2, 3 * i))
        cache.length += cache.staged
    assert cache.capacity == 24 and cache.length == 24
    assert torch.equal(cache.k[:, :24], torch.cat([k for k, _ in chunks], 1))
    assert any(r > 24 for r in requests)  # the 1.5x growth was tried first


def test_batch_change_without_reset_is_an_error():
    cache = LayerKVCache()
    cache.stage(*_kv(6, 0))
    with pytest.raises(ValueError, match="reset the cache"):
        cache.stage(torch.zeros(2, 6, 2, 4), torch.zeros(2, 6, 2, 4))
