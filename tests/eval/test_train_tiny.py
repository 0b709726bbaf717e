"""eval/train_tiny.py end to end on a CPU with its --smoke sizes: the two-run mode (VAE, then the rest)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
import train_tiny  # noqa: E402


def test_vae_run_then_model_run_gives_a_loadable_pipeline_that_keeps_the_vae(tmp_path):
    from diffusers import AutoencoderKLWan

    from genkv.pipelines import SelfForcingPipeline

    assert train_tiny.main(["--out", str(tmp_path / "vae"), "--smoke", "--stop-after-vae",
                            "--tar", str(tmp_path / "vae.tar")]) == 0
    assert train_tiny.main(["--out", str(tmp_path / "model"), "--smoke", "--vae-from", str(tmp_path / "vae.tar"),
                            "--vae-minutes", "0", "--scheduler-steps", "3", "--guidance", "1", "2"]) == 0
    pipe = SelfForcingPipeline.from_pretrained(tmp_path / "model", torch_dtype=torch.float32)
    assert pipe.scheduler.config.sampler == "euler" and len(pipe.scheduler.timesteps) == 3
    assert pipe.config.default_guidance_scale in (1.0, 2.0)
    first = AutoencoderKLWan.from_pretrained(tmp_path / "vae" / "vae")
    for (name, a), b in zip(first.state_dict().items(), pipe.vae.state_dict().values()):
        assert torch.equal(a.half().float(), b), name  # the model run kept the VAE (saved in fp16)
    assert (tmp_path / "model" / "samples" / "steps3-guidance2" / "red.png").is_file()


def test_weights_and_tar_are_saved_before_the_sample_check(tmp_path, monkeypatch):
    """A device's time limit may stop the run during the sample check: the trained weights must be out by then."""
    from genkv.pipelines import SelfForcingPipeline

    def cut_short(*args, **kwargs):
        raise KeyboardInterrupt("time limit")

    monkeypatch.setattr(train_tiny, "sample_check", cut_short)
    try:
        train_tiny.main(["--out", str(tmp_path / "m"), "--smoke", "--scheduler-steps", "4", "--guidance", "1", "3",
                         "5", "--tar", str(tmp_path / "m.tar")])
    except KeyboardInterrupt:
        pass
    pipe = SelfForcingPipeline.from_pretrained(tmp_path / "m", torch_dtype=torch.float32)
    assert len(pipe.scheduler.timesteps) == 4 and pipe.config.default_guidance_scale == 3.0  # the middle one
    import tarfile

    with tarfile.open(tmp_path / "m.tar") as tar:
        assert "m/transformer/diffusion_pytorch_model.safetensors" in tar.getnames()


def test_resume_continues_a_saved_model_with_its_vae_and_latent_statistics(tmp_path):
    from genkv.pipelines import SelfForcingPipeline

    common = ["--smoke", "--scheduler-steps", "2", "--guidance", "1"]
    assert train_tiny.main(["--out", str(tmp_path / "a"), *common, "--tar", str(tmp_path / "a.tar")]) == 0
    assert train_tiny.main(["--out", str(tmp_path / "b"), *common, "--resume-from", str(tmp_path / "a.tar"),
                            "--image-blocks", "1"]) == 0
    log = json.loads((tmp_path / "b" / "training_log.json").read_text())["log"]
    assert [r["image_block"] for r in log if r["phase"] == "transformer"] == [True]  # the image-to-video sequences
    a = SelfForcingPipeline.from_pretrained(tmp_path / "a", torch_dtype=torch.float32)
    b = SelfForcingPipeline.from_pretrained(tmp_path / "b", torch_dtype=torch.float32)
    assert a.vae.config.latents_mean == b.vae.config.latents_mean
    assert a.vae.config.latents_std == b.vae.config.latents_std
    for (name, x), y in zip(a.vae.state_dict().items(), b.vae.state_dict().values()):
        assert torch.equal(x, y), name  # the VAE was not trained again
    moved = [n for (n, x), y in zip(a.transformer.state_dict().items(), b.transformer.state_dict().values())
             if not torch.equal(x, y)]
    assert moved  # the transformer did train on
    from genkv.pipelines.self_forcing.fused_block import is_fused

    assert any(is_fused(block) for block in a.transformer.blocks)  # a pipeline patches its blocks as it is built,
    transformer = train_tiny.load_pipeline_parts(tmp_path / "a.tar")[2]
    assert not any(is_fused(block) for block in transformer.blocks)  # training gets diffusers' forward (a backward)


def test_learning_rate_warms_up_then_decays_to_the_final_share():
    from types import SimpleNamespace

    args = SimpleNamespace(max_steps=1000, minutes=1.0, lr_final=0.1)
    factors = [train_tiny.learning_rate_factor(step, 0.0, args) for step in (0, 99, 199, 500, 1000, 2000)]
    assert factors[0] < factors[1] < factors[2] <= 1.0
    assert abs(factors[3] - (1 - 0.9 * 0.5)) < 1e-9 and abs(factors[4] - 0.1) < 1e-9 and abs(factors[5] - 0.1) < 1e-9
    timed = SimpleNamespace(max_steps=None, minutes=2.0, lr_final=0.25)
    assert abs(train_tiny.learning_rate_factor(500, 60.0, timed) - (1 - 0.75 * 0.5)) < 1e-9


