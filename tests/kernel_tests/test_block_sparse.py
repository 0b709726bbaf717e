"""Block-sparse attention (Triton under TRITON_INTERPRET, and the torch reference) against float64 references.

fp16/fp32 only: the Triton interpreter computes bf16 wrongly. Shapes are small so the interpreter stays fast.
On a GPU machine (``TRITON_INTERPRET=0 pytest``) the Triton and FlexAttention backends run on CUDA tensors; inputs
are drawn on the CPU either way, so both runs check the same numbers against the same float64 references.
"""

import math
import os

import pytest
import torch

from genkv.kernels import block_sparse_attention, merge_attention_partials, route_blocks
from genkv.kernels.block_sparse import triton_available

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
BACKENDS = ["torch", "gather"] + (["triton"] if triton_available() else [])


def device_for(backend: str) -> str:
    """Where a backend runs here: Triton under its interpreter on the CPU, else (and FlexAttention) on the GPU."""
    if backend in ("triton", "flex") and ON_GPU:
        return "cuda"
    if backend == "flex":
        pytest.skip("FlexAttention's backend needs a CUDA device")
    return "cpu"


def on(device: str, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def dense_reference(q, k, v, allowed=None, bias=None):
    """float64 softmax attention with an optional (B, H, Sq, Skv) boolean mask and (B, Skv, H) bias."""
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.double().permute(0, 2, 1)[:, :, None, :]
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -float("inf"))
    lse = torch.logsumexp(logits, -1)
    weights = torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", weights, v.double()), lse


def random_lists(b, h, n_q, n_kv, max_blocks, generator):
    counts = torch.randint(0, max_blocks + 1, (b, h, n_q), generator=generator, dtype=torch.int32)
    idx = torch.stack([torch.randperm(n_kv, generator=generator)[:max_blocks].sort().values
                       for _ in range(b * h * n_q)]).view(b, h, n_q, max_blocks).to(torch.int32)
    return idx, counts


