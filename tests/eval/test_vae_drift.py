"""eval/vae_drift.py: the streamed round trip against diffusers' own whole-clip decode, and the script end to end."""

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
import vae_drift  # noqa: E402


def test_streamed_round_trip_equals_the_whole_clip_decode_and_its_latent_magnitudes():
    from genkv.data import make_video
    from genkv.testing import tiny_wan_vae

    vae = tiny_wan_vae(seed=1).eval()
    vae.register_to_config(latents_mean=torch.linspace(-0.5, 0.5, 16).tolist(),
                           latents_std=torch.linspace(0.5, 2.0, 16).tolist())
    frames = make_video(seed=4, num_frames=29, size=16, max_objects=2).frames  # 8 latent frames: a partial chunk
    decoded, magnitude = vae_drift.round_trip(vae, frames)
    with torch.no_grad():
        x = torch.from_numpy(frames).double().permute(3, 0, 1, 2)[None] / 127.5 - 1.0
        vae64 = vae.double()
        z = vae64.encode(x).latent_dist.mode()
        whole = vae64.decode(z).sample.clamp(-1, 1)
    expected = ((whole[0].permute(1, 2, 3, 0) * 0.5 + 0.5) * 255).round().numpy()
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(np.float64) - expected).max() <= 1  # one uint8 step: float32 vs float64
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float64).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float64).view(1, -1, 1, 1, 1)
    reference = ((z - mean) / std).abs().mean(dim=(0, 1, 3, 4)).numpy()
    assert magnitude.shape == (8,) and np.allclose(magnitude, reference, rtol=1e-4, atol=1e-5)


def test_errors_per_frame_against_a_direct_computation():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 80, size=(3, 8, 8, 3)).astype(np.uint8)
    frames[:, 2:4, 2:4] = (240, 220, 40)  # a sprite in every frame but the last
    frames[2, 2:4, 2:4] = 50
    decoded = np.clip(frames.astype(int) + rng.integers(-9, 10, size=frames.shape), 0, 255).astype(np.uint8)
    errors = vae_drift.round_trip_errors(frames, decoded)
    for t in range(3):
        diff = decoded[t].astype(float) - frames[t].astype(float)
        assert np.isclose(errors["psnr"][t], 10 * np.log10(255**2 / np.mean(diff**2)))
    for t in range(2):
        sprite = np.abs(decoded[t, 2:4, 2:4].astype(int) - frames[t, 2:4, 2:4].astype(int)).sum(-1).mean()
        assert np.isclose(errors["sprite_rgb_error"][t], sprite)
    assert np.isnan(errors["sprite_rgb_error"][2])


def test_script_writes_spans_and_series(tmp_path):
    out = tmp_path / "drift.json"
    assert vae_drift.main(["--model", "tiny-random", "--clips", "1", "--frames", "49", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["spans"]["frames"] == ["0-8", "9-20", "21-32", "33-44", "45-48"]
    assert len(result["per_frame"]["psnr"]) == 49 and len(result["per_frame"]["latent_magnitude"]) == 13
    psnr, latent = result["per_frame"]["psnr"], result["per_frame"]["latent_magnitude"]
    assert np.isclose(result["spans"]["psnr"][4], np.mean(psnr[45:]))
    assert np.isclose(result["spans"]["psnr"][1], np.mean(psnr[9:21]))
    assert np.isclose(result["spans"]["latent_magnitude"][0], np.mean(latent[:3]))  # frames 0-8: latents 0, 1, 2
    assert np.isclose(result["spans"]["latent_magnitude"][1], np.mean(latent[3:6]))  # frames 9-20: latents 3-5
    assert np.isclose(result["spans"]["latent_magnitude"][4], latent[12])


def test_script_measures_prompt_following_of_the_round_trip_and_of_the_data(tmp_path):
    """The round trip's prompt-following summary against the measure run directly on the same round trips (the
    script's streamed decode is deterministic), and the data's against the data."""
    from genkv.data import make_video
    from genkv.metrics.prompt_following import prompt_following, summarize

    out = tmp_path / "drift.json"
    assert vae_drift.main(["--model", "tiny-random", "--clips", "2", "--frames", "17", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["prompt_following"]
    pipe = vae_drift.load_pipeline("tiny-random", torch.device("cpu"))
    size = pipe.config.default_height
    videos = [make_video(seed=s, num_frames=17, size=size, max_objects=2, backgrounds=("plain",), radius=(0.13, 0.21))
              for s in range(2)]
    trips = [prompt_following(vae_drift.round_trip(pipe.vae.eval(), v.frames)[0], v.prompt) for v in videos]
    assert result["round_trip"] == json.loads(json.dumps(summarize(trips)))
    assert result["data"] == json.loads(json.dumps(summarize([prompt_following(v.frames, v.prompt) for v in videos])))
    assert result["data"]["colour_present"] != result["round_trip"]["colour_present"]  # a random VAE loses colour


def test_a_vae_alone_is_measured_as_in_its_model(tmp_path):
    """What ``train_tiny.py --stop-after-vae`` saves (a folder holding vae/, or its tar) is measured without a
    transformer, and gives what the same VAE gives inside its model."""
    import tarfile

    pipe = vae_drift.load_pipeline("tiny-random", torch.device("cpu"))
    pipe.vae.save_pretrained(tmp_path / "alone" / "vae")
    with tarfile.open(tmp_path / "alone.tar", "w") as tar:
        tar.add(tmp_path / "alone", arcname="alone")
    runs = {}
    for name, model in (("model", "tiny-random"), ("folder", str(tmp_path / "alone")),
                        ("tar", str(tmp_path / "alone.tar"))):
        out = tmp_path / f"{name}.json"
        size = ["--size", str(pipe.config.default_height)] if name != "model" else []
        assert vae_drift.main(["--model", model, *size, "--clips", "1", "--frames", "9", "--out", str(out)]) == 0
        runs[name] = json.loads(out.read_text())
    for name in ("folder", "tar"):
        assert runs[name]["per_frame"] == runs["model"]["per_frame"]
    vae, size = vae_drift.load_vae_under_test(str(tmp_path / "alone"), torch.device("cpu"), None)
    assert size == 64 and type(vae).__name__ == "AutoencoderKLWan"
