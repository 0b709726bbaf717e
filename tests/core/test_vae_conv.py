"""The Wan VAE decoder's causal 3-D convolutions as per-tap 2-D convolutions: same pixels (float64 reference)."""

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from genkv.pipelines import StreamingVAEDecoder
from genkv.pipelines.self_forcing.forward_patch import forward_option
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_tap_sum_streams_the_same_pixels(dtype):
    """The taps summed with the bias in one pass: float64 takes the reference sum, float32 the Triton kernel (on the
    CPU under the interpreter); both against the streamed 3-D convolutions in float64."""
    vae = tiny_wan_vae(seed=4).double()
    z = torch.randn(1, 16, 7, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reference = streamed(vae, z)
    fused = streamed(vae.to(dtype), z.to(dtype), channels_last=True, conv2d_taps=True, fused_tap_sum=True)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.double(), reference, **tol)
    patched = [m for m in vae.decoder.modules() if "forward" in m.__dict__]
    assert patched and all(forward_option(m, "fused_sum") for m in patched)
    assert remove_conv2d_taps(vae.decoder) == len(patched)
    assert not any(forward_option(m, "fused_sum") is not None for m in vae.decoder.modules())


def test_fused_tap_sum_runs_the_fused_kernel_and_not_the_add_chain(monkeypatch):
    """The switch must reach the convolutions: count the fused sums one streamed decode makes."""
    import genkv.pipelines.self_forcing.vae_conv as vae_conv

    calls = []
    real = vae_conv.sum_partials
    monkeypatch.setattr(vae_conv, "sum_partials", lambda parts, bias: calls.append(len(parts)) or real(parts, bias))
    vae = tiny_wan_vae(seed=4)
    z = torch.randn(1, 16, 7, 4, 4, generator=torch.Generator().manual_seed(2))
    streamed(vae, z, conv2d_taps=True)
    assert calls == []
    remove_conv2d_taps(vae.decoder)
    streamed(vae, z, conv2d_taps=True, fused_tap_sum=True)
    assert calls and set(calls) == {3}  # every 3-tap convolution of every decoder call


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_blocks_stream_the_same_pixels_and_add_the_shortcut_in_the_tap_sum(dtype, monkeypatch):
    """The block fusions on (norm + SiLU one pass, shortcut inside the second conv's tap sum): float64 against the
    plain streamed decoder exactly, float32 (Triton kernel under the interpreter) to float32 rounding. The tap sums
    must take the shortcut as a fourth partial, not a separate add, wherever the layouts match."""
    import genkv.pipelines.self_forcing.vae_conv as vae_conv

    counts = []
    real = vae_conv.sum_partials
    monkeypatch.setattr(vae_conv, "sum_partials", lambda parts, bias: counts.append(len(parts)) or real(parts, bias))
    vae = tiny_wan_vae(seed=4).double()
    z = torch.randn(1, 16, 7, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reference = streamed(vae, z)
    fused = streamed(vae.to(dtype), z.to(dtype), channels_last=True, conv2d_taps=True, fused_tap_sum=True,
                     fused_norms=True, fused_blocks=True)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.double(), reference, **tol)
    # The tiny decoder's 1-channel up-sampler outputs leave some shortcuts channels-first (those are added after
    # the sum); most blocks' shortcuts, and every one of the real decoder's after its input conv, are folded in.
    blocks = sum(type(m).__name__ == "WanResidualBlock" for m in vae.decoder.modules())
    assert counts.count(4) >= blocks * 2


def test_fused_tap_sum_without_the_taps_is_refused():
    with pytest.raises(ValueError, match="needs conv2d_taps=True"):
        StreamingVAEDecoder(tiny_wan_vae(seed=4), fused_tap_sum=True)
