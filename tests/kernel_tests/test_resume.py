"""Resuming from a partial attention (``initial=``) and the dense attention with LSE that makes one.

A routed read can give the chunk's own keys to a dense SDPA and let the block-sparse kernel resume from its
``(out, lse)`` over the listed history blocks. Checked against float64 attention over the union of both key sets,
for bf16-layout histories and quantized ones (the same dequantized values), fp32 and fp16, with bias holes, rows
that list nothing and rows whose partial saw nothing (its output poisoned with NaN: it must not be read).
"""

import math

import pytest
import torch

from genkv.kernels import auto_backend, block_sparse_attention, dense_attention_with_lse, dequantize, quantize_kv
from genkv.kernels.block_sparse import triton_available

from .test_block_sparse import allowed_mask, dense_reference, device_for, on, tolerance

BACKENDS = ["torch", "gather"] + (["triton"] if triton_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", [None, "fp8", "int8", "int4"])
def test_resumed_attention_equals_float64_over_listed_history_and_every_chunk_key(backend, dtype, kind):
    g = torch.Generator().manual_seed(60 + (dtype == torch.float16) + 2 * [None, "fp8", "int8", "int4"].index(kind))
    b, h, d, bm, bn = 2, 2, 64, 16, 32
    s_h, s_cur, s_q = 45, 30, 30  # the history ends inside block 1: the kernel must stop at key 45
    q = torch.randn(b, s_q, h, d, generator=g).to(dtype)
    k_hist, v_hist = torch.randn(b, s_h, h, d, generator=g), torch.randn(b, s_h, h, d, generator=g) + 0.3
    k_cur, v_cur = (torch.randn(b, s_cur, h, d, generator=g).to(dtype) for _ in range(2))
    history = None
    if kind is not None:
        history = quantize_kv(k_hist, v_hist, kind)
        k_hist, v_hist = dequantize(history)
    k_hist, v_hist = k_hist.to(dtype), v_hist.to(dtype)
    n_q = math.ceil(s_q / bm)
    idx = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32).expand(b, h, n_q, 2).contiguous()
    counts = torch.tensor([2, 1], dtype=torch.int32).expand(b, h, n_q).clone()
    counts[1, 0, 1] = 0  # a row that lists no history block: the partial alone
    bias = torch.randn(b, s_h, h, generator=g)
    bias[:, 5:12] = -float("inf")
    bias[0, :, 1] = -float("inf")  # a head whose whole history is holes
    out0, lse0 = dense_attention_with_lse(q, k_cur, v_cur, backend="math")
    # Rows 16-29 of batch 1 resume from a partial that saw nothing (its output there must not be read): in head 0
    # they list nothing either (an empty row), in head 1 they list block 1 (history alone).
    lse0[1, :, 16:] = -float("inf")
    out0[1, 16:] = float("nan")

    dev = device_for(backend)
    if history is not None:
        history = history.to(dev)
        k_in, v_in = k_cur[:, :0], v_cur[:, :0]  # the listed keys are all history
    else:
        k_in, v_in = k_hist, v_hist
    got, lse = block_sparse_attention(*on(dev, q, k_in, v_in, idx, counts), key_bias=bias.to(dev), block_m=bm,
                                      block_n=bn, backend=backend, return_lse=True, history=history,
                                      initial=(out0.to(dev), lse0.to(dev)))

    allowed = torch.cat([allowed_mask(idx, counts, s_q, s_h, bm, bn), torch.ones(b, h, s_q, s_cur, dtype=torch.bool)],
                        -1)
    allowed[1, :, 16:, s_h:] = False
    want, want_lse = dense_reference(q, torch.cat([k_hist, k_cur], 1), torch.cat([v_hist, v_cur], 1), allowed,
                                     torch.cat([bias, torch.zeros(b, s_cur, h)], 1))
    empty = ~torch.isfinite(want_lse)
    assert empty.any() and not torch.isnan(got).any()  # a row with nothing listed and a partial that saw nothing
    want = torch.where(empty.permute(0, 2, 1)[..., None], 0.0, want)
    torch.testing.assert_close(got.cpu().double(), want, **tolerance(dtype, dev))
    torch.testing.assert_close(lse.cpu()[~empty].double(), want_lse[~empty], rtol=2e-3, atol=2e-3)
    assert torch.isneginf(lse.cpu()[empty]).all()


