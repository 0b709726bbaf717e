"""The one-pass FP8 row quantization (genkv.kernels.fp8_rows): without an activation its scales are bit-identical
to genkv.fp8.quantize_rows's and so are its codes (torch's own e4m3 cast), but for values within an ulp of a
rounding midpoint; with a GELU every dequantized value is within half an e4m3 step (plus the float32 GELU's own
error) of the float64 GELU, and its scale is the float64 amax / 448. The e4m3 byte helper equals torch's cast on
every value and midpoint. Runs the kernels (the interpreter on a CPU, in float32/float16; the GPU in bfloat16
too)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from genkv.fp8 import quantize_rows
from genkv.kernels.fp8_rows import fp8_quantize_rows_op, quantize_rows_fp8, quantize_rows_fp8_reference
from genkv.kernels.quant_write import _e4m3_bits
from .test_block_sparse import device_for

pytestmark = pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch without float8")

DEVICE = device_for("triton")  # the GPU where there is one, else the CPU under the interpreter
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _rows(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes, an all-zero row and signed zeros: the per-row scale, its floor and the
    # sign of a code that rounds to zero are all checked
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 2, rows)[:, None]
    x[rows // 2] = 0.0
    x[0, : cols // 2] = -0.0
    return x.to(dtype).to(DEVICE)


def _e4m3_values() -> torch.Tensor:
    """Every finite float8 e4m3fn value, ascending (float32)."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return values[values.isfinite()].sort().values


def _e4m3_half_step(v: torch.Tensor) -> torch.Tensor:
    """Half the spacing of e4m3 values around |v| (float64): 2^(exponent - 4), exponent floored at -6."""
    exponent = torch.floor(torch.log2(v.abs().clamp(min=2.0 ** -6))).clamp(min=-6)
    return torch.exp2(exponent - 4)


def _assert_codes_match_torch(x: torch.Tensor, codes: torch.Tensor, want_codes: torch.Tensor, scale: torch.Tensor):
    """Byte for byte (so -0 and +0 differ), except where the exact x / scale lies within a float32 ulp or two of
    the midpoint between the two codes (the kernel multiplies by 1 / scale): there one step apart."""
    differ = codes.view(torch.uint8) != want_codes.view(torch.uint8)
    if not differ.any():
        return
    exact = (x.double() / scale.double())[differ]
    got, want = codes.double()[differ], want_codes.double()[differ]
    one_step = (got - want).abs() <= 2 * _e4m3_half_step(exact) * (1 + 1e-9)
    at_midpoint = (exact - (got + want) / 2).abs() <= 3 * 2.0 ** -23 * exact.abs()
    assert bool((one_step & at_midpoint).all()), (exact, got, want)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [1, 7, 96, 1000, 1536, 4100])
def test_codes_and_scales_equal_torch_without_activation(dtype, cols, tiled):
    x = _rows(19, cols, dtype, seed=cols)
    codes, scale = quantize_rows_fp8(x, tiled=tiled)  # 4100 columns: three sweeps of 2048, the last ragged
    want_codes, want_scale = quantize_rows(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (19, 1) and scale.dtype == torch.float32
    assert torch.equal(scale, want_scale)
    _assert_codes_match_torch(x, codes, want_codes, scale)


def test_codes_at_rounding_midpoints_round_to_even_with_the_sign_kept():
    # rows whose x / scale land exactly on e4m3 values and on the midpoints between them (scale 1: amax 448),
    # negative ones included: ties to even, and -0 for a negative value rounding to zero
    values = _e4m3_values()
    midpoints = (values[1:] + values[:-1]) / 2
    row = torch.cat([values, midpoints, -midpoints, torch.tensor([-2.0 ** -11, 2.0 ** -11, -0.0])])
    x = torch.cat([row, torch.full((row.numel() % 2,), 448.0)]).reshape(2, -1).to(DEVICE)
    x[:, 0] = 448.0  # the scale of both rows exactly 1
    codes, scale = quantize_rows_fp8(x)
    want_codes, want_scale = quantize_rows(x)
    assert torch.equal(scale, want_scale) and bool((scale == 1).all())
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))


def test_rows_too_long_for_registers_take_the_two_sweep_kernel(monkeypatch):
    import genkv.kernels.fp8_rows as fp8_rows

    launched = []
    monkeypatch.setattr(fp8_rows, "_quantize_rows_kernel", None)  # the one-pass kernel must not be launched
    tiled = fp8_rows._quantize_rows_tiled_kernel
    monkeypatch.setattr(fp8_rows, "_quantize_rows_tiled_kernel",
                        type("Spy", (), {"__getitem__": lambda self, grid: launched.append(grid) or tiled[grid]})())
    x = _rows(2, 33000, torch.float32, seed=5)
    codes, scale = quantize_rows_fp8(x, "gelu_tanh", tiled=False)  # asked one pass, but the row does not fit
    assert launched == [(2,)]
    want_codes, want_scale = quantize_rows_fp8_reference(x, "gelu_tanh")
    assert torch.allclose(scale, want_scale, rtol=1e-6, atol=0)
    assert (codes.view(torch.uint8) != want_codes.view(torch.uint8)).float().mean().item() < 1e-3


