"""Per-row e4m3 quantization of an activation in one pass, optionally after a GELU (issue 20, the FP8 path).

Every FP8 linear quantizes its input per token: ``scale = max(amax of the row, 1e-12) / 448``, ``codes =
e4m3(clamp(x / scale, -448, 448))``. Under ``torch.compile`` Inductor fuses that into the kernel before it, but
where the row is long it emits a looped reduction that reads the row twice and recomputes what produced it. The
largest case is the FFN: the GELU of a 4680 x 8960 activation, quantized for the second linear, took 152 us a call
on an H100 (22.8 ms of a 268 ms chunk at Wan2.1-1.3B shapes, `eval/profile_ops.py --fp8`, 2026-12-05), ~4x what
its bytes need. The attention outputs, produced by genkv's own attention ops, are quantized by a separate Inductor
kernel too (19 us for 14 MB).

:func:`quantize_rows_fp8` reads each row once into registers (one program per row, the row held as up to three
power-of-two pieces so that the activation's arithmetic does not run on padding), applies the activation in
float32, takes the row's amax, and writes the codes and the float32 scale: one read of the input and one write of
a byte per element: 78.4 us for that FFN case and 11.1 us for an attention output, against the compiled ops'
153.8 and 18.2 (H100, ``eval/bench_fused_ops.py``). The scales are bit-identical to
:func:`genkv.fp8.quantize_rows`'s (a float32 product), and so are the codes except where ``x / scale`` lies within
a float32 ulp of a rounding midpoint of e4m3 (there they may be one step apart): the kernel multiplies by the row's
inverse scale instead of dividing every element (tested). On a GPU it converts with the hardware's e4m3 instruction;
under the interpreter, whose conversion rounds twice, the byte is computed in integer arithmetic.
With an activation the GELU is computed in float32 and quantized directly, without first rounding it to the
model's dtype as the unfused path does: that is one rounding fewer, 2^-9 of a value against e4m3's 2^-4.

:data:`fp8_quantize_rows_op` wraps it as the custom op ``genkv::fp8_quantize_rows`` so that compiled blocks call it
as one opaque kernel (CUDA graphs record it). The op runs the kernel on CUDA; elsewhere it computes the same in
torch (:func:`quantize_rows_fp8_reference`), as the CPU is for tests. Under ``TRITON_INTERPRET=1`` the kernel
itself runs on CPU tensors through :func:`quantize_rows_fp8`.

Example (CPU):
    >>> import torch
    >>> from genkv.kernels.fp8_rows import fp8_quantize_rows_op
    >>> x = torch.randn(4, 96)
    >>> codes, scale = fp8_quantize_rows_op(x, "gelu_tanh")
    >>> codes.dtype, tuple(scale.shape)
    (torch.float8_e4m3fn, (4, 1))
    >>> gelu = torch.nn.functional.gelu(x, approximate="tanh")
    >>> bool(((codes.float() * scale - gelu).abs().max() <= scale.max() * 16).item())  # within an e4m3 step
    True
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from genkv.fp8 import AMAX_FLOOR, E4M3_MAX, INV_E4M3_MAX, quantize_rows

from .quant_write import _e4m3_bits

__all__ = ["ACTIVATIONS", "quantize_rows_fp8", "quantize_rows_fp8_reference", "fp8_quantize_rows_op"]

ACTIVATIONS = {None: 0, "none": 0, "gelu": 1, "gelu_tanh": 2}  # "gelu": erf GELU; "gelu_tanh": tanh approximation
# genkv.fp8's rule (the scale is amax times float32(1/448), the same on every device), as kernel constants
_E4M3_MAX = tl.constexpr(E4M3_MAX)
_INV_E4M3_MAX = tl.constexpr(INV_E4M3_MAX)
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
_MAX_COLS = 32768  # the one-pass kernel holds a row in registers: longer rows take the two-sweep kernel


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 1:
        out = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        # 0.5 * x * (1 + tanh(u)) = x / (1 + exp(-2u)): no cancellation in the negative tail, where 1 + tanh(u)
        # computed as written loses most of its digits; exp overflowing to inf gives -0, the limit
        out = x / (1.0 + tl.exp(tl.minimum(-2.0 * inner, 80.0)))  # e^80: past it the quotient is ~0 anyway
    else:
        out = x
    return out


@triton.jit
def _row_scale(amax):
    # the row's float32 scale and its correctly rounded inverse: the codes multiply by the inverse rather than divide
    # every element by the scale (within an ulp of x / scale)
    scale = tl.maximum(amax, _AMAX_FLOOR) * _INV_E4M3_MAX
    return scale, tl.math.div_rn(1.0, scale)


@triton.jit
def _codes(x, inverse, EMULATE: tl.constexpr):
    return _e4m3_bits(tl.minimum(tl.maximum(x * inverse, -_E4M3_MAX), _E4M3_MAX), EMULATE)


@triton.jit
def _piece(x_row, start, n_cols, SIZE: tl.constexpr, ACT: tl.constexpr):
    cols = start + tl.arange(0, SIZE)
    inside = cols < n_cols
    x = _activation(tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32), ACT)
    return x, cols, inside  # both GELUs map the padding's 0 to 0, so it never raises the amax


@triton.jit
def _quantize_rows_kernel(X, Codes, Scale, n_cols, stride_x, stride_codes, ACT: tl.constexpr,
                          PIECE_A: tl.constexpr, PIECE_B: tl.constexpr, PIECE_C: tl.constexpr,
                          EMULATE: tl.constexpr):
    # The row is held in registers as up to three power-of-two pieces end to end (see _row_pieces): 8960 columns
    # as 8192 + 512 + 256 rather than one 16384-wide block, whose padding would take the GELU's arithmetic too
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    codes_row = Codes + row * stride_codes
    x_a, cols_a, inside_a = _piece(x_row, 0, n_cols, PIECE_A, ACT)
    amax = tl.max(tl.abs(x_a), axis=0)
    if PIECE_B > 0:
        x_b, cols_b, inside_b = _piece(x_row, PIECE_A, n_cols, PIECE_B, ACT)
        amax = tl.maximum(amax, tl.max(tl.abs(x_b), axis=0))
    if PIECE_C > 0:
        x_c, cols_c, inside_c = _piece(x_row, PIECE_A + PIECE_B, n_cols, PIECE_C, ACT)
        amax = tl.maximum(amax, tl.max(tl.abs(x_c), axis=0))
    scale, inverse = _row_scale(amax)
    tl.store(codes_row + cols_a, _codes(x_a, inverse, EMULATE), mask=inside_a)
    if PIECE_B > 0:
        tl.store(codes_row + cols_b, _codes(x_b, inverse, EMULATE), mask=inside_b)
    if PIECE_C > 0:
        tl.store(codes_row + cols_c, _codes(x_c, inverse, EMULATE), mask=inside_c)
    tl.store(Scale + row, scale)


@triton.jit
def _quantize_rows_tiled_kernel(X, Codes, Scale, n_cols, stride_x, stride_codes,
                                ACT: tl.constexpr, TILE: tl.constexpr, EMULATE: tl.constexpr):
    # The same result as _quantize_rows_kernel in two sweeps of TILE columns (the amax, then the codes; the row is
    # read twice, the second time mostly from L2): a few registers a thread, so many rows are in flight per SM
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, TILE)
    x_row = X + row * stride_x
    amax = tl.zeros([TILE], dtype=tl.float32)
    for start in range(0, n_cols, TILE):
        inside = start + cols < n_cols
        x = _activation(tl.load(x_row + start + cols, mask=inside, other=0.0).to(tl.float32), ACT)
        amax = tl.maximum(amax, tl.abs(x))
    scale, inverse = _row_scale(tl.max(amax, axis=0))
    for start in range(0, n_cols, TILE):
        inside = start + cols < n_cols
        x = _activation(tl.load(x_row + start + cols, mask=inside, other=0.0).to(tl.float32), ACT)
        tl.store(Codes + row * stride_codes + start + cols, _codes(x, inverse, EMULATE), mask=inside)
    tl.store(Scale + row, scale)


def _row_pieces(cols: int) -> tuple[int, int, int]:
    """``cols`` as up to three power-of-two pieces laid end to end (0 for an absent piece): the largest power of
    two within it, the same of what is left, and the rest rounded up to a power of two (its tail masked). 1536 is
    1024 + 512, 8960 is 8192 + 512 + 256, 13824 is 8192 + 4096 + 2048: the padding a single power-of-two block
    would carry (16384 lanes for 8960 columns) is mostly gone."""
    first = 1 << (cols.bit_length() - 1)
    rest = cols - first
    second = 1 << (rest.bit_length() - 1) if rest else 0
    rest -= second
    return first, second, triton.next_power_of_2(rest) if rest else 0


def _activation_reference(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    xf = x.float()
    if activation in (None, "none"):
        return xf
    return torch.nn.functional.gelu(xf, approximate="tanh" if activation == "gelu_tanh" else "none")


def quantize_rows_fp8_reference(x: torch.Tensor, activation: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`quantize_rows_fp8` computes, in torch: the activation in float32, then
    :func:`genkv.fp8.quantize_rows` (``(codes (M, N) float8_e4m3fn, scale (M, 1) float32)``)."""
    return quantize_rows(_activation_reference(x, activation))


