"""eval/tune_decoder.py: the training decode is the pipeline's streamed decode, its backprop is truncated at the
window, and the script writes a loadable tuned model."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
import tune_decoder  # noqa: E402


def _vae():
    from genkv.testing import tiny_wan_vae

    vae = tiny_wan_vae(seed=3).double().eval()
    vae.register_to_config(latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    return vae


@pytest.mark.parametrize("window", [(0, 3), (3, 6), (3, 8), (6, 8), (0, 8)])
def test_window_decode_is_the_streaming_decoders_output_over_those_frames(window):
    from genkv.pipelines import StreamingVAEDecoder

    vae = _vae()
    z = torch.randn(2, 16, 8, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    decoder = StreamingVAEDecoder(vae)  # the inference path: one call a chunk, its cache carried
    streamed = torch.cat([decoder.decode(z[:, :, i : i + 3], normalized=False) for i in range(0, 8, 3)], dim=2)
    first, stop = window
    a, b = tune_decoder.pixel_span(first, stop)
    assert (a, b) == (0 if first == 0 else 4 * first - 3, 4 * stop - 3)
    with torch.no_grad():
        pixels = tune_decoder.decode_window(vae, z, first, stop)
    assert pixels.shape[2] == b - a
    torch.testing.assert_close(pixels, streamed[:, :, a:b], rtol=0, atol=1e-12)


def test_backprop_stops_at_the_window():
    vae = _vae()
    z = torch.randn(1, 16, 9, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z.requires_grad_(True)
    tune_decoder.decode_window(vae, z, 3, 9).square().sum().backward()
    assert torch.count_nonzero(z.grad[:, :, :3]) == 0  # the warm-up chunk: no gradient
    assert torch.count_nonzero(z.grad[:, :, 3:9]) == z.grad[:, :, 3:9].numel()
    # Without the truncation the warm-up frames do reach the window through the cache.
    z.grad = None
    full = tune_decoder.decode_window(vae, z, 0, 9)
    full[:, :, 9:].square().sum().backward()
    assert torch.count_nonzero(z.grad[:, :, :3]) > 0


def test_window_must_start_on_a_chunk():
    with pytest.raises(ValueError, match="multiple of the chunk"):
        tune_decoder.decode_window(_vae(), torch.randn(1, 16, 6, 2, 2, dtype=torch.float64), 2, 5)


def test_script_tunes_a_saved_pipeline_and_keeps_the_rest(tmp_path):
    from genkv.testing import tiny_self_forcing_pipeline
    from safetensors.torch import load_file

    model = tmp_path / "model"
    pipe = tiny_self_forcing_pipeline(seed=0)
    pipe.vae.register_to_config(latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    pipe.save_pretrained(model, safe_serialization=True)
    out, log = tmp_path / "tuned", tmp_path / "log.json"
    args = ["--model", str(model), "--out", str(out), "--clips", "2", "--clip-frames", "25", "--max-steps", "3",
            "--batch", "2", "--lr", "1e-2", "--log", str(log)]
    assert tune_decoder.main(args) == 0
    result = json.loads(log.read_text())
    assert result["steps"] == 3 and len(result["log"]) == 3
    assert {entry["first_latent"] for entry in result["log"]} == {0}  # 7 latent frames: one whole 6-frame window
    before, after = (load_file(f / "vae" / "diffusion_pytorch_model.safetensors") for f in (model, out))
    # The tuned VAE is saved in fp16 (as train_tiny saves): compare at that precision.
    changed = {k for k in before if not torch.equal(before[k].to(after[k].dtype), after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)  # encoder frozen
    assert (out / "transformer").is_dir() and (out / "model_index.json").is_file()
    with pytest.raises(SystemExit, match="same folder"):
        tune_decoder.main(["--model", str(model), "--out", str(model)])
    with pytest.raises(SystemExit):
        tune_decoder.main(["--model", str(model), "--out", str(out), "--clip-frames", "20"])


def test_window_loss_weights_frame_0_as_a_frame_weighted_mean():
    """``--first-frame-weight``: in a window at the video's start the loss is the frame-weighted mean of the
    per-frame L1 + MSE (frame 0 weighted w, the others 1), float64 per-frame reference; later windows, and w = 1,
    are the plain loss."""
    g = torch.Generator().manual_seed(0)
    recon, x = (torch.rand(2, 3, 9, 8, 8, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
    per_frame = ((recon - x).abs() + (recon - x).square()).mean(dim=(0, 1, 3, 4))
    weights = torch.ones(9, dtype=torch.float64)
    weights[0] = 9.0
    expected = (per_frame * weights).sum() / weights.sum()
    torch.testing.assert_close(tune_decoder.window_loss(recon, x, 0, 1.0, 9.0), expected, rtol=1e-12, atol=0)
    plain = tune_decoder.reconstruction_loss(recon, x, 1.0)
    assert not torch.isclose(expected, plain)
    torch.testing.assert_close(tune_decoder.window_loss(recon, x, 3, 1.0, 9.0), plain, rtol=0, atol=0)
    torch.testing.assert_close(tune_decoder.window_loss(recon, x, 0, 1.0, 1.0), plain, rtol=0, atol=0)