@pytest.mark.parametrize("cols", [1, 2, 3, 7, 96, 1000, 1536, 5120, 8960, 13824, 32768])
def test_a_row_is_held_as_power_of_two_pieces_that_cover_it(cols):
    from genkv.kernels.fp8_rows import _row_pieces

    pieces = _row_pieces(cols)
    assert all(p == 0 or p & (p - 1) == 0 for p in pieces)
    assert pieces[0] <= cols <= sum(pieces) and pieces[0] + pieces[1] <= cols  # only the last piece is padded
    assert sum(pieces) < 1.2 * cols + 1  # the padding is small (a single block holds up to 2x)
    assert (pieces[1] == 0) <= (pieces[2] == 0)  # no gap


@pytest.mark.parametrize("piece", [0, 1, 2])
def test_the_amax_is_taken_over_every_piece_of_the_row(piece):
    # 1000 columns are pieces of 512, 256 and 256 (232 of them inside): the row's largest value in each piece
    cols, where = 1000, (100, 700, 990)[piece]
    x = _rows(3, cols, torch.float32, seed=11)
    x[:, where] = x.abs().amax(dim=-1) * 3
    codes, scale = quantize_rows_fp8(x, "gelu_tanh", tiled=False)
    want_codes, want_scale = quantize_rows_fp8_reference(x, "gelu_tanh")
    assert torch.allclose(scale, want_scale, rtol=1e-6, atol=0)
    assert (codes.view(torch.uint8) != want_codes.view(torch.uint8)).float().mean().item() < 1e-3


def test_strided_rows_are_read_in_place():
    x = _rows(11, 160, torch.float32, seed=3)[:, 16:112]  # a column slice: row stride 160, 96 columns
    codes, scale = quantize_rows_fp8(x)
    want_codes, want_scale = quantize_rows(x.contiguous())
    assert torch.equal(scale, want_scale)
    _assert_codes_match_torch(x, codes, want_codes, scale)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation,approximate", [("gelu", "none"), ("gelu_tanh", "tanh")])
def test_gelu_then_quantize_matches_the_float64_gelu_within_half_a_step(dtype, activation, approximate, tiled):
    cols = 2500 if tiled else 1000  # tiled: a full sweep of 2048 and a ragged one
    x = _rows(23, cols, dtype, seed=7) * 4 if dtype != torch.float16 else _rows(23, cols, dtype, seed=7)
    codes, scale = quantize_rows_fp8(x, activation, tiled=tiled)
    gelu = torch.nn.functional.gelu(x.double(), approximate=approximate)
    amax = gelu.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    assert torch.allclose(scale.double(), amax / 448, rtol=1e-6, atol=0)
    scale64 = scale.double()
    error = (codes.double() * scale64 - gelu).abs()
    # half an e4m3 step of the scaled value, plus the float32 GELU's own error (a few ulps of the row's amax)
    bound = _e4m3_half_step(gelu / scale64) * scale64 * (1 + 1e-6) + 4e-7 * amax
    assert bool((error <= bound).all()), (error - bound).max().item()
    # and the float64 GELU rounded to float32 (the correctly rounded float32 GELU), cast by torch, agrees code for
    # code almost everywhere: only values within the kernel's float32 GELU error of a rounding boundary may differ,
    # by one step. Not torch's own float32 GELU: its vectorised erf depends on the CPU (with AVX2 alone it is off
    # by up to 8% in the far negative tail and gives gelu(-0.0) = +0.0), which moved 13-19% of the codes there.
    want, _ = quantize_rows(gelu.float())
    differ = codes.view(torch.uint8) != want.view(torch.uint8)
    assert differ.float().mean().item() < 1e-3
    assert ((codes.double() - want.double()).abs() * scale64 <= 2 * _e4m3_half_step(gelu / scale64) * scale64
            + 1e-30).all()


def test_the_op_on_the_cpu_is_the_reference_and_its_fake_has_the_shapes():
    x = torch.randn(9, 40)
    for activation in ("none", "gelu", "gelu_tanh"):
        codes, scale = fp8_quantize_rows_op(x, activation)
        want_codes, want_scale = quantize_rows_fp8_reference(x, activation)
        assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8)) and torch.equal(scale, want_scale)
    torch.library.opcheck(fp8_quantize_rows_op, (x, "gelu_tanh"))


def test_bad_activation_or_shape_is_refused_in_one_line():
    with pytest.raises(ValueError, match="activation must be one of"):
        quantize_rows_fp8(torch.randn(2, 8), "relu")
    with pytest.raises(ValueError, match="must be 2-D"):
        quantize_rows_fp8(torch.randn(2, 3, 8))


def _e4m3_probe_values() -> torch.Tensor:
    """Every finite e4m3 value, every midpoint between neighbours and the float32 numbers on either side of it,
    random values over the whole range and near zero, and signed zeros."""
    values = _e4m3_values()
    mids = (values[1:] + values[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    return torch.cat([values, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1),
                      (torch.randn(20000, generator=g) * 60).clamp(-448, 448), torch.randn(5000, generator=g) * 1e-3,
                      torch.tensor([0.0, -0.0, 1e-30, -1e-30, 448.0, -448.0])])


@triton.jit
def _e4m3_probe(X, Out, n, EMULATE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    tl.store(Out + offs, _e4m3_bits(tl.load(X + offs, mask=inside, other=0.0), EMULATE), mask=inside)


@pytest.mark.parametrize("emulate", [True] + ([False] if DEVICE == "cuda" else []))
def test_e4m3_bytes_equal_torchs_cast_on_every_value_and_midpoint(emulate):
    x = _e4m3_probe_values().to(DEVICE)
    out = torch.empty(x.numel(), dtype=torch.uint8, device=DEVICE)
    _e4m3_probe[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), EMULATE=emulate, BLOCK=1024)
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(out, want), x[out != want][:8]