def _check(x: torch.Tensor, activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of none, gelu, gelu_tanh; got {activation!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, columns); got shape {tuple(x.shape)}")


#: rows at least this long take the two-sweep kernel (``tiled`` below; env ``GENKV_FP8_ROWS_TILED_FROM``). At Wan
#: shapes one pass won (8960 columns: 78.4 against 85.7 us, H100), so only rows too long for registers sweep twice.
TILED_FROM_COLS: int = int(os.environ.get("GENKV_FP8_ROWS_TILED_FROM", "0")) or _MAX_COLS + 1
_TILE = 2048


def quantize_rows_fp8(x: torch.Tensor, activation: str | None = None, tiled: bool | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 codes and float32 scales ``(M, 1)`` of ``activation(x)`` for a 2-D ``x``, in one Triton pass.

    Runs the kernel on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU ones (float32 / float16 there: the
    interpreter computes bfloat16 wrongly); float64 inputs and devices Triton does not run on get
    :func:`quantize_rows_fp8_reference`. ``tiled``: the two-sweep kernel (the same result; the default takes it for
    rows from :data:`TILED_FROM_COLS` columns, and always past 32768).
    """
    from .block_sparse import triton_runs_on

    _check(x, activation)
    rows, cols = x.shape
    if not triton_runs_on(x) or x.dtype == torch.float64 or rows == 0 or cols == 0:
        return quantize_rows_fp8_reference(x, activation)
    if x.stride(-1) != 1:
        x = x.contiguous()
    codes = torch.empty(rows, cols, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
    if cols > _MAX_COLS:
        tiled = True  # too long for one program's registers
    elif tiled is None:
        tiled = cols >= TILED_FROM_COLS
    if tiled:
        _quantize_rows_tiled_kernel[(rows,)](
            x, codes.view(torch.uint8), scale, cols, x.stride(0), codes.stride(0),
            ACT=ACTIVATIONS[activation], TILE=min(_TILE, triton.next_power_of_2(cols)), EMULATE=not x.is_cuda,
            num_warps=4,
        )
        return codes, scale
    _launch_one_pass(x, codes, scale, activation, _row_pieces(cols))
    return codes, scale


def _launch_one_pass(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, activation: str | None,
                     pieces: tuple[int, int, int]) -> None:
    """:func:`_quantize_rows_kernel` over ``x``'s rows held as ``pieces`` (``eval/bench_fused_ops.py`` also
    launches it as one power-of-two block, the layout before the pieces)."""
    _quantize_rows_kernel[(x.shape[0],)](
        x, codes.view(torch.uint8), scale, x.shape[1], x.stride(0), codes.stride(0), ACT=ACTIVATIONS[activation],
        PIECE_A=pieces[0], PIECE_B=pieces[1], PIECE_C=pieces[2], EMULATE=not x.is_cuda,
        # warps by the row's power-of-two span, as measured before the pieces (16 for Wan's 8960 columns)
        num_warps=max(4, min(16, triton.next_power_of_2(sum(pieces)) // 1024)),
    )


@torch.library.custom_op("genkv::fp8_quantize_rows", mutates_args=())
def fp8_quantize_rows_op(x: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``genkv::fp8_quantize_rows``: :func:`quantize_rows_fp8` on CUDA, the torch reference elsewhere."""
    if x.is_cuda:
        return quantize_rows_fp8(x, activation)
    return quantize_rows_fp8_reference(x, activation)


@fp8_quantize_rows_op.register_fake
def _(x, activation):
    _check(x, activation)
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
            x.new_empty((x.shape[0], 1), dtype=torch.float32))
