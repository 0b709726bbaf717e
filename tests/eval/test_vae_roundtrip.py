"""eval/vae_roundtrip.py: a clip goes through the VAE as the posterior mean and back, and the figures it reports
are those of the decoded frames (numpy references), for each model named."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
import vae_roundtrip  # noqa: E402


def test_the_round_trip_decodes_the_posterior_mean_to_uint8_frames():
    from genkv.data import make_video
    from genkv.testing import tiny_wan_vae

    vae = tiny_wan_vae(seed=0).eval()
    clip = make_video(seed=3, num_frames=5, size=16, max_objects=2).frames
    out = vae_roundtrip.round_trip(vae, clip)
    assert out.shape == clip.shape and out.dtype == np.uint8
    x = torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        reference = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    expected = ((reference[0].permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1  # float rounding at .5 only


def test_main_reports_psnr_and_edge_energy_of_the_decoded_clips(tmp_path, monkeypatch):
    from genkv.metrics.prompt_following import edge_energy

    decoded = []
    original = vae_roundtrip.round_trip

    def keep(vae, frames):
        out = original(vae, frames)
        decoded.append((frames, out))
        return out

    monkeypatch.setattr(vae_roundtrip, "round_trip", keep)
    out = tmp_path / "rt.json"
    assert vae_roundtrip.main(["--model", "tiny-random", "--clips", "2", "--frames", "5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (model,) = result["models"]
    assert len(decoded) == 2
    psnr = [np.mean([10 * np.log10(255.0**2 / np.mean((a[t].astype(np.float64) - b[t]) ** 2))
                     for t in range(len(a))]) for a, b in decoded]
    assert model["psnr_per_clip"] == pytest.approx(psnr, rel=1e-6)
    assert model["psnr_db"] == pytest.approx(np.mean(psnr), rel=1e-6)
    assert model["edge_energy"] == pytest.approx(np.mean([edge_energy(b) for _, b in decoded]), rel=1e-9)
    assert result["data_edge_energy"] == pytest.approx(np.mean([edge_energy(a) for a, _ in decoded]), rel=1e-9)


def test_frames_that_are_not_4k_plus_1_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        vae_roundtrip.main(["--model", "tiny-random", "--frames", "6", "--out", str(tmp_path / "x.json")])
