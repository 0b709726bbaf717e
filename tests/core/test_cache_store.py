"""LayerKVCache storage rules: staging views, growth, atomic reallocation; rows copied and gathered as 8-byte
words (copy_rows_, select_rows) with the same bits as aten's element copies."""

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.uint8])
def test_copy_rows_moves_the_same_bits_as_index_copy(dtype):
    from genkv.cache import copy_rows_

    g = torch.Generator().manual_seed(3)
    buffer = (torch.randn(2, 40, 3, 16, generator=g) * 50).to(dtype)
    chunk = (torch.randn(2, 9, 3, 16, generator=g) * 50).to(dtype)[:, 2:7]  # a strided source: a slice
    index = torch.tensor([31, 0, 7, 39, 12])
    want = buffer.clone().index_copy_(1, index, chunk)
    target = buffer.clone()
    with _OpDtypes() as copies:
        got = copy_rows_(target, 1, index, chunk)
    assert got is target and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert copies.dtypes == [torch.int64]  # one copy, of 8-byte words


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8])
def test_select_rows_gathers_the_same_bits_as_index_select(dtype):
    from genkv.cache import select_rows

    g = torch.Generator().manual_seed(5)
    buffer = (torch.randn(2, 40, 3, 16, generator=g) * 50).to(dtype)[:, 5:]  # a slice: offset by whole rows
    index = torch.tensor([31, 0, 7, 34, 12, 7])
    with _OpDtypes("index_select") as gathers:
        got = select_rows(buffer, 1, index)
    want = buffer.index_select(1, index)
    assert got.dtype == dtype and got.is_contiguous() and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert gathers.dtypes == [torch.int64]  # one gather, of 8-byte words
    odd = buffer[..., :6]  # rows of 6 elements, 16 apart: not whole words for bf16 / uint8
    assert torch.equal(select_rows(odd, 1, index), odd.index_select(1, index))


class _OpDtypes(TorchDispatchMode):
    """Records the dtype of every aten op named ``op`` (index_copy by default) under it."""

    def __init__(self, op: str = "index_copy"):
        super().__init__()
        self.op = op

    def __enter__(self):
        self.dtypes = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith(self.op):
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["odd last dim", "row stride between words", "offset between words", "last dim",
                                    "different dtypes"])
def test_copy_rows_falls_back_to_index_copy_where_words_do_not_fit(layout):
    from genkv.cache import _as_words, copy_rows_

    g = torch.Generator().manual_seed(4)
    buffer = torch.randn(1, 12, 2, 6, generator=g).bfloat16()
    source = torch.randn(1, 3, 2, 6, generator=g).bfloat16()
    index, dim = torch.tensor([5, 1, 10]), 1
    if layout == "odd last dim":
        buffer, source = buffer[..., :3], source[..., :3].contiguous()
    elif layout == "row stride between words":  # one whole word a row, rows 6 bf16 apart
        buffer, source = buffer[..., :4], source[..., :4]
    elif layout == "offset between words":  # rows of two whole words, but the buffer starts one bf16 into a word
        buffer = torch.randn(1 + 12 * 2 * 8, generator=g).bfloat16()[1:].view(1, 12, 2, 8)
        source = torch.randn(1, 3, 2, 8, generator=g).bfloat16()
    elif layout == "last dim":
        index, dim, source = torch.tensor([4, 0]), 3, torch.randn(1, 12, 2, 2, generator=g).bfloat16()
    else:
        source = source.float()
    if layout != "last dim":
        assert _as_words(buffer) is None or layout == "different dtypes"
    try:
        want = buffer.clone().index_copy_(dim, index, source)
    except RuntimeError as error:  # aten refuses mixed dtypes: so must copy_rows_
        with pytest.raises(RuntimeError, match=re.escape(str(error))):
            copy_rows_(buffer, dim, index, source)
        return
    assert torch.equal(copy_rows_(buffer, dim, index, source), want)  # in place, in the buffer's own layout