def allowed_mask(idx, counts, s_q, s_kv, bm, bn):
    b, h, n_q, _ = idx.shape
    allowed = torch.zeros(b, h, s_q, s_kv, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for m in range(n_q):
                for j in range(int(counts[bi, hi, m])):
                    blk = int(idx[bi, hi, m, j])
                    allowed[bi, hi, m * bm : (m + 1) * bm, blk * bn : (blk + 1) * bn] = True
    return allowed


def tolerance(dtype, device: str = "cpu"):
    if device == "cuda":  # fp32 dots run in TF32 on the GPU (10-bit mantissa), fp16 with fp32 accumulation
        return dict(rtol=5e-3, atol=5e-3)
    return dict(rtol=2e-3, atol=2e-3) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("with_bias", [False, True])
def test_random_block_lists_match_float64(backend, dtype, head_dim, with_bias):
    g = torch.Generator().manual_seed(head_dim + with_bias)
    b, h, s_q, s_kv, bm, bn = 2, 2, 45, 77, 16, 32  # ragged: neither length is a multiple of its block
    # Slices of larger buffers, as the cache hands them over (non-contiguous along S).
    q = torch.randn(b, s_q + 5, h, head_dim, generator=g).to(dtype)[:, :s_q]
    kbuf = torch.randn(b, s_kv + 20, h, head_dim, generator=g).to(dtype)
    vbuf = torch.randn(b, s_kv + 20, h, head_dim, generator=g).to(dtype)
    k, v = kbuf[:, :s_kv], vbuf[:, :s_kv]
    n_q, n_kv = math.ceil(s_q / bm), math.ceil(s_kv / bn)
    idx, counts = random_lists(b, h, n_q, n_kv, 2, g)
    bias = None
    if with_bias:
        bias = torch.randn(b, s_kv, h, generator=g)
        bias[:, 3:9] = -float("inf")  # empty slots (TempCache holes)
    dev = device_for(backend)
    out = block_sparse_attention(*on(dev, q, k, v, idx, counts), key_bias=on(dev, bias)[0], block_m=bm, block_n=bn,
                                 backend=backend, return_lse=True)
    got, lse = out[0].cpu(), out[1].cpu()
    want, want_lse = dense_reference(q, k, v, allowed_mask(idx, counts, s_q, s_kv, bm, bn), bias)
    empty = ~torch.isfinite(want_lse)
    assert not torch.isnan(got).any()
    want_written = torch.where(empty.permute(0, 2, 1)[..., None], 0.0, want)
    torch.testing.assert_close(got.double(), want_written, **tolerance(dtype, dev))
    lse_tol = 1e-4 if dev == "cpu" else 5e-3
    torch.testing.assert_close(lse[~empty].double(), want_lse[~empty], rtol=lse_tol, atol=lse_tol)
    assert torch.isneginf(lse[empty]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_block_listed_is_dense_attention(backend):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, 2, 64, generator=g) for n in (33, 70, 70))
    idx, counts = route_blocks(q, k, block_m=16, block_n=16)  # no top_k / top_p: every block
    dev = device_for(backend)
    got = block_sparse_attention(*on(dev, q, k, v, idx, counts), block_m=16, block_n=16, backend=backend).cpu()
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(got, sdpa.transpose(1, 2), **tolerance(torch.float32, dev))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_single_block_lists(backend):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, n, 1, 64, generator=g) for n in (32, 64, 64))
    idx = torch.tensor([[[[1, 0], [0, 0]]]], dtype=torch.int32)
    counts = torch.tensor([[[1, 0]]], dtype=torch.int32)  # block 0 reads key block 1 only; block 1 reads nothing
    dev = device_for(backend)
    out = block_sparse_attention(*on(dev, q, k, v, idx, counts), block_m=16, block_n=32, backend=backend).cpu()
    want, _ = dense_reference(q[:, :16], k[:, 32:], v[:, 32:])
    torch.testing.assert_close(out[:, :16].double(), want, **tolerance(torch.float32, dev))
    assert torch.equal(out[:, 16:], torch.zeros_like(out[:, 16:]))


@pytest.mark.skipif(not ON_GPU, reason="FlexAttention's backend needs a CUDA device")
@pytest.mark.parametrize("with_bias", [False, True])
def test_flex_backend_matches_float64(with_bias):
    """The FlexAttention backend on CUDA (its kernels need blocks of 128: Inductor has no template for the
    small blocks the other tests use), ragged lengths, index lists narrower than the key blocks (3 of 6: Flex
    sizes its dense mask by the list's width, which tripped an index-out-of-bounds assert before flex.py padded
    the lists)."""
    g = torch.Generator().manual_seed(11 + with_bias)
    s_q, s_kv, bm, bn = 300, 700, 128, 128
    q, k, v = (torch.randn(1, n, 2, 64, generator=g).half() for n in (s_q, s_kv, s_kv))
    idx, counts = random_lists(1, 2, math.ceil(s_q / bm), math.ceil(s_kv / bn), 3, g)
    counts.clamp_(min=1)  # FlexAttention leaves rows with no block undefined
    bias = torch.randn(1, s_kv, 2, generator=g) if with_bias else None
    got = block_sparse_attention(*on("cuda", q, k, v, idx, counts), key_bias=on("cuda", bias)[0], block_m=bm,
                                 block_n=bn, backend="flex").cpu()
    want, _ = dense_reference(q, k, v, allowed_mask(idx, counts, s_q, s_kv, bm, bn), bias)
    torch.testing.assert_close(got.double(), want, **tolerance(torch.float16, "cuda"))


