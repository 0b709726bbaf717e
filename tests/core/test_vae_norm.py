"""The Wan VAE decoder's RMS norms fused: same arithmetic as diffusers (float64), one rounding in low precision."""

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

from genkv.pipelines import StreamingVAEDecoder
from genkv.pipelines.self_forcing.vae_norm import apply_fused_norms, remove_fused_norms, rms_norm
from genkv.testing import tiny_wan_vae


def _norm(channel_first=True, images=False, bias=True):
    norm = WanRMS_norm(6, channel_first=channel_first, images=images, bias=bias).double()
    with torch.no_grad():  # non-trivial affine parameters (they start at 1 and 0)
        norm.gamma.normal_(generator=torch.Generator().manual_seed(0))
        if bias:
            norm.bias.normal_(generator=torch.Generator().manual_seed(1))
    return norm


@pytest.mark.parametrize("channel_first, images, bias", [(True, False, True), (True, True, False), (False, True, True)])
def test_fused_norm_equals_diffusers_in_float64(channel_first, images, bias):
    norm = _norm(channel_first, images, bias)
    shape = (2, 6, 3, 4, 5) if channel_first and not images else (2, 6, 4, 5) if channel_first else (2, 4, 5, 6)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    reference = norm(x)
    assert apply_fused_norms(norm) == 1
    torch.testing.assert_close(norm(x), reference, rtol=0, atol=1e-13)
    assert remove_fused_norms(norm) == 1 and "forward" not in norm.__dict__


def test_fused_norm_in_half_precision_is_within_its_rounding():
    """float16 in, float16 out: diffusers rounds twice, the fused norm once; both within fp16 rounding of float64."""
    norm = _norm()
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = norm(x)
    half = norm.half()
    fused = rms_norm(x.half(), half.gamma, half.bias, half.scale, 1).double()
    plain = half(x.half()).double()
    assert (fused - exact).abs().max() <= (plain - exact).abs().max() + 1e-3
    torch.testing.assert_close(fused, exact, rtol=2e-3, atol=2e-3)


def test_compiled_fused_norm_equals_the_eager_one():
    """The GPU path compiles the norm; the compiled function must compute what the eager one does."""
    norm = _norm().float()
    x = torch.randn(2, 6, 3, 4, 5, generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(rms_norm, dynamic=True)
    torch.testing.assert_close(compiled(x, norm.gamma, norm.bias, norm.scale, 1),
                               rms_norm(x, norm.gamma, norm.bias, norm.scale, 1), rtol=1e-5, atol=1e-6)


def test_streaming_decode_with_fused_norms_equals_the_plain_one():
    vae = tiny_wan_vae(seed=4).double()
    z = torch.randn(1, 16, 7, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    plain = StreamingVAEDecoder(vae)
    reference = torch.cat([plain.decode(z[:, :, a:b]) for a, b in ((0, 3), (3, 7))], dim=2)
    fused = StreamingVAEDecoder(vae, channels_last=True, conv2d_taps=True, fused_norms=True)
    got = torch.cat([fused.decode(z[:, :, a:b]) for a, b in ((0, 3), (3, 7))], dim=2)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-12)
    assert remove_fused_norms(vae.decoder) > 0
