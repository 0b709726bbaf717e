"""The epilogue of a convolution computed as several partial convolutions: their sum plus a per-channel bias, in
one pass.

The Wan VAE decoder's causal 3-D convolutions run as one 2-D convolution per temporal tap (``vae_conv``). Summing
the taps with ``add_`` and letting cuDNN's wrapper add the bias costs a full read-modify-write of the activation per
tap and another for the bias (~17 ms of a 150 ms chunk decode on an H200 at the 96-channel, 480 x 832 stage, which is
memory-bound work). :func:`sum_partials` reads each partial once, adds in float32, adds the bias and writes once,
rounding a single time to the partials' dtype (the ``add_`` chain rounds after every term).

The partials must share one dense layout (what ``conv2d`` returns: contiguous or channels-last); the output has it
too. On CUDA (or under ``TRITON_INTERPRET=1``) a Triton kernel runs; elsewhere :func:`sum_partials_reference`.

Example:
    >>> import torch
    >>> parts = [torch.randn(2, 3, 4, 5, dtype=torch.float64) for _ in range(3)]
    >>> bias = torch.randn(3, dtype=torch.float64)
    >>> out = sum_partials(parts, bias)
    >>> torch.allclose(out, parts[0] + parts[1] + parts[2] + bias.view(1, 3, 1, 1))
    True
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .block_sparse import triton_runs_on

MAX_PARTIALS = 4  # a 3-tap convolution's partials and a residual
_BLOCK = 2048


@triton.jit
def _sum_partials_kernel(p0, p1, p2, p3, bias, out, numel, channels, channel_stride,
                         PARTIALS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # Flat offsets: every operand has the same dense layout, so one index addresses the same element in each.
    # int64 because a 12-frame 192-channel 480 x 832 activation has ~9.2e8 elements, near int32's limit.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    acc = tl.load(p0 + offsets, mask=mask, other=0.0).to(tl.float32)
    if PARTIALS > 1:
        acc += tl.load(p1 + offsets, mask=mask, other=0.0).to(tl.float32)
    if PARTIALS > 2:
        acc += tl.load(p2 + offsets, mask=mask, other=0.0).to(tl.float32)
    if PARTIALS > 3:
        acc += tl.load(p3 + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        # In a dense layout the channel of flat offset i is (i // stride of the channel dim) % channels:
        # i % channels for channels-last, (i // (H * W)) % channels for contiguous NCHW.
        channel = (offsets // channel_stride) % channels
        acc += tl.load(bias + channel, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + offsets, acc.to(out.dtype.element_ty), mask=mask)


def sum_partials_reference(partials: list[torch.Tensor], bias: torch.Tensor | None = None) -> torch.Tensor:
    """``sum(partials) + bias`` (bias per channel, dim 1), computed in float32 (or wider) and rounded once."""
    compute = torch.promote_types(partials[0].dtype, torch.float32)
    acc = partials[0].to(compute)
    for part in partials[1:]:
        acc = acc + part.to(compute)
    if bias is not None:
        acc = acc + bias.to(compute).view(1, -1, *([1] * (partials[0].dim() - 2)))
    return acc.to(partials[0].dtype)


def _use_triton(tensor: torch.Tensor) -> bool:
    # (Triton on the GPU has no fp64 tensor path worth taking here)
    return tensor.dtype != torch.float64 and triton_runs_on(tensor)


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides wherever a dim has more than one element (a size-1 dim's stride is never
    used, and PyTorch sets it freely), so one flat offset addresses the same element in both."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def _dense(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))


def sum_partials(partials: list[torch.Tensor], bias: torch.Tensor | None = None) -> torch.Tensor:
    """The sum of 1 to 4 same-shaped partial results plus a per-channel ``bias`` (over dim 1), in one pass.

    Partials in one dense layout (contiguous or channels-last) take the Triton kernel on CUDA; anything else
    (another layout, float64, a CPU tensor outside the interpreter) takes :func:`sum_partials_reference`, which
    computes the same thing.
    """
    if not 1 <= len(partials) <= MAX_PARTIALS:
        raise ValueError(f"sum_partials takes 1 to {MAX_PARTIALS} partials, got {len(partials)}")
    first = partials[0]
    same = all(same_layout(p, first) and p.dtype == first.dtype and p.device == first.device for p in partials)
    if not (same and _dense(first) and _use_triton(first)):
        return sum_partials_reference(partials, bias)
    out = torch.empty_like(first)  # preserve_format: a dense input's strides exactly
    numel = first.numel()
    operands = list(partials) + [first] * (MAX_PARTIALS - len(partials))  # unused slots: never read
    bias_arg = bias.contiguous() if bias is not None else first
    grid = (triton.cdiv(numel, _BLOCK),)
    _sum_partials_kernel[grid](*operands, bias_arg, out, numel, first.shape[1], first.stride(1),
                               PARTIALS=len(partials), HAS_BIAS=bias is not None, BLOCK=_BLOCK)
    return out
