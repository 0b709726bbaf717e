"""The Wan decoder's 2x nearest upsample + 3x3 conv as one transposed conv (``vae_upsample``), against float64."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

from genkv.pipelines import StreamingVAEDecoder
from genkv.pipelines.self_forcing.vae_upsample import (apply_transposed_upsample, remove_transposed_upsample,
                                                       transposed_kernel)
from genkv.testing import tiny_wan_vae


@pytest.mark.parametrize("mode", ["upsample2d", "upsample3d"])
@pytest.mark.parametrize("size", [(5, 7), (1, 1), (2, 3)])
def test_transposed_conv_equals_upsample_then_conv_in_float64(mode, size):
    resample = WanResample(6, mode).double()
    g = torch.Generator().manual_seed(size[0] * 10 + size[1])
    with torch.no_grad():
        for p in resample.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(4, 6, *size, generator=g, dtype=torch.float64)  # frames folded into the batch
    conv = resample.resample[1]
    expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))  # no float32 round trip
    assert apply_transposed_upsample(resample) == 1
    got = resample.resample(x)
    assert got.shape == expected.shape == (4, 3, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert remove_transposed_upsample(resample) == 1 and "forward" not in resample.resample.__dict__


def test_the_kernel_merges_taps_by_phase():
    """Along each axis the 4 transposed taps are w2, w1 + w2, w0 + w1, w0 (checked on a 1-hot 3x3 kernel)."""
    for i in range(3):
        for j in range(3):
            w = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
            w[0, 0, i, j] = 1
            merged = transposed_kernel(w)[0, 0]
            rows = {0: {2}, 1: {1, 2}, 2: {0, 1}, 3: {0}}
            expected = torch.tensor([[float(i in rows[u] and j in rows[v]) for v in range(4)] for u in range(4)],
                                    dtype=torch.float64)
            torch.testing.assert_close(merged, expected, rtol=0, atol=0)


def test_streamed_decode_with_transposed_upsamplers_matches_the_plain_decoder():
    """Through the whole streaming decoder (its up-samplers rewired; fp32, where WanUpsample's cast is exact)."""
    vae = tiny_wan_vae(seed=4)
    z = torch.randn(1, 16, 7, 4, 4, generator=torch.Generator().manual_seed(2))
    chunks = ((0, 3), (3, 6), (6, 7))

    def streamed(**options):
        decoder = StreamingVAEDecoder(vae, **options)
        with torch.no_grad():
            return torch.cat([decoder.decode(z[:, :, a:b]) for a, b in chunks], dim=2)

    reference = streamed()
    count = sum(isinstance(m, WanResample) and m.mode.startswith("upsample") for m in vae.decoder.modules())
    rewired = streamed(transposed_upsample=True, channels_last=True, conv2d_taps=True)
    patched = sum("forward" in m.__dict__ and isinstance(m, torch.nn.Sequential) for m in vae.decoder.modules())
    assert count > 0 and patched == count
    torch.testing.assert_close(rewired, reference, rtol=1e-4, atol=1e-5)
