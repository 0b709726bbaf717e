"""The fused sum of partial convolutions + per-channel bias (``genkv.kernels.tap_sum``) against float64."""

import os

import pytest
import torch

from genkv.kernels.tap_sum import sum_partials

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"  # the Triton kernel: on the GPU, or under the interpreter on the CPU


def float64_sum(partials, bias):
    total = sum(p.double() for p in partials)
    return total if bias is None else total + bias.double().view(1, -1, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sum_of_partials_and_bias_matches_float64_and_keeps_the_layout(dtype, layout, count, with_bias):
    g = torch.Generator().manual_seed(count * 2 + with_bias)
    shape = (3, 7, 5, 11)  # numel 1155: not a multiple of the kernel's block, channels prime
    partials = [torch.randn(shape, generator=g).to(dtype) for _ in range(count)]
    if layout == "channels_last":
        partials = [p.contiguous(memory_format=torch.channels_last) for p in partials]
    bias = torch.randn(shape[1], generator=g).to(dtype) if with_bias else None
    on_device = [p.to(DEVICE) for p in partials]
    out = sum_partials(on_device, None if bias is None else bias.to(DEVICE))
    assert out.dtype == dtype and out.stride() == on_device[0].stride()
    expected = float64_sum(partials, bias)
    # One rounding of a float32 sum: within the output dtype's half-ulp (plus float32's own, for fp32).
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.cpu().double(), expected, **tol)


def test_a_bias_on_the_wrong_channel_is_caught():
    """The channel of a flat offset differs between layouts: a bias indexed as if contiguous would be wrong here."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    bias = torch.arange(4, dtype=torch.float32) * 10
    out = sum_partials([x.to(DEVICE)], bias.to(DEVICE)).cpu()
    for c in range(4):
        torch.testing.assert_close(out[:, c] - x[:, c], torch.full_like(x[:, c], 10.0 * c))


def test_mixed_layouts_and_float64_take_the_reference_and_a_fifth_partial_is_refused():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    b = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sum_partials([a, b], bias), a + b + bias.view(1, 3, 1, 1), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="1 to 4 partials"):
        sum_partials([a, a, a, a, a])
