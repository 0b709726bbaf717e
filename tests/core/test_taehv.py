"""genkv's TAEHV decoder: chunk-by-chunk == whole clip, the Wan VAE's frame counts, the published file layout loads
strictly, and a file that does not match fails with one line naming the keys.

Weights are random (never the published file): He-scaled, the last conv rescaled so most pixels fall inside the
output clamp (a clamped pixel is equal whatever the layers before it did, which would hide a wrong carry).
"""

from __future__ import annotations

import math

import pytest
import torch

from genkv.pipelines import StreamingVAEDecoder
from genkv.pipelines.self_forcing.taehv import StreamingTAEHVDecoder, TAEHVDecoder
from genkv.testing import tiny_wan_vae

LATENT_FRAMES = 7


def _conditioned(decoder: TAEHVDecoder, seed: int = 0) -> TAEHVDecoder:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if p.ndim == 4:  # residual branches scaled down so nine MemBlocks stay O(1)
                scale = 0.3 if name.endswith("conv.4.weight") else 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * scale * math.sqrt(2.0 / p[0].numel()))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        raw = []
        last = decoder.decoder[-1]
        hook = last.register_forward_hook(lambda module, args, out: raw.append(out.clone()))
        decoder.decode_video(torch.randn(1, 16, 3, 2, 3, generator=gen))
        hook.remove()
        k = 0.25 / raw[0].std()
        last.weight.mul_(k)
        last.bias.copy_((last.bias - raw[0].mean()) * k + 0.5)
    return decoder.eval()


@pytest.fixture(scope="module")
def decoder() -> TAEHVDecoder:
    return _conditioned(TAEHVDecoder())


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn(2, 16, LATENT_FRAMES, 2, 3, generator=torch.Generator().manual_seed(1))