def test_triton_resumes_in_place_and_without_a_partial_is_unchanged():
    """``out`` may be the partial's own tensor; with ``initial=None`` the kernel computes what it always did."""
    if not triton_available():
        pytest.skip("triton is not installed")
    from genkv.kernels.block_sparse import block_sparse_attention_triton as run

    g = torch.Generator().manual_seed(70)
    q, k, v = (torch.randn(1, n, 2, 32, generator=g) for n in (20, 40, 40))
    k_cur, v_cur = torch.randn(1, 24, 2, 32, generator=g), torch.randn(1, 24, 2, 32, generator=g)
    idx = torch.tensor([0, 2], dtype=torch.int32).expand(1, 2, 2, 2).contiguous()
    counts = torch.full((1, 2, 2), 2, dtype=torch.int32)
    dev = device_for("triton")
    q, k, v, k_cur, v_cur, idx, counts = on(dev, q, k, v, k_cur, v_cur, idx, counts)
    out0, lse0 = dense_attention_with_lse(q, k_cur, v_cur, backend="math")
    separate = run(q, k, v, idx, counts, block_m=16, block_n=16, initial=(out0, lse0))
    in_place = run(q, k, v, idx, counts, block_m=16, block_n=16, initial=(out0, lse0), out=out0)
    assert in_place.data_ptr() == out0.data_ptr()
    torch.testing.assert_close(in_place, separate, rtol=0, atol=0)
    plain = run(q, k, v, idx, counts, block_m=16, block_n=16)
    torch.testing.assert_close(plain.cpu(), block_sparse_attention(*on("cpu", q, k, v, idx, counts), block_m=16,
                                                                   block_n=16, backend="torch"),
                               **tolerance(torch.float32, dev))  # TF32 dots on a GPU
    with pytest.raises(ValueError, match="initial must be"):
        run(q, k, v, idx, counts, block_m=16, block_n=16, initial=(out0, lse0[:, :1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_attention_with_lse_equals_float64(dtype):
    g = torch.Generator().manual_seed(71)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g).to(dtype) for n in (9, 13, 13))
    out, lse = dense_attention_with_lse(q, k, v, scale=0.3)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 0.3
    want_lse = torch.logsumexp(logits, -1)
    want = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, -1), v.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    assert lse.dtype == torch.float32 and out.dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN / flash SDPA need a CUDA device")
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_fused_dense_attention_with_lse_on_cuda(backend):
    g = torch.Generator().manual_seed(72)
    q, k, v = (torch.randn(1, n, 4, 128, generator=g) for n in (300, 470, 470))
    out, lse = dense_attention_with_lse(*on("cuda", *(t.bfloat16() for t in (q, k, v))), backend=backend)
    want, want_lse = dense_attention_with_lse(q.double(), k.double(), v.double(), backend="math")
    torch.testing.assert_close(out.cpu().double(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse.cpu().double(), want_lse.double(), rtol=1e-2, atol=1e-2)


def test_dense_attention_with_lse_refuses_what_it_cannot_run():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="not one of"):
        dense_attention_with_lse(q, q, q, backend="sdpa")
    with pytest.raises(ValueError, match="CUDA fp16 / bf16"):
        dense_attention_with_lse(q, q, q, backend="cudnn")
    with pytest.raises(ValueError, match="must be"):
        dense_attention_with_lse(q, q[:, :, :1], q, backend="math")


# (on_cuda, triton_fits, merges, history) -> the backend "auto" must pick. Flex reads neither a partial
# (``initial`` / ``return_lse``: merges) nor a quantized history, so it may serve only plain calls.
AUTO_CHOICES = {
    (False, False, False, False): "gather", (False, False, False, True): "gather",
    (False, False, True, False): "gather", (False, False, True, True): "gather",
    (False, True, False, False): "gather", (False, True, False, True): "gather",
    (False, True, True, False): "gather", (False, True, True, True): "gather",
    (True, False, False, False): "flex", (True, False, False, True): "gather",
    (True, False, True, False): "gather", (True, False, True, True): "gather",
    (True, True, False, False): "triton", (True, True, False, True): "triton",
    (True, True, True, False): "triton", (True, True, True, True): "triton",
}