def test_merging_partials_equals_attention_over_the_union():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, n, 2, 64, generator=g) for n in (20, 64, 64))
    full = [torch.tensor([[[[0, 1]]] * 2]).view(1, 2, 1, 2).int(), torch.full((1, 2, 1), 2, dtype=torch.int32)]
    first = [torch.zeros(1, 2, 1, 1, dtype=torch.int32), torch.ones(1, 2, 1, dtype=torch.int32)]
    second = [torch.ones(1, 2, 1, 1, dtype=torch.int32), torch.ones(1, 2, 1, dtype=torch.int32)]
    kw = dict(block_m=32, block_n=32, backend="torch", return_lse=True)
    (oa, la), (ob, lb) = block_sparse_attention(q, k, v, *first, **kw), block_sparse_attention(q, k, v, *second, **kw)
    merged, _ = merge_attention_partials(oa, la, ob, lb)
    want = block_sparse_attention(q, k, v, *full, block_m=32, block_n=32, backend="torch")
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_fail_clearly():
    q = k = v = torch.randn(1, 32, 1, 64)
    idx, counts = route_blocks(q, k, block_m=16, block_n=16)
    with pytest.raises(TypeError, match="int32"):
        block_sparse_attention(q, k, v, idx.long(), counts, block_m=16, block_n=16)
    with pytest.raises(ValueError, match="backend"):
        block_sparse_attention(q, k, v, idx, counts, block_m=16, block_n=16, backend="cuda-magic")
    with pytest.raises(ValueError, match="flex backend needs CUDA"):
        block_sparse_attention(q, k, v, idx, counts, block_m=16, block_n=16, backend="flex")
    if triton_available():
        dev = device_for("triton")
        q, k, v, idx, counts = on(dev, q, k, v, idx, counts)
        if not ON_GPU:  # bf16 is refused only where the interpreter would compute it wrongly
            with pytest.raises(TypeError, match="bf16 wrongly"):
                block_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), idx, counts, block_m=16,
                                       block_n=16, backend="triton")
        else:  # and CPU tensors need the interpreter
            with pytest.raises(ValueError, match="needs CUDA tensors"):
                block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), idx.cpu(), counts.cpu(), block_m=16, block_n=16,
                                       backend="triton")
        with pytest.raises(ValueError, match="head_dim"):
            x = torch.randn(1, 32, 1, 12, device=dev)
            block_sparse_attention(x, x, x, idx, counts, block_m=16, block_n=16, backend="triton")
        with pytest.raises(ValueError, match="block lists"):
            block_sparse_attention(q, k, v, idx[:, :, :1], counts[:, :, :1], block_m=16, block_n=16, backend="triton")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_writes_every_output_element():
    from genkv.kernels.block_sparse import block_sparse_attention_triton

    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, n, 2, 64, generator=g) for n in (50, 90, 90))
    idx, counts = random_lists(1, 2, 4, 3, 2, g)  # some rows list nothing: they must be written as zeros
    dev = device_for("triton")
    poisoned = torch.full_like(q, float("nan"), device=dev)
    out = block_sparse_attention_triton(*on(dev, q, k, v, idx, counts), block_m=16, block_n=32, out=poisoned)
    assert out is poisoned and not torch.isnan(out).any()
    want, _ = dense_reference(q, k, v, allowed_mask(idx, counts, 50, 90, 16, 32))
    torch.testing.assert_close(out.cpu().double(), torch.nan_to_num(want, nan=0.0), **tolerance(torch.float32, dev))


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("with_bias,s_kv", [(False, 150), (True, 150), (False, 160), (True, 128)])
def test_triton_tiles_smaller_than_mask_blocks(with_bias, s_kv, tma):
    """The launch shape (tile_m, tile_n) is tuned independently of the mask's blocks: same result as float64,
    with K/V read through tensor descriptors (TMA) or pointers, ragged (150) or whole-block (128) lengths."""
    from genkv.kernels.block_sparse import block_sparse_attention_triton

    g = torch.Generator().manual_seed(7 + with_bias)
    # 150 keys: the last 64-key block holds 22 (a ragged tile, then an empty one); 160: a full tile, then an empty one.
    s_q, bm, bn = 70, 32, 64
    q, k, v = (torch.randn(1, n, 2, 64, generator=g) for n in (s_q, s_kv, s_kv))
    idx, counts = random_lists(1, 2, math.ceil(s_q / bm), math.ceil(s_kv / bn), min(3, math.ceil(s_kv / bn)), g)
    bias = torch.randn(1, s_kv, 2, generator=g) if with_bias else None
    dev = device_for("triton")
    out = block_sparse_attention_triton(*on(dev, q, k, v, idx, counts), key_bias=on(dev, bias)[0], block_m=bm,
                                        block_n=bn, tile_m=16, tile_n=32, tma=tma,
                                        out=torch.full_like(q, float("nan"), device=dev))
    want, _ = dense_reference(q, k, v, allowed_mask(idx, counts, s_q, s_kv, bm, bn), bias)
    torch.testing.assert_close(out.cpu().double(), torch.nan_to_num(want, nan=0.0), **tolerance(torch.float32, dev))


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_dense_reader_with_bias_through_triton_equals_float64():
    """TempCache's dense read (every block listed as broadcast views, per-key log-count bias) on the kernel."""
    from genkv.read.dense import _dense_with_bias_triton

    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, n, 2, 64, generator=g) for n in (40, 300, 300))
    bias = torch.randn(1, 300, 2, generator=g).abs().log1p()
    bias[:, 250:] = -float("inf")  # empty tail slots
    dev = device_for("triton")
    got = _dense_with_bias_triton(*on(dev, q, k, v, bias), block=32).cpu()
    want, _ = dense_reference(q, k, v, None, bias)
    torch.testing.assert_close(got.double(), want, **tolerance(torch.float32, dev))
    # a fixed-layout cache: whole empty blocks between live ones (not read at all), one head seeing a slot
    # the other does not
    bias[:, 60:170] = -float("inf")
    bias[0, 100, 1] = 0.0
    got = _dense_with_bias_triton(*on(dev, q, k, v, bias), block=32).cpu()
    want, _ = dense_reference(q, k, v, None, bias)
    torch.testing.assert_close(got.double(), want, **tolerance(torch.float32, dev))


