"""The Wan VAE decoder's causal 3-D convolutions as per-tap 2-D convolutions: same pixels (float64 reference)."""

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from genkv.pipelines import StreamingVAEDecoder
from genkv.pipelines.self_forcing.vae_conv import apply_conv2d_taps, remove_conv2d_taps
from genkv.testing import tiny_wan_vae

CHUNKS = ((0, 3), (3, 6), (6, 7))  # uneven, as the last chunk of a render


def streamed(vae, z, **options):
    decoder = StreamingVAEDecoder(vae, **options)
    return torch.cat([decoder.decode(z[:, :, a:b]) for a, b in CHUNKS], dim=2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_streaming_decode_by_taps_equals_the_3d_convolutions(channels_last):
    vae = tiny_wan_vae(seed=4).double()
    z = torch.randn(1, 16, 7, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reference = streamed(vae, z)
    by_taps = streamed(vae, z, channels_last=channels_last, conv2d_taps=True)
    torch.testing.assert_close(by_taps, reference, rtol=0, atol=1e-12)
    assert remove_conv2d_taps(vae.decoder) > 0


def test_one_convolution_with_a_cache_and_strided_space_matches():
    conv = WanCausalConv3d(5, 7, (3, 3, 3), stride=(1, 2, 2), padding=(1, 1, 1)).double()
    x = torch.randn(2, 5, 4, 9, 8, dtype=torch.float64)
    cache = torch.randn(2, 5, 1, 9, 8, dtype=torch.float64)  # one cached frame: one zero frame still in front
    expected = [conv(x), conv(x, cache)]
    assert apply_conv2d_taps(conv) == 1
    for got, want in zip([conv(x), conv(x, cache)], expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_remove_restores_the_original_forward_and_temporal_strides_are_left_alone():
    vae = tiny_wan_vae(seed=5)
    patched = apply_conv2d_taps(vae)
    assert patched > 0 and apply_conv2d_taps(vae) == 0  # applying twice changes nothing
    strided = [m for m in vae.modules() if isinstance(m, WanCausalConv3d) and m.stride[0] != 1]
    assert strided and all("forward" not in m.__dict__ for m in strided)  # the encoder's temporal downsampling
    assert remove_conv2d_taps(vae) == patched
    assert all("forward" not in m.__dict__ for m in vae.modules())
