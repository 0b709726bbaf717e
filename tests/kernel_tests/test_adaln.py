"""The fused residual + LayerNorm + modulation kernel (genkv.kernels.adaln) against a float64 reference written
here from diffusers' Wan-block arithmetic: the residual sum rounded to the model's dtype, a LayerNorm of that
rounded row, the affine weight or ``(1 + scale)`` / ``shift``, one rounding; its FP8 codes are torch's
quantization of the kernel's own rounded row (byte for byte but within an ulp of an e4m3 midpoint). Runs the kernel
(the interpreter on a CPU, in float32/float16; the GPU in bfloat16 too)."""

from __future__ import annotations

import pytest
import torch

from genkv.fp8 import quantize_rows
from genkv.kernels.adaln import adaln, adaln_op, adaln_reference
from .test_block_sparse import device_for
from .test_fp8_rows import _assert_codes_match_torch

pytestmark = pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch without float8")

DEVICE = device_for("triton")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
EPS = 1e-6


def _inputs(batch, seq, cols, dtype, seed, per_token=False):
    g = torch.Generator().manual_seed(seed)
    # an offset and a spread per token, so the mean and the variance both matter; the padding of a ragged row (cols
    # not a power of two) must not enter either
    x = torch.randn(batch, seq, cols, generator=g) * (torch.rand(batch, seq, 1, generator=g) * 3 + 0.2) \
        + torch.randn(batch, seq, 1, generator=g) * 2
    delta = torch.randn(batch, seq, cols, generator=g)
    table = torch.randn(batch, 6, cols, generator=g) * 0.5  # Wan's (B, 6, C) float32 modulation, sliced as views
    if per_token:
        table = torch.randn(batch, seq, 6, cols, generator=g) * 0.5
        mods = [t.squeeze(2) for t in table.chunk(6, dim=2)]
    else:
        mods = list(table.chunk(6, dim=1))
    weight, bias = torch.randn(cols, generator=g) + 1, torch.randn(cols, generator=g)
    to = lambda t, dt=torch.float32: t.to(DEVICE, dt)  # noqa: E731
    return to(x, dtype), to(delta, dtype), [to(m) for m in mods], to(weight), to(bias)


def _float64_reference(x, delta, gate, weight, bias, scale, shift, normalize=True, h=None):
    """The block's stretch in float64, rounded where the block rounds (the sum, the output). ``h``: normalize this
    (already rounded) sum instead: where the kernel's float32 sum (a fused multiply-add on a GPU) and the exact one
    round to neighbouring values, the norm is checked on the sum the kernel wrote."""
    if h is None:
        h = x
        if delta is not None:
            h = (x.double() + delta.double() * (gate.double() if gate is not None else 1.0)).to(x.dtype)
    y = h.double()
    if normalize:
        mean = y.mean(-1, keepdim=True)
        y = (y - mean) / torch.sqrt(((y - mean) ** 2).mean(-1, keepdim=True) + EPS)
        if weight is not None:
            y = y * weight.double() + bias.double()
        if scale is not None:
            y = y * (1 + scale.double()) + shift.double()
    return h, y


def _tolerance(dtype, magnitude):
    # one rounding of the output plus float32 arithmetic (and the sum's rounding feeding the norm) on the way
    return {torch.float32: 2e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype] * magnitude


