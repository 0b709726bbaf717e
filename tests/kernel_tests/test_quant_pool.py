"""Block means of a quantized history's keys from the codes (genkv.kernels.quant_pool): the Triton kernel (the
interpreter on a CPU) against float64 means of the exactly dequantized keys, on prefix views of a larger buffer
(the layout a cache hands routing), with smoothing factors, several heads and a batch."""

from __future__ import annotations

import pytest
import torch

from genkv.kernels.quant_kv import key_channel_scales, pool_quantized_blocks, quantize_kv
from genkv.kernels.quant_pool import pool_code_blocks

from .test_block_sparse import device_for

DEVICE = device_for("triton")


def _history(kind: str, tokens: int, heads: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, tokens, heads, dim, generator=g)
    k[..., 2:4] *= 25  # an outlier pair: smoothing factors above 1
    k[..., 6:8] *= 0.05  # and one below
    hist = quantize_kv(k, k, kind, key_channel_scale=key_channel_scales(k)).to(DEVICE)
    return hist


def _float64_means(hist, n_blocks: int, block_n: int) -> torch.Tensor:
    """(B, n_blocks, H, D): codes times their token's scale times the smoothing factor, in float64, averaged."""
    codes = hist.k_codes[:, : n_blocks * block_n]
    if hist.kind == "int4":
        values = torch.cat((codes & 15, codes >> 4), -1).double() - 8.0
    else:
        values = codes.double()
    keys = values * hist.k_scale[:, : n_blocks * block_n, :, None].double() * hist.key_channel_scale[:, None].double()
    return keys.unflatten(1, (n_blocks, block_n)).mean(2)


@pytest.mark.parametrize("kind", ["fp8", "int8", "int4"])
@pytest.mark.parametrize("block_n,heads,dim", [(32, 3, 64), (64, 2, 32), (128, 1, 16)])
def test_pooled_code_blocks_equal_float64_means(kind, block_n, heads, dim):
    hist = _history(kind, 5 * block_n + 7, heads, dim, seed=block_n + dim)
    view = hist.prefix(4 * block_n + 3)  # a prefix view: the capacity's strides, a ragged end left out
    got = pool_code_blocks(view, 4, block_n)
    want = _float64_means(view, 4, block_n)
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = want.abs().amax().item()
    assert (got.double() - want).abs().max().item() <= 2e-6 * scale


def test_routing_summary_uses_the_pooled_blocks_and_the_straddling_block():
    # pool_quantized_blocks: whole blocks from the kernel, the straddling block from the tail and current keys
    hist = _history("int8", 3 * 32 + 10, 2, 32, seed=4)
    current = torch.randn(2, 50, 2, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got = pool_quantized_blocks(hist, 32, current_keys=current)  # (B, H, n_blocks, D)
    want = _float64_means(hist, 3, 32).permute(0, 2, 1, 3)
    assert got.shape == (2, 2, 3 + 1 + 1, 32)
    assert (got[:, :, :3].double() - want).abs().max().item() <= 2e-6 * want.abs().amax().item()
    dec = (hist.k_codes[:, 96:].double() * hist.k_scale[:, 96:, :, None].double()
           * hist.key_channel_scale[:, None].double())
    straddle = torch.cat((dec, current[:, :22].double()), 1).mean(1)
    assert (got[:, :, 3].double() - straddle).abs().max().item() <= 1e-5 * straddle.abs().amax().item()


def test_too_many_blocks_are_refused():
    hist = _history("int8", 40, 1, 16, seed=0)
    with pytest.raises(ValueError, match="exceed the history's 40"):
        pool_code_blocks(hist, 2, 32)