def test_decoder_repair_trains_the_decoder_only(tmp_path):
    """`--resume-from M --minutes 0 --decoder-minutes N`: the encoder, the latent statistics, the text encoder and
    the transformer stay bit for bit (the transformer's latents keep their meaning); the decoder trains."""
    from genkv.pipelines import SelfForcingPipeline

    common = ["--smoke", "--scheduler-steps", "2", "--guidance", "1"]
    assert train_tiny.main(["--out", str(tmp_path / "a"), *common]) == 0
    assert train_tiny.main(["--out", str(tmp_path / "b"), *common, "--resume-from", str(tmp_path / "a"),
                            "--minutes", "0", "--decoder-minutes", "1", "--max-steps", "2", "--sprite-weight", "10"]) == 0
    log = json.loads((tmp_path / "b" / "training_log.json").read_text())["log"]
    assert [r["sprite_rgb_error"] > 0 for r in log if r["phase"] == "decoder"] == [True]
    a = SelfForcingPipeline.from_pretrained(tmp_path / "a", torch_dtype=torch.float32)
    b = SelfForcingPipeline.from_pretrained(tmp_path / "b", torch_dtype=torch.float32)
    assert a.vae.config.latents_mean == b.vae.config.latents_mean
    for part in ("transformer", "text_encoder"):
        for (name, x), y in zip(getattr(a, part).state_dict().items(), getattr(b, part).state_dict().values()):
            assert torch.equal(x, y), (part, name)
    va, vb = a.vae.state_dict(), b.vae.state_dict()
    assert all(torch.equal(va[n], vb[n]) for n in va if n.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(va[n], vb[n]) for n in va if n.startswith("decoder."))


def test_clip_frames_sets_the_pool_the_vae_and_the_transformer_train_on(tmp_path):
    """`--clip-frames 21`: 21-frame pool clips, encoded to 6 latent frames (2 chunks) that the transformer's
    sequences are cut from; a length that is not whole chunks is refused with the lengths that are."""
    assert train_tiny.main(["--out", str(tmp_path / "a"), "--smoke", "--clip-frames", "21", "--scheduler-steps", "2",
                            "--guidance", "1"]) == 0
    log = json.loads((tmp_path / "a" / "training_log.json").read_text())["log"]
    latents = [r for r in log if r["phase"] == "latents"]
    assert latents == [{"phase": "latents", "clips": 16, "clip_frames": 21, "latent_frames": 6, "chunks": 2}]
    assert all(r["context_chunks"] <= 1 for r in log if r["phase"] == "transformer")
    with pytest.raises(SystemExit) as refused:
        train_tiny.main(["--out", str(tmp_path / "b"), "--smoke", "--clip-frames", "44"])
    assert refused.value.code == 2


@pytest.mark.parametrize("lead", [0, 1])
@pytest.mark.parametrize("context_chunks", [0, 1, 2])
def test_training_blocks_are_the_blocks_the_pipeline_commits(lead, context_chunks):
    """A training sequence (an optional 1-frame image block, clean chunks, one noisy target chunk) is split into
    the blocks ``SelfForcingPipeline`` commits context in (``context_blocks``, upstream's rule), the target chunk
    last and alone."""
    from genkv.testing import tiny_self_forcing_pipeline

    chunk = train_tiny.CHUNK
    context = lead + context_chunks * chunk
    blocks = train_tiny.block_of_frame(context + chunk, lead).tolist()
    expected = []
    committed = tiny_self_forcing_pipeline(seed=0).context_blocks(context, bool(lead)) if context else []
    for index, (_, frames) in enumerate(committed):
        expected += [index] * frames
    expected += [(expected[-1] + 1) if expected else 0] * chunk
    assert blocks == expected


def test_sprite_pixels_weigh_more_in_the_reconstruction_loss():
    """With ``sprite_weight`` w, an error on a sprite pixel costs w times the same error on the background; with
    w = 1 the loss is plain L1 + MSE."""
    x = torch.full((1, 3, 1, 4, 4), -0.6)  # a dark background
    x[..., 1, 1] = torch.tensor([0.8, -0.7, -0.7]).view(1, 3, 1)  # one red sprite pixel
    on_sprite, on_background = x.clone(), x.clone()
    on_sprite[:, 0, 0, 1, 1] += 0.3
    on_background[:, 0, 0, 2, 2] += 0.3
    loss = train_tiny.reconstruction_loss
    assert torch.isclose(loss(on_sprite, x, 1.0), (on_sprite - x).abs().mean() + (on_sprite - x).square().mean())
    assert torch.isclose(loss(on_sprite, x, 10.0) / loss(on_background, x, 10.0), torch.tensor(10.0))
    assert torch.isclose(loss(on_sprite, x, 1.0), loss(on_background, x, 1.0))


