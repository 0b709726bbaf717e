"""Split reads (``num_splits``): each block list read in contiguous shares by several programs, whose fp32
partials one more kernel merges. Checked against float64 attention over the listed keys, for plain lists
(ragged, bias holes, rows listing fewer blocks than there are splits, or none) and for quantized histories
resumed from a partial, where the shares cut the history / straddling / current-chunk runs at every place.
"""

import math

import pytest
import torch

from genkv.kernels import dense_attention_with_lse, dequantize, quantize_kv
from genkv.kernels import block_sparse as bs

from .test_block_sparse import allowed_mask, dense_reference, device_for, on, random_lists, tolerance

pytestmark = pytest.mark.skipif(not bs.triton_available(), reason="triton is not installed")


@pytest.mark.parametrize("splits", [2, 3, 4])
@pytest.mark.parametrize("dtype,with_bias", [(torch.float32, False), (torch.float32, True), (torch.float16, True)])
def test_split_reads_match_float64(splits, dtype, with_bias):
    g = torch.Generator().manual_seed(splits * 10 + with_bias)
    b, h, d, s_q, s_kv, bm, bn = 1, 2, 64, 45, 210, 16, 32  # 7 key blocks, the last one ragged
    q, k, v = (torch.randn(b, n, h, d, generator=g).to(dtype) for n in (s_q, s_kv, s_kv))
    idx, counts = random_lists(b, h, math.ceil(s_q / bm), math.ceil(s_kv / bn), 5, g)
    counts[0, 0, 0], counts[0, 1, 1], counts[0, 1, 2] = 5, 1, 0  # a full list, fewer entries than splits, none
    bias = None
    if with_bias:
        bias = torch.randn(b, s_kv, h, generator=g)
        bias[:, 40:70] = -float("inf")  # holes: block 1 all holes, block 2 partly
    dev = device_for("triton")
    poisoned = torch.full_like(q, float("nan"), device=dev)
    got, lse = bs.block_sparse_attention_triton(*on(dev, q, k, v, idx, counts), key_bias=on(dev, bias)[0],
                                                block_m=bm, block_n=bn, return_lse=True, out=poisoned,
                                                num_splits=splits)
    assert got is poisoned
    want, want_lse = dense_reference(q, k, v, allowed_mask(idx, counts, s_q, s_kv, bm, bn), bias)
    empty = ~torch.isfinite(want_lse)
    assert empty.any() and not torch.isnan(got).any()
    want = torch.where(empty.permute(0, 2, 1)[..., None], 0.0, want)
    torch.testing.assert_close(got.cpu().double(), want, **tolerance(dtype, dev))
    lse_tol = 1e-4 if dev == "cpu" else 5e-3
    torch.testing.assert_close(lse.cpu()[~empty].double(), want_lse[~empty], rtol=lse_tol, atol=lse_tol)
    assert torch.isneginf(lse.cpu()[empty]).all()