def _streamed(decoder: TAEHVDecoder, latents: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    parts, state, start = [], None, 0
    for size in sizes:
        pixels, state = decoder.decode_chunk(latents[:, :, start:start + size], state)
        parts.append(pixels)
        start += size
    return parts


SPLITS = [(3, 3, 1), (1, 3, 3), (2, 5), (1,) * LATENT_FRAMES, (LATENT_FRAMES,)]


@pytest.mark.parametrize("sizes", SPLITS, ids=lambda s: "+".join(map(str, s)))
def test_streaming_chunk_by_chunk_equals_the_whole_clip(decoder, latents, sizes):
    whole = decoder.decode_video(latents)
    streamed = torch.cat(_streamed(decoder, latents, sizes), dim=2)
    assert streamed.shape == whole.shape
    torch.testing.assert_close(streamed, whole, rtol=0, atol=2e-5)
    inside = (whole.abs() < 0.999).float().mean()
    assert inside > 0.5, f"only {inside:.0%} of the pixels escape the clamp: the comparison would say little"


def test_streaming_is_exact_in_float64(decoder, latents):
    decoder64 = _conditioned(TAEHVDecoder()).double()
    z = latents.double()
    streamed = torch.cat(_streamed(decoder64, z, (3, 3, 1)), dim=2)
    torch.testing.assert_close(streamed, decoder64.decode_video(z), rtol=0, atol=1e-12)


def test_channels_last_decodes_the_same_clip_without_a_layout_conversion(latents):
    # float64 (the sums' order is the only difference, and it vanishes there); batch 2, so the MemBlocks' past and
    # the TGrows' frame order are checked across videos in one batch
    plain = _conditioned(TAEHVDecoder()).double()
    fast = _conditioned(TAEHVDecoder()).double().use_channels_last()
    z = latents.double()
    seen = []

    def record(module, args, out):
        seen.append((type(module).__name__,
                     all(t.is_contiguous(memory_format=torch.channels_last) for t in (args[0], out))))

    hooks = [m.register_forward_hook(record) for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    streamed = torch.cat(_streamed(fast, z, (3, 3, 1)), dim=2)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(streamed, plain.decode_video(z), rtol=0, atol=1e-12)
    # every convolution read and wrote channels-last memory: cuDNN has nothing to convert
    assert seen and all(ok for _, ok in seen), [name for name, ok in seen if not ok]
    fast.use_channels_last(False)
    torch.testing.assert_close(fast.decode_video(z), plain.decode_video(z), rtol=0, atol=1e-12)


def test_the_state_passed_in_is_left_unchanged(decoder, latents):
    _, state = decoder.decode_chunk(latents[:, :, :3])
    again = [decoder.decode_chunk(latents[:, :, 3:6], state)[0] for _ in range(2)]
    torch.testing.assert_close(again[0], again[1], rtol=0, atol=0)
    fresh = decoder.decode_chunk(latents[:, :, 3:6])[0]
    assert not torch.allclose(again[0][:, :, 3:], fresh, atol=1e-3)  # the carry matters here


@pytest.mark.parametrize("sizes", [(3, 3, 1), (1, 3, 3), (2, 5)], ids=lambda s: "+".join(map(str, s)))
def test_frames_per_chunk_match_the_wan_vae(decoder, latents, sizes):
    ours = [p.shape[2] for p in _streamed(decoder, latents, sizes)]
    wan = StreamingVAEDecoder(tiny_wan_vae())
    z, start, theirs = latents[:1], 0, []
    for size in sizes:
        theirs.append(wan.decode(z[:, :, start:start + size]).shape[2])
        start += size
    assert ours == theirs
    assert sum(ours) == 1 + 4 * (LATENT_FRAMES - 1)


def test_output_convention_is_the_wan_vae_decoders(decoder, latents):
    pixels = decoder.decode_video(latents)
    assert pixels.shape == (2, 3, 1 + 4 * (LATENT_FRAMES - 1), 16, 24)  # (B, 3, T', 8h, 8w)
    assert pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.min() < -0.5  # [-1, 1], not TAEHV's [0, 1]


def test_streaming_wrapper_resets_between_videos(decoder, latents):
    streaming = StreamingTAEHVDecoder(decoder)
    first = torch.cat([streaming.decode(latents[:, :, :3]), streaming.decode(latents[:, :, 3:])], dim=2)
    streaming.reset()
    second = torch.cat([streaming.decode(latents[:, :, :3]), streaming.decode(latents[:, :, 3:])], dim=2)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert first.shape[2] == 1 + 4 * (LATENT_FRAMES - 1)


def test_a_state_from_another_video_shape_is_refused(decoder, latents):
    _, state = decoder.decode_chunk(latents[:, :, :3])
    with pytest.raises(ValueError, match="state=None"):
        decoder.decode_chunk(latents[:1, :, 3:], state)
    with pytest.raises(ValueError, match="16-channel"):
        decoder.decode_chunk(torch.zeros(1, 48, 1, 2, 2))


# ---- the published file layout ---------------------------------------------------------------------------------


def _published_decoder_shapes() -> dict[str, tuple[int, ...]]:
    """taew2_1's decoder keys and shapes, written out from TAEHV's taehv.py (not from genkv's module)."""
    shapes = {"decoder.1.weight": (256, 16, 3, 3), "decoder.1.bias": (256,), "decoder.22.weight": (3, 64, 3, 3),
              "decoder.22.bias": (3,)}
    stages = ((3, 256, 128, 1), (9, 128, 64, 2), (15, 64, 64, 2))  # first MemBlock index, width, next, TGrow stride
    for first, width, following, stride in stages:
        for block in range(first, first + 3):
            shapes[f"decoder.{block}.conv.0.weight"] = (width, 2 * width, 3, 3)
            for conv in (0, 2, 4):
                shapes[f"decoder.{block}.conv.{conv}.bias"] = (width,)
            for conv in (2, 4):
                shapes[f"decoder.{block}.conv.{conv}.weight"] = (width, width, 3, 3)
        shapes[f"decoder.{first + 4}.conv.weight"] = (width * stride, width, 1, 1)  # TGrow
        shapes[f"decoder.{first + 5}.weight"] = (following, width, 3, 3)  # conv without bias
    return shapes


def _published_like(seed: int = 2) -> dict[str, torch.Tensor]:
    """A file as published: float16, the decoder keys, and an encoder part genkv ignores."""
    gen = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=gen).half() for k, s in _published_decoder_shapes().items()}
    sd.update({"encoder.0.weight": torch.randn(64, 3, 3, 3).half(), "encoder.0.bias": torch.zeros(64).half(),
               "encoder.2.conv.weight": torch.randn(64, 128, 1, 1).half()})
    return sd


def _save(sd: dict, path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)


def test_genkv_names_and_shapes_are_the_published_ones():
    ours = {k: tuple(v.shape) for k, v in TAEHVDecoder().state_dict().items()}
    assert ours == _published_decoder_shapes()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_published_layout_file_loads_strictly(tmp_path, suffix):
    sd = _published_like()
    path = tmp_path / f"taew2_1{suffix}"
    _save(sd, path)
    decoder = TAEHVDecoder.from_file(path, dtype=torch.float64)
    loaded = decoder.state_dict()
    assert loaded.keys() == {k for k in sd if k.startswith("decoder.")}
    for key, value in loaded.items():
        assert value.dtype == torch.float64
        torch.testing.assert_close(value, sd[key].double(), rtol=0, atol=0)
    assert not decoder.training and not any(p.requires_grad for p in decoder.parameters())