def test_the_edge_term_matches_numpy_pixel_steps_and_prices_a_blurred_edge():
    """``edge_loss`` is the mean |step of recon - step of x| over horizontal and vertical pixel steps, per channel
    (float64 numpy reference); ``reconstruction_loss`` adds it times ``edge_weight`` and is unchanged at 0."""
    g = torch.Generator().manual_seed(0)
    recon, x = torch.rand(2, 3, 2, 5, 7, generator=g), torch.rand(2, 3, 2, 5, 7, generator=g)
    r, t = recon.double().numpy(), x.double().numpy()
    expected = (np.abs(np.diff(r, axis=-1) - np.diff(t, axis=-1)).mean()
                + np.abs(np.diff(r, axis=-2) - np.diff(t, axis=-2)).mean()) / 2
    assert abs(train_tiny.edge_loss(recon, x).item() - expected) < 1e-6
    loss = train_tiny.reconstruction_loss
    for weight in (1.0, 3.0):
        assert torch.equal(loss(recon, x, weight, 0.0), loss(recon, x, weight))
        assert torch.isclose(loss(recon, x, weight, 0.5), loss(recon, x, weight) + 0.5 * train_tiny.edge_loss(recon, x))


@pytest.mark.parametrize("lead_share", [0.0, 1.0])
def test_context_draws_every_chunk_uniformly_unless_a_first_chunk_share_is_given(lead_share):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    uniform = SimpleNamespace(image_blocks=lead_share, first_chunk_share=None)
    draws = [train_tiny.sample_context(12, uniform, g) for _ in range(4000)]
    chunks = 4 - int(lead_share)  # 12 latent frames: four 3-frame chunks, or an image block and three
    assert {lead for lead, _ in draws} == {int(lead_share)}
    counts = torch.bincount(torch.tensor([n for _, n in draws]), minlength=chunks)
    assert len(counts) == chunks and counts.min() > 0.8 * 4000 / chunks  # each chunk about as often
    weighted = SimpleNamespace(image_blocks=lead_share, first_chunk_share=0.5)
    first = sum(n == 0 for _, n in (train_tiny.sample_context(12, weighted, g) for _ in range(4000))) / 4000
    assert abs(first - (0.5 + 0.5 / chunks)) < 0.03  # the share, plus the uniform draw's own first chunks


def test_first_chunk_share_outside_zero_to_one_is_refused(capsys):
    with pytest.raises(SystemExit):
        train_tiny.main(["--out", "unused", "--smoke", "--first-chunk-share", "1.5"])
    assert "--first-chunk-share 1.5" in capsys.readouterr().err


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_decoder_phase_draws_its_latents_at_the_asked_share_of_the_posterior_noise(noise, monkeypatch):
    """`--decoder-noise s`: the decoder trains on ``mean + s * std * eps`` of the frozen encoder's posterior (0:
    the means the transformer learned; 1, the default: samples). Checked against the posterior itself: the
    residual over s * std is standard normal noise (none at all at 0)."""
    import argparse

    import numpy as np

    from genkv.testing import tiny_wan_vae

    vae = tiny_wan_vae(seed=3)
    pool = np.random.default_rng(0).integers(0, 256, (4, 9, 16, 16, 3), dtype=np.uint8)
    seen = []
    decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z: seen.append(z.detach().clone()) or decode(z))
    args = argparse.Namespace(decoder_lr=0.0, seed=0, decoder_minutes=1.0, max_steps=1, vae_batch=2,
                              sprite_weight=1.0, edge_weight=0.0, decoder_noise=noise)
    train_tiny.finetune_decoder(vae, pool, args, torch.device("cpu"), [])
    idx = np.random.default_rng(args.seed + 1).integers(0, len(pool), args.vae_batch)  # the clips it drew
    with torch.no_grad():
        posterior = vae.encode(train_tiny.to_video_tensor(pool[idx], "cpu")).latent_dist
    (z,) = seen
    if noise == 0:
        torch.testing.assert_close(z, posterior.mean, rtol=0, atol=1e-5)
    else:
        eps = (z - posterior.mean) / (noise * posterior.std)
        assert abs(eps.mean().item()) < 0.1 and 0.9 < eps.std().item() < 1.1


def test_the_pool_draws_its_clips_with_the_asked_room():
    from genkv.data import make_video

    pool, prompts = train_tiny.make_pool(6, 17, seed=3, workers=1, max_objects=2, backgrounds=("plain",),
                                         radius=(0.13, 0.21), room_frames=16)
    for i in range(6):
        video = make_video(3 * 1_000_003 + i, 17, max_objects=2, backgrounds=("plain",), radius=(0.13, 0.21),
                           room_frames=16)
        assert np.array_equal(pool[i], video.frames) and prompts[i] == video.prompt
    with pytest.raises(SystemExit):  # a one-line usage error, before any pool is drawn
        train_tiny.main(["--out", "unused", "--smoke", "--room-frames", "-1"])