@pytest.mark.parametrize("splits", [2, 3, 4])
@pytest.mark.parametrize("kind", [None, "fp8", "int8", "int4"])
def test_split_reads_of_a_quantized_history_resume_and_match_float64(kind, splits):
    """History of 100 keys (block 3 straddles its end), a 40-key chunk (block 4, ragged), and a partial over 20
    other keys to resume from. Row 0 lists all five blocks in order (whole-history, straddling and current
    runs, cut by the shares), row 1 an unordered list (the merged loop), row 2 nothing but the partial."""
    g = torch.Generator().manual_seed(70 + splits + 4 * [None, "fp8", "int8", "int4"].index(kind))
    b, h, d, bm, bn = 1, 2, 64, 16, 32
    s_h, s_cur, s_x, s_q = 100, 40, 20, 48
    q = torch.randn(b, s_q, h, d, generator=g)
    k_hist, v_hist = torch.randn(b, s_h, h, d, generator=g), torch.randn(b, s_h, h, d, generator=g) + 0.3
    k_cur, v_cur, k_x, v_x = (torch.randn(b, n, h, d, generator=g) for n in (s_cur, s_cur, s_x, s_x))
    history = None
    if kind is not None:
        history = quantize_kv(k_hist, v_hist, kind)
        k_hist, v_hist = dequantize(history)
    lists = torch.tensor([[0, 1, 2, 3, 4], [4, 0, 3, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.int32)
    idx = lists.expand(b, h, 3, 5).contiguous()
    counts = torch.tensor([5, 4, 0], dtype=torch.int32).expand(b, h, 3).contiguous()
    bias = torch.randn(b, s_h + s_cur, h, generator=g)
    bias[:, 90:104] = -float("inf")  # holes on both sides of the history's end
    out0, lse0 = dense_attention_with_lse(q, k_x, v_x, backend="math")

    dev = device_for("triton")
    k_in, v_in = (k_cur, v_cur) if history is not None else (torch.cat([k_hist, k_cur], 1),
                                                              torch.cat([v_hist, v_cur], 1))
    hist_dev = history.to(dev) if history is not None else None
    got, lse = bs.block_sparse_attention_triton(
        *on(dev, q, k_in, v_in, idx, counts), key_bias=bias.to(dev), block_m=bm, block_n=bn, tile_n=16,
        return_lse=True, history=hist_dev, initial=(out0.to(dev), lse0.to(dev)), num_splits=splits)

    allowed = torch.cat([allowed_mask(idx, counts, s_q, s_h + s_cur, bm, bn),
                         torch.ones(b, h, s_q, s_x, dtype=torch.bool)], -1)
    keys = torch.cat([k_hist, k_cur, k_x], 1)
    values = torch.cat([v_hist, v_cur, v_x], 1)
    want, want_lse = dense_reference(q, keys, values, allowed, torch.cat([bias, torch.zeros(b, s_x, h)], 1))
    torch.testing.assert_close(got.cpu().double(), want, **tolerance(torch.float32, dev))
    torch.testing.assert_close(lse.cpu().double(), want_lse, rtol=2e-3, atol=2e-3)


def test_a_split_read_resumes_in_place():
    """``out`` may be the partial's own output tensor: split 0 reads it before the merge overwrites it."""
    g = torch.Generator().manual_seed(80)
    q, k, v, k_x, v_x = (torch.randn(1, n, 2, 64, generator=g) for n in (32, 96, 96, 16, 16))
    idx = torch.arange(3, dtype=torch.int32).expand(1, 2, 2, 3).contiguous()
    counts = torch.full((1, 2, 2), 3, dtype=torch.int32)
    out0, lse0 = dense_attention_with_lse(q, k_x, v_x, backend="math")
    want, _ = dense_reference(q, torch.cat([k, k_x], 1), torch.cat([v, v_x], 1))
    dev = device_for("triton")
    out0 = out0.to(dev)
    got = bs.block_sparse_attention_triton(*on(dev, q, k, v, idx, counts), block_m=16, block_n=32, out=out0,
                                           initial=(out0, lse0.to(dev)), num_splits=3)
    assert got is out0
    torch.testing.assert_close(got.cpu().double(), want, **tolerance(torch.float32, dev))


def test_the_split_count_fills_the_last_wave(monkeypatch):
    """The default split count from the grid alone: 444 programs (Wan: 37 query tiles x 12 heads) on 132 SMs
    run four waves, the last a third full; two splits make 888 programs in 7 waves (96% busy)."""
    monkeypatch.delenv("GENKV_NUM_SPLITS", raising=False)
    monkeypatch.setattr(bs, "DEFAULT_SPLITS", "auto")
    monkeypatch.setattr(bs, "_interpreting", lambda: False)
    monkeypatch.setitem(bs._SM_COUNTS, 0, (132, 9))  # an H100 / H200: 132 SMs, compute capability 9
    cuda = torch.device("cuda", 0)
    assert bs._num_splits(None, 444, 256, 128, cuda) == 2
    assert bs._num_splits(None, 396, 256, 128, cuda) == 1  # three full waves: nothing to fill
    assert bs._num_splits(None, 140, 256, 128, cuda) == 4  # 1.06 waves: 560 programs, 85% busy
    assert bs._num_splits(None, 444, 3, 128, cuda) == 1  # lists too short to share
    assert bs._num_splits(None, 444, 256, 64, cuda) == 1  # occupancy not modelled at other head dims
    assert bs._num_splits(None, 444, 256, 128, cuda, short_reads=True) == 1  # a split read's history part
    assert bs._num_splits(None, 444, 256, 128, torch.device("cpu")) == 1
    assert bs._num_splits(None, 0, 256, 128, cuda) == 1  # an empty grid
    assert bs._num_splits(None, 444, 256, 128, cuda, out_elements=2**30) == 1  # 2 x 2^30 partials: past int32
    assert bs._num_splits(3, 444, 256, 128, torch.device("cpu")) == 3
    assert bs._num_splits(" 3 ", 444, 256, 128, cuda) == 3 and bs._num_splits("AUTO", 444, 256, 128, cuda) == 2
    with pytest.raises(ValueError, match="pass int32 offsets"):
        bs._num_splits(2, 444, 256, 128, cuda, out_elements=2**30)
    monkeypatch.setitem(bs._SM_COUNTS, 0, (108, 8))  # an A100: the one-program-per-SM model is Hopper's
    assert bs._num_splits(None, 444, 256, 128, cuda) == 1
    monkeypatch.setitem(bs._SM_COUNTS, 0, (132, 9))
    monkeypatch.setenv("GENKV_NUM_SPLITS", "1")
    assert bs._num_splits(None, 444, 256, 128, cuda) == 1
    assert bs._num_splits("auto", 444, 256, 128, cuda) == 2  # an argument outranks the env
    monkeypatch.setenv("GENKV_NUM_SPLITS", "Auto")
    assert bs._num_splits(None, 444, 256, 128, cuda) == 2
    for bad in (5, 0, "two", True, 2.7, "2.7"):
        with pytest.raises(ValueError, match="num_splits must be 'auto' or a count from 1 to 4"):
            bs._num_splits(bad, 444, 256, 128, cuda)


def test_a_non_positive_scale_is_refused():
    q = torch.randn(1, 16, 1, 16)
    idx, counts = torch.zeros(1, 1, 1, 1, dtype=torch.int32), torch.ones(1, 1, 1, dtype=torch.int32)
    dev = device_for("triton")
    for scale in (-0.5, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale must be positive and finite"):
            bs.block_sparse_attention_triton(*on(dev, q, q, q, idx, counts), block_m=16, block_n=16, scale=scale)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_split_reads_of_fast_dequant_tiles_match_float64(kind):
    """An fp16 q turns on the 16-bit paths (int8: int8 x int8 logits; int4: codes from bits, zero points and
    scales in the value tiles): split three ways, against float64 over the dequantized history."""
    g = torch.Generator().manual_seed(90 + (kind == "int4"))
    b, h, d, bm, bn, s_h, s_cur, s_q = 1, 2, 64, 16, 32, 100, 40, 32
    k_hist, v_hist = torch.randn(b, s_h, h, d, generator=g), torch.randn(b, s_h, h, d, generator=g) + 0.3
    history = quantize_kv(k_hist, v_hist, kind)
    k_hist, v_hist = dequantize(history)
    q, k_cur, v_cur = (torch.randn(b, n, h, d, generator=g).to(torch.float16) for n in (s_q, s_cur, s_cur))
    idx = torch.tensor([[0, 1, 2, 3, 4], [4, 2, 0, 3, 1]], dtype=torch.int32).expand(b, h, 2, 5).contiguous()
    counts = torch.tensor([5, 3], dtype=torch.int32).expand(b, h, 2).contiguous()
    dev = device_for("triton")
    got = bs.block_sparse_attention_triton(*on(dev, q, k_cur, v_cur, idx, counts), block_m=bm, block_n=bn,
                                           tile_n=16, history=history.to(dev), num_splits=3)
    keys, values = torch.cat([k_hist, k_cur.float()], 1), torch.cat([v_hist, v_cur.float()], 1)
    want, _ = dense_reference(q, keys, values, allowed_mask(idx, counts, s_q, s_h + s_cur, bm, bn))
    torch.testing.assert_close(got.cpu().double(), want, **tolerance(torch.float16, dev))


def test_the_env_reaches_a_call_through_dispatch(monkeypatch):
    """``GENKV_NUM_SPLITS`` read by ``block_sparse_attention`` (backend triton): the launch splits, and the result
    is float64's."""
    from genkv.kernels import block_sparse_attention

    chosen = []
    choose = bs._num_splits
    monkeypatch.setattr(bs, "_num_splits", lambda *a, **kw: chosen.append(choose(*a, **kw)) or chosen[-1])
    monkeypatch.setenv("GENKV_NUM_SPLITS", "3")
    g = torch.Generator().manual_seed(91)
    q, k, v = (torch.randn(1, n, 2, 64, generator=g) for n in (32, 128, 128))
    idx = torch.arange(4, dtype=torch.int32).expand(1, 2, 2, 4).contiguous()
    counts = torch.full((1, 2, 2), 4, dtype=torch.int32)
    dev = device_for("triton")
    got = block_sparse_attention(*on(dev, q, k, v, idx, counts), block_m=16, block_n=32, backend="triton")
    assert chosen == [3]
    torch.testing.assert_close(got.cpu().double(), dense_reference(q, k, v)[0], **tolerance(torch.float32, dev))