def test_the_environment_switch_loads_files_channels_last(tmp_path, monkeypatch):
    import genkv.pipelines.self_forcing.taehv as taehv

    path = tmp_path / "taew2_1.pth"
    _save(_published_like(), path)
    monkeypatch.setattr(taehv, "CHANNELS_LAST", False)  # as GENKV_TAEHV_CHANNELS_LAST=0 at import
    assert not TAEHVDecoder.from_file(path).channels_last
    monkeypatch.setattr(taehv, "CHANNELS_LAST", True)  # the default
    decoder = TAEHVDecoder.from_file(path)
    assert decoder.channels_last
    assert decoder.decoder[1].weight.is_contiguous(memory_format=torch.channels_last)


def test_older_files_with_a_two_frame_first_tgrow_keep_its_last_frame(tmp_path):
    sd = _published_like()
    sd["decoder.7.conv.weight"] = torch.randn(512, 256, 1, 1).half()  # trained with the first stage upsampling time
    _save(sd, tmp_path / "old.pth")
    decoder = TAEHVDecoder.from_file(tmp_path / "old.pth")
    torch.testing.assert_close(decoder.decoder[7].conv.weight, sd["decoder.7.conv.weight"][256:].float())


def test_a_preview_decoder_without_time_upsampling_loads_the_published_file(tmp_path):
    sd = _published_like()
    _save(sd, tmp_path / "taew2_1.pth")
    preview = TAEHVDecoder.from_file(tmp_path / "taew2_1.pth", decoder_time_upscale=(False, False))
    torch.testing.assert_close(preview.decoder[13].conv.weight, sd["decoder.13.conv.weight"][128:].float())
    pixels = preview.decode_video(torch.randn(1, 16, 4, 2, 2))
    assert pixels.shape[2] == 4  # one frame per latent frame, none trimmed


# ---- files that do not match: one line naming what is wrong ------------------------------------------------------


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 600, message
    return message


def _missing(sd):
    del sd["decoder.9.conv.0.weight"], sd["decoder.22.bias"]
    return ["missing keys", "decoder.9.conv.0.weight", "decoder.22.bias"]


def _extra(sd):
    sd["decoder.23.weight"] = torch.zeros(3)
    sd["post_quant_conv.weight"] = torch.zeros(3)
    return ["unexpected keys", "decoder.23.weight", "post_quant_conv.weight"]


def _wrong_shape(sd):
    sd["decoder.1.weight"] = torch.zeros(256, 48, 3, 3)  # a 48-channel (Wan2.2 5B) file
    return ["wrong shapes", "decoder.1.weight (256, 48, 3, 3) (wants (256, 16, 3, 3))"]


def _wan_vae(sd):
    sd.clear()
    sd.update({f"decoder.up_blocks.{i}.resnets.0.conv1.weight": torch.zeros(1) for i in range(20)})
    return ["missing keys", "decoder.1.weight", "unexpected keys", "decoder.up_blocks.0.resnets.0.conv1.weight",
            "(+16 more)"]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("corrupt", [_missing, _extra, _wrong_shape, _wan_vae], ids=lambda f: f.__name__[1:])
def test_a_file_that_does_not_match_names_its_keys(tmp_path, suffix, corrupt):
    sd = _published_like()
    expected = corrupt(sd)
    path = tmp_path / f"bad{suffix}"
    _save(sd, path)
    with pytest.raises(ValueError) as excinfo:
        TAEHVDecoder.from_file(path)
    message = _one_line(excinfo)
    assert str(path) in message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_an_empty_file_is_refused_in_one_line(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read TAEHV weights from") as excinfo:
        TAEHVDecoder.from_file(path)
    _one_line(excinfo)


def test_a_file_without_a_state_dict_is_refused(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="does not hold a state dict") as excinfo:
        TAEHVDecoder.from_file(tmp_path / "tensor.pth")
    _one_line(excinfo)


def test_a_missing_path_says_where_to_get_the_weights(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        TAEHVDecoder.from_file(tmp_path / "taew2_1.safetensors")
    message = _one_line(excinfo)
    assert "never downloads" in message and "github.com/madebyollin/taehv" in message
    assert "taew2_1.safetensors" in message
