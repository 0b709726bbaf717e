"""The pipeline's opt-in fast paths: the TAEHV tiny decoder and FP8 linear layers, end to end on the tiny model."""

import numpy as np
import pytest
import torch

from genkv.pipelines.self_forcing.taehv import TAEHVDecoder
from genkv.pipelines.self_forcing.vae_stream import to_uint8_frames
from genkv.testing import tiny_self_forcing_pipeline


def _taehv(seed: int = 0) -> TAEHVDecoder:
    torch.manual_seed(seed)
    decoder = TAEHVDecoder().eval()
    with torch.no_grad():  # weights large enough that most pixels are not clamped flat
        for p in decoder.parameters():
            p.mul_(3.0)
    return decoder


def test_a_streamed_render_with_taehv_equals_decoding_its_latents_as_one_clip():
    pipe = tiny_self_forcing_pipeline(seed=0)
    latents = pipe("a red circle", num_frames=21, output_type="latent", generator=torch.Generator().manual_seed(1))
    decoder = _taehv()
    pipe.set_decoder(decoder)
    frames = np.concatenate(list(pipe.stream("a red circle", num_frames=21,
                                             generator=torch.Generator().manual_seed(1))))
    whole = np.asarray(to_uint8_frames(decoder.decode_video(latents.frames)))[0][:21]
    assert frames.shape == whole.shape == (21, 64, 64, 3)
    assert np.abs(frames.astype(int) - whole.astype(int)).max() <= 1  # float rounding at the uint8 edge
    assert frames.std() > 5  # a decoded picture, not a constant
    wan = np.concatenate(list(pipe.set_decoder("wan").stream("a red circle", num_frames=21,
                                                             generator=torch.Generator().manual_seed(1))))
    assert np.abs(wan.astype(int) - frames.astype(int)).mean() > 1  # the switch really changed the decoder


def test_taehv_without_weights_or_with_an_unknown_name_fails_in_one_line(tmp_path):
    pipe = tiny_self_forcing_pipeline(seed=0)
    with pytest.raises(ValueError, match="needs weights=PATH .*never downloads"):
        pipe.set_decoder("taehv")
    with pytest.raises(ValueError, match="'wan' or 'taehv'"):
        pipe.set_decoder("tiny")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        pipe.set_decoder("taehv", weights=tmp_path / "taew2_1.safetensors")
    assert pipe.taehv is None


def test_fp8_changes_the_render_within_bounds_and_goes_back_bit_for_bit():
    pipe = tiny_self_forcing_pipeline(seed=0)

    def latents():
        return pipe("a red circle", num_frames=9, output_type="latent",
                    generator=torch.Generator().manual_seed(2)).frames

    plain = latents()
    assert pipe.enable_fp8().fp8_layers > 0
    fp8 = latents()
    error = ((fp8 - plain).norm() / plain.norm()).item()
    assert 1e-4 < error < 5e-2, error  # quantized, and close (genkv.fp8's per-layer error is ~3.7e-2)
    pipe.disable_fp8()
    assert torch.equal(latents(), plain)


def test_the_measured_kernels_are_on_by_default_and_each_switch_turns_one_off():
    """GENKV_FUSED_ADALN, GENKV_PAIR_SCORES_KERNEL and GENKV_TAEHV_CHANNELS_LAST are on unless set to 0 (made default
    after the 2026-12-06 H200 A/B); each is read at import, so a fresh interpreter sees what a user's process sees."""
    import os
    import subprocess
    import sys

    probe = ("import genkv.keep.tempcache as t, genkv.pipelines.self_forcing.fused_block as f, "
             "genkv.pipelines.self_forcing.taehv as h; "
             "print(int(t._PAIR_SCORES_KERNEL is not None), int(f.FUSED_ADALN), int(h.CHANNELS_LAST))")

    def switches(**env):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("GENKV_")}
        out = subprocess.run([sys.executable, "-c", probe], env={**clean, **env}, capture_output=True, text=True,
                             check=True)
        return out.stdout.split()

    pytest.importorskip("triton")  # the merge-score kernel needs it
    assert switches() == ["1", "1", "1"]
    assert switches(GENKV_PAIR_SCORES_KERNEL="0") == ["0", "1", "1"]
    assert switches(GENKV_FUSED_ADALN="0") == ["1", "0", "1"]
    assert switches(GENKV_TAEHV_CHANNELS_LAST="0") == ["1", "1", "0"]