@pytest.mark.parametrize("case", list(AUTO_CHOICES))
def test_auto_backend_only_picks_a_backend_that_takes_the_call(case):
    """``backend="auto"``'s choice for every case: the Triton kernel on CUDA where it fits; where it does not (a
    float32 model, or head dim 48 as ``sprites-tiny``'s), FlexAttention only for a plain call: ``fastar``'s split
    read on such a model once stopped with "initial is not available on the flex backend". Off CUDA, gather."""
    on_cuda, triton_fits, merges, history = case
    assert auto_backend(on_cuda, triton_fits, history=history, merges=merges) == AUTO_CHOICES[case]


def test_block_sparse_attention_tells_auto_what_the_call_needs(monkeypatch):
    """``block_sparse_attention`` passes ``auto_backend`` the call's needs: a partial (``initial``) or an LSE to
    return counts as a merge, a quantized history as a history (the CPU runs gather either way, so the choice is
    recorded, not its effect)."""
    import genkv.kernels.dispatch as dispatch

    seen = []
    real = dispatch.auto_backend

    def record(on_cuda, triton_fits, *, history=False, merges=False):
        seen.append((history, merges))
        return real(on_cuda, triton_fits, history=history, merges=merges)

    monkeypatch.setattr(dispatch, "auto_backend", record)
    g = torch.Generator().manual_seed(72)
    q, k, v = (torch.randn(1, 32, 2, 16, generator=g) for _ in range(3))
    idx = torch.tensor([0, 1], dtype=torch.int32).expand(1, 2, 2, 2).contiguous()
    counts = torch.full((1, 2, 2), 2, dtype=torch.int32)
    kwargs = dict(block_m=16, block_n=16, backend="auto")
    block_sparse_attention(q, k, v, idx, counts, **kwargs)
    block_sparse_attention(q, k, v, idx, counts, return_lse=True, **kwargs)
    block_sparse_attention(q, k, v, idx, counts, initial=dense_attention_with_lse(q, v, k), **kwargs)  # other keys
    block_sparse_attention(q, k[:, 16:], v[:, 16:], idx, counts, history=quantize_kv(k[:, :16], v[:, :16], "int8"),
                           **kwargs)
    assert seen == [(False, False), (False, True), (False, True), (True, False)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the auto backend's CUDA choice needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_auto_backend_resumes_a_partial_where_triton_does_not_fit_on_cuda(dtype):
    """A head-dim-48 (``sprites-tiny``) resumed read on CUDA under ``backend="auto"`` equals float64 over both key
    sets (fp32 and head dim 48 both miss the Triton kernel)."""
    g = torch.Generator().manual_seed(71)
    b, s_h, s_cur, h, d = 1, 64, 32, 2, 48
    q, k, v = (torch.randn(b, s_cur, h, d, generator=g) for _ in range(3))
    k_hist, v_hist = torch.randn(b, s_h, h, d, generator=g), torch.randn(b, s_h, h, d, generator=g)
    idx = torch.tensor([0, 1], dtype=torch.int32).expand(b, h, 2, 2).contiguous()
    counts = torch.full((b, h, 2), 2, dtype=torch.int32)
    cuda = [t.to("cuda", dtype) for t in (q, k, v, k_hist, v_hist)]
    part = dense_attention_with_lse(cuda[0], cuda[1], cuda[2])
    out = block_sparse_attention(cuda[0], cuda[3], cuda[4], idx.cuda(), counts.cuda(), block_m=16, block_n=32,
                                 initial=part, backend="auto").double().cpu()
    want, _ = dense_reference(q, torch.cat([k_hist, k], 1), torch.cat([v_hist, v], 1))
    assert (out - want).abs().max() < (2e-3 if dtype == torch.float16 else 1e-4)