STRETCHES = {
    "norm1": dict(modulated=True),                               # norm1(h) * (1 + scale) + shift
    "norm2": dict(delta=True, gated=True, affine=True),          # h + attn1 * gate, affine LayerNorm
    "norm2-identity": dict(delta=True, gated=True, normalize=False),
    "norm3": dict(delta=True, modulated=True),                   # h + attn2, norm3(h) * (1 + c_scale) + c_shift
}


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("stretch", sorted(STRETCHES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 48), (1, 7, 100), (1, 3, 1536)])
def test_each_block_stretch_equals_float64(shape, dtype, stretch, quantize, per_token):
    spec = STRETCHES[stretch]
    x, delta, mods, weight, bias = _inputs(*shape, dtype, seed=shape[2] + len(stretch), per_token=per_token)
    shift, scale, gate = mods[0], mods[1], mods[2]
    args = dict(delta=delta if spec.get("delta") else None, gate=gate if spec.get("gated") else None,
                weight=weight if spec.get("affine") else None, bias=bias if spec.get("affine") else None,
                scale=scale if spec.get("modulated") else None, shift=shift if spec.get("modulated") else None)
    normalize = spec.get("normalize", True)
    h, normed, codes, code_scale = adaln(x, **args, eps=EPS, normalize=normalize, write_normed=True,
                                         quantize=quantize)
    want_h, _ = _float64_reference(x, **args, normalize=normalize)
    if args["delta"] is not None:
        assert h.dtype == x.dtype and h.shape == x.shape
        # the sum is rounded once: equal, or one rounding step apart where float32 and float64 sums straddle a tie
        assert (h.double() - want_h.double()).abs().max().item() <= _tolerance(dtype, want_h.abs().max().item())
        _, want_y = _float64_reference(x, **args, normalize=normalize, h=h)
    else:
        assert h.numel() == 0
        _, want_y = _float64_reference(x, **args, normalize=normalize)
    assert normed.dtype == x.dtype and normed.shape == x.shape
    error = (normed.double() - want_y).abs().max().item()
    assert error <= _tolerance(dtype, want_y.abs().max().item()), error
    if quantize:
        want_codes, want_scale = quantize_rows(normed.reshape(-1, shape[2]))
        assert code_scale.shape == (shape[0] * shape[1], 1) and torch.equal(code_scale, want_scale)
        _assert_codes_match_torch(normed.reshape(-1, shape[2]), codes, want_codes, code_scale)
    else:
        assert codes.numel() == 0 and code_scale.numel() == 0


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32])
def test_the_norm_reads_the_sum_rounded_to_the_models_dtype(dtype):
    # rows far from zero with a small spread: rounding the sum moves each value by up to half an ulp at 64 (1/32 in
    # float16), a sizeable part of the spread, so a norm of the unrounded sum is visibly off
    g = torch.Generator().manual_seed(11)
    x = (64 + torch.randn(1, 9, 96, generator=g)).to(DEVICE, dtype)
    delta = (torch.randn(1, 9, 96, generator=g) * 0.3).to(DEVICE, dtype)
    gate = (torch.rand(1, 1, 96, generator=g) + 0.5).to(DEVICE)
    h, normed, _, _ = adaln(x, delta, gate, None, None, None, None, EPS, True, True, False)
    _, want = _float64_reference(x, delta, gate, None, None, None, None, h=h)
    assert (normed.double() - want).abs().max().item() <= _tolerance(dtype, want.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_alone_equal_the_codes_written_next_to_the_row(dtype):
    # the FP8 path writes codes without the normalized row: the same codes and scales as with it
    x, delta, mods, _, _ = _inputs(2, 6, 96, dtype, seed=3)
    with_row = adaln(x, delta, None, None, None, mods[4], mods[3], EPS, True, True, True)
    codes_only = adaln(x, delta, None, None, None, mods[4], mods[3], EPS, True, False, True)
    assert codes_only[1].numel() == 0
    assert torch.equal(codes_only[0], with_row[0])
    assert torch.equal(codes_only[2].view(torch.uint8), with_row[2].view(torch.uint8))
    assert torch.equal(codes_only[3], with_row[3])


def test_the_op_and_its_torch_reference_agree_and_the_fake_has_their_shapes():
    x, delta, mods, weight, bias = _inputs(2, 4, 64, torch.float32, seed=5)
    x, delta, mods = x.cpu(), delta.cpu(), [m.cpu() for m in mods]
    for args in [(x, None, None, None, None, mods[1], mods[0], EPS, True, True, True),
                 (x, delta, mods[2], weight.cpu(), bias.cpu(), None, None, EPS, True, False, True),
                 (x, delta, None, None, None, mods[4], mods[3], EPS, True, True, False),
                 # the FP8 path's first call (codes alone: two empty outputs) and a stretch without a norm
                 (x, None, None, None, None, mods[1], mods[0], EPS, True, False, True),
                 (x, delta, mods[2], None, None, None, None, EPS, False, True, False)]:
        got, want = adaln_op(*args), adaln_reference(*args)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            assert torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g,
                               w.view(torch.uint8) if w.dtype == torch.float8_e4m3fn else w)
        torch.library.opcheck(adaln_op, args, test_utils=("test_schema", "test_faketensor"))


def test_bad_shapes_are_refused_in_one_line():
    x = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="delta must have x's shape"):
        adaln(x, torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="scale must broadcast"):
        adaln(x, scale=torch.randn(1, 1, 16), shift=torch.randn(1, 1, 16))
    with pytest.raises(ValueError, match="come in pairs"):
        adaln(x, weight=torch.ones(32))
    with pytest.raises(ValueError, match="a gate multiplies delta"):
        adaln(x, gate=torch.ones(1, 1, 32))
