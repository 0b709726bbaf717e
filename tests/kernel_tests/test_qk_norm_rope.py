"""The fused q/k RMSNorm + rotary embedding (genkv.kernels.qk_norm_rope): the kernel's output equals the float64
composition of torch's rms_norm and genkv.rope.apply_rotary_emb (the processor's module path) within one rounding
to the output dtype, for ragged head counts, a batch over one table, and queries that are a strided view of a fused
projection. Runs the kernel (the interpreter on a CPU, float32/float16; the GPU in bfloat16 too)."""

from __future__ import annotations

import pytest
import torch

from genkv.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_op, qk_norm_rope_reference
from genkv.rope import apply_rotary_emb
from .test_block_sparse import device_for

DEVICE = device_for("triton")  # the GPU where there is one, else the CPU under the interpreter
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _tables(seq: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables (1, S, 1, D) laid out as Wan's: a pair's cos on its even channel, its sin on its odd one (angles of any
    size). Wan repeats each value on both channels; here the channel not read holds other numbers, so reading the
    wrong one shows."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(1, seq, 1, dim // 2, generator=g, dtype=torch.float64) * 40 - 20
    junk = torch.rand(1, seq, 1, dim // 2, generator=g, dtype=torch.float64) * 3 - 1.5
    cos = torch.stack([torch.cos(angle), junk], dim=-1).flatten(-2)
    sin = torch.stack([-junk, torch.sin(angle)], dim=-1).flatten(-2)
    return cos.float().to(DEVICE), sin.float().to(DEVICE)


def _module_path_float64(x, weight, eps, cos, sin, heads):
    """What GenKVSelfAttnProcessor's module path computes, in float64: norm_q(x), split heads, rotate."""
    normed = torch.nn.functional.rms_norm(x.double(), (x.shape[-1],), weight.double(), eps)
    return apply_rotary_emb(normed.unflatten(-1, (heads, -1)), cos.double(), sin.double())


def _assert_one_rounding(got: torch.Tensor, want64: torch.Tensor) -> None:
    # one rounding to the output dtype (half an ulp) plus float32 arithmetic's error, relative to the row's size
    half_ulp = torch.finfo(got.dtype).eps / 2 * want64.abs()
    slack = 4e-6 * want64.abs().amax(dim=(-2, -1), keepdim=True)
    error = (got.double() - want64).abs()
    assert bool((error <= half_ulp * (1 + 1e-6) + slack).all()), (error - half_ulp - slack).max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq,heads,dim", [(1, 5, 12, 128), (2, 9, 3, 32), (1, 4, 5, 16)])
def test_kernel_equals_the_float64_module_path_within_one_rounding(dtype, batch, seq, heads, dim):
    g = torch.Generator().manual_seed(seq * heads)
    q = (torch.randn(batch, seq, heads * dim, generator=g) * 3).to(dtype).to(DEVICE)
    k = (torch.randn(batch, seq, heads * dim, generator=g) * 0.01 + 0.02).to(dtype).to(DEVICE)  # a small, offset row
    weight_q = (torch.rand(heads * dim, generator=g) + 0.5).to(dtype).to(DEVICE)
    weight_k = (torch.rand(heads * dim, generator=g) - 0.5).to(dtype).to(DEVICE)
    cos, sin = _tables(seq, dim, seed=dim)
    got_q, got_k = qk_norm_rope(q, k, weight_q, weight_k, 1e-6, cos, sin, heads)
    assert got_q.shape == (batch, seq, heads, dim) and got_q.dtype == dtype
    _assert_one_rounding(got_q, _module_path_float64(q, weight_q, 1e-6, cos, sin, heads))
    _assert_one_rounding(got_k, _module_path_float64(k, weight_k, 1e-6, cos, sin, heads))


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_upcast_matches_upstreams_norm_module_then_the_float64_rotation(dtype):
    from genkv.pipelines.self_forcing.numerics import UpcastRMSNorm

    heads, dim, seq = 12, 128, 6
    g = torch.Generator().manual_seed(9)
    norm = UpcastRMSNorm(heads * dim, eps=1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(heads * dim, generator=g) + 0.5)
    q = (torch.randn(1, seq, heads * dim, generator=g) * 2).to(dtype).to(DEVICE)
    cos, sin = _tables(seq, dim, seed=4)
    got, _ = qk_norm_rope(q, q, norm.weight, norm.weight, 1e-6, cos, sin, heads, upcast=True)
    # upstream's module, its output rounded as it rounds it; then the rotation in float64
    want = apply_rotary_emb(norm(q).double().unflatten(-1, (heads, -1)), cos.double(), sin.double())
    _assert_one_rounding(got, want)


def test_queries_and_keys_as_strided_views_of_a_fused_projection():
    heads, dim, seq = 4, 16, 6
    qkv = torch.randn(2, seq, 3 * heads * dim).to(DEVICE)
    q, k = qkv[..., : heads * dim], qkv[..., heads * dim: 2 * heads * dim]  # row stride 3 * heads * dim
    weight = torch.rand(heads * dim).to(DEVICE) + 0.5
    cos, sin = _tables(seq, dim, seed=1)
    got_q, got_k = qk_norm_rope(q, k, weight, weight, 1e-5, cos, sin, heads)
    _assert_one_rounding(got_q, _module_path_float64(q, weight, 1e-5, cos, sin, heads))
    _assert_one_rounding(got_k, _module_path_float64(k, weight, 1e-5, cos, sin, heads))


def test_the_op_on_the_cpu_is_the_reference_and_its_fake_has_the_shapes():
    q, k = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    weight = torch.rand(32) + 0.5
    cos, sin = (t.cpu() for t in _tables(5, 16, seed=2))
    for upcast in (False, True):
        got = qk_norm_rope_op(q, k, weight, weight, 1e-6, cos, sin, 2, upcast)
        want = qk_norm_rope_reference(q, k, weight, weight, 1e-6, cos, sin, 2, upcast)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    torch.library.opcheck(qk_norm_rope_op, (q, k, weight, weight, 1e-6, cos, sin, 2, True))


def test_bad_shapes_are_refused_in_one_line():
    cos, sin = torch.ones(1, 5, 1, 8), torch.zeros(1, 5, 1, 8)
    with pytest.raises(ValueError, match="heads"):
        qk_norm_rope(torch.randn(1, 5, 15), torch.randn(1, 5, 15), torch.ones(15), torch.ones(15), 1e-6, cos, sin, 2)
    with pytest.raises(ValueError, match="rotary tables"):
        qk_norm_rope(torch.randn(1, 4, 16), torch.randn(1, 4, 16), torch.ones(16), torch.ones(16), 1e-6, cos, sin, 2)