def test_gather_counts_a_block_listed_twice_once_and_skips_entries_past_the_count():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, n, 2, 16, generator=g, dtype=torch.float64) for n in (40, 100, 100))
    idx = torch.tensor([[0, 2, 0, 3], [1, 1, 1, 1], [3, 2, 1, 0]], dtype=torch.int32).expand(1, 2, 3, 4)
    cnt = torch.tensor([3, 4, 2], dtype=torch.int32).expand(1, 2, 3)
    bias = torch.randn(1, 100, 2, generator=g, dtype=torch.float64)
    kw = dict(block_m=16, block_n=32, key_bias=bias, return_lse=True)
    got, got_lse = block_sparse_attention(q, k, v, idx, cnt, backend="gather", **kw)
    allowed = allowed_mask(idx, cnt, 40, 100, 16, 32)  # sets blocks: repeats are idempotent
    want, want_lse = dense_reference(q, k, v, allowed, bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_lse, want_lse.float(), rtol=1e-6, atol=1e-6)


def test_cpu_auto_backend_gathers():
    import genkv.kernels.dispatch as kernels

    calls = []
    original = kernels.block_sparse_attention_gather
    kernels.block_sparse_attention_gather = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        q = torch.randn(1, 16, 1, 16)
        idx, cnt = torch.zeros(1, 1, 1, 1, dtype=torch.int32), torch.ones(1, 1, 1, dtype=torch.int32)
        block_sparse_attention(q, q, q, idx, cnt, block_m=16, block_n=16, backend="auto")
    finally:
        kernels.block_sparse_attention_gather = original
    assert calls == [1]
