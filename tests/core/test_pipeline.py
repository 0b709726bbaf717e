"""SelfForcingPipeline: scheduler numbers, numerics, streaming decode, checkpoint conversion, loading."""

import json

import numpy as np
import pytest
import torch

import genkv
from genkv.pipelines import CheckpointError, SelfForcingPipeline, SelfForcingScheduler, StreamingVAEDecoder
from genkv.pipelines.self_forcing import (
    convert_self_forcing_state_dict,
    load_self_forcing_checkpoint,
    to_upstream_state_dict,
)
from genkv.testing import tiny_self_forcing_pipeline, tiny_wan_transformer, tiny_wan_vae


def test_scheduler_matches_upstream_warped_steps():
    s = SelfForcingScheduler()
    # Upstream: sigma(s) = 5s / (1 + 4s) at s = 1 - k/1000 for k = 1000 - [1000, 750, 500, 250].
    for step, t, sigma in zip([1000, 750, 500, 250], s.timesteps, s.sigmas):
        x = step / 1000
        assert float(sigma) == pytest.approx(5 * x / (1 + 4 * x), abs=1e-6)
        assert float(t) == pytest.approx(1000 * 5 * x / (1 + 4 * x), abs=1e-3)
    assert s.timesteps.dtype == torch.float32


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_ode_samplers_are_exact_on_the_straight_paths_of_a_point_mass(sampler):
    # For data that is one point x*, the flow along x = (1 - s) x* + s noise is the constant noise - x*
    # = (x - x*) / s: Euler steps follow it exactly and land on x*, whatever the step list; so does
    # DPM-Solver++(2M), whose extrapolated clean chunk is x* when every prediction is x*.
    s = SelfForcingScheduler(denoising_step_list=(1000, 900, 620, 300, 45), shift=2.0, sampler=sampler)
    target = torch.randn(2, 16, 3, 4, 4, dtype=torch.float64)
    x = torch.randn_like(target)
    for k, sigma in enumerate(s.sigmas.tolist()):
        flow = (x - target) / sigma
        x0 = s.predict_x0(x, flow, sigma).double()
        if k + 1 < len(s.sigmas):
            x = s.next_sample(x, flow, x0, k, noise=None).double()
    torch.testing.assert_close(x0, target, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sampler must be"):
        SelfForcingScheduler(sampler="ddim")


def _gaussian_sampling_error(sampler: str, steps: int) -> float:
    """Sample data N(mu, sd^2) with the exact clean-chunk prediction from sigma(1000) to sigma(200); the exact
    flow keeps the standardised coordinate, x_sigma = (1 - sigma) mu + sqrt((1 - sigma)^2 sd^2 + sigma^2) noise."""
    mu, sd = 0.7, 0.5
    s = SelfForcingScheduler(denoising_step_list=tuple(1000 - i * 800 // steps for i in range(steps + 1)),
                             shift=2.0, sampler=sampler)
    noise = torch.randn(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = noise.clone()
    sigmas = s.sigmas.double().tolist()
    for k, sigma in enumerate(sigmas[:-1]):
        alpha = 1 - sigma
        x0 = mu + alpha * sd**2 / (alpha**2 * sd**2 + sigma**2) * (x - alpha * mu)  # E[x0 | x], exact
        x = s.next_sample(x, (x - x0) / sigma, x0, k, noise=None).double()
    alpha = 1 - sigmas[-1]
    exact = alpha * mu + (alpha**2 * sd**2 + sigmas[-1] ** 2) ** 0.5 * noise
    return float((x - exact).abs().max())


def test_dpmpp_2m_converges_at_second_order_and_euler_at_first():
    euler = [_gaussian_sampling_error("euler", n) for n in (8, 16, 32)]
    dpm = [_gaussian_sampling_error("dpmpp_2m", n) for n in (8, 16, 32)]
    # halving the step (8 -> 16 -> 32) halves Euler's error ...
    first_halving, second_halving = euler[0] / euler[1], euler[1] / euler[2]
    # first order: each halving divides the error by 2 (measured 1.96 and 1.98); 2nd order would give ~4
    assert first_halving == pytest.approx(2.0, abs=0.3), euler
    assert second_halving == pytest.approx(2.0, abs=0.3), euler
    # ... and quarters DPM-Solver++(2M)'s
    assert dpm[0] / dpm[1] > 3.5, dpm
    assert dpm[1] / dpm[2] > 3.5, dpm
    assert dpm[0] < euler[2]  # 8 second-order steps beat 32 Euler steps


def test_the_models_default_guidance_scale_is_used_when_none_is_passed():
    pipe = tiny_self_forcing_pipeline()

    def render(**kwargs):
        out = pipe("a red circle", num_frames=9, output_type="latent", generator=torch.Generator().manual_seed(0),
                   **kwargs)
        return torch.as_tensor(np.asarray(out.frames))

    plain = render()
    pipe.register_to_config(default_guidance_scale=3.0)
    assert torch.equal(render(), render(guidance_scale=3.0))
    assert not torch.equal(render(), plain)
    assert torch.equal(render(guidance_scale=1.0), plain)


def test_upstream_numerics_rmsnorm_and_fp64_timesteps():
    from genkv.pipelines.self_forcing.numerics import Float64Timesteps, UpcastRMSNorm

    pipe = tiny_self_forcing_pipeline()
    attn = pipe.transformer.blocks[0].attn1
    assert isinstance(attn.norm_q, UpcastRMSNorm)
    x = torch.randn(2, 5, attn.norm_q.weight.shape[0], dtype=torch.bfloat16)
    w = torch.randn(attn.norm_q.weight.shape[0], dtype=torch.bfloat16)
    attn.norm_q.weight.data = w
    xd = x.double()
    want = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * w
    assert torch.equal(attn.norm_q(x), want)
    emb = pipe.transformer.condition_embedder.timesteps_proj
    assert isinstance(emb, Float64Timesteps)
    t = torch.tensor([937.5, 625.0])
    half = emb.num_channels // 2
    freqs = 10000.0 ** (-np.arange(half) / half)
    ang = np.outer([937.5, 625.0], freqs)
    want = np.concatenate([np.cos(ang), np.sin(ang)], axis=1)
    np.testing.assert_allclose(emb(t).numpy(), want, rtol=0, atol=1e-7)


def test_streaming_decode_equals_one_decode_of_all_latents():
    vae = tiny_wan_vae(seed=2)
    z = torch.randn(1, 16, 9, 4, 4, generator=torch.Generator().manual_seed(0))
    decoder = StreamingVAEDecoder(vae)
    parts = [decoder.decode(z[:, :, i : i + 3]) for i in range(0, 9, 3)]
    streamed = torch.cat(parts, dim=2)
    whole = vae.decode(decoder.denormalize(z).to(vae.dtype)).sample
    assert [p.shape[2] for p in parts] == [9, 12, 12]
    assert streamed.shape == whole.shape
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frames_per_call", [None, 2])
def test_several_latent_frames_per_decoder_call_give_the_same_pixels_as_one_at_a_time(frames_per_call):
    # float64: the causal convolutions read their previous frames from the cache, so the grouping is exact.
    vae = tiny_wan_vae(seed=3).double()
    z = torch.randn(1, 16, 11, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    one = StreamingVAEDecoder(vae, frames_per_call=1)
    grouped = StreamingVAEDecoder(vae, frames_per_call=frames_per_call)
    for start, stop in ((0, 3), (3, 6), (6, 7), (7, 11)):  # uneven chunks, as the last chunk of a render
        a = one.decode(z[:, :, start:stop])
        b = grouped.decode(z[:, :, start:stop])
        assert a.shape == b.shape
        assert torch.equal(a, b), (start, stop)
    assert one.frames_decoded == grouped.frames_decoded == 11


def test_frames_per_call_must_be_positive():
    with pytest.raises(ValueError, match="frames_per_call"):
        StreamingVAEDecoder(tiny_wan_vae(), frames_per_call=0)


def test_stream_yields_exactly_num_frames_and_is_deterministic_per_seed():
    pipe = tiny_self_forcing_pipeline()
    chunks = list(pipe.stream("a red circle", num_frames=50, generator=torch.Generator().manual_seed(1)))
    assert [c.shape[0] for c in chunks] == [9, 12, 12, 12, 5]
    assert all(c.dtype == np.uint8 and c.shape[1:] == (64, 64, 3) for c in chunks)
    again = list(pipe.stream("a red circle", num_frames=50, generator=torch.Generator().manual_seed(1)))
    assert all(np.array_equal(a, b) for a, b in zip(chunks, again))
    other = np.concatenate(list(pipe.stream("a red circle", num_frames=50, generator=torch.Generator().manual_seed(2))))
    assert not np.array_equal(np.concatenate(chunks), other)


def test_call_returns_diffusers_style_outputs_and_matches_stream():
    pipe = tiny_self_forcing_pipeline()
    streamed = np.concatenate(list(pipe.stream("x", num_frames=21, generator=torch.Generator().manual_seed(3))))
    out = pipe("x", num_frames=21, output_type="uint8", generator=torch.Generator().manual_seed(3)).frames
    assert out.shape == (1, 21, 64, 64, 3)
    assert np.array_equal(out[0], streamed)
    as_float = pipe("x", num_frames=21, generator=torch.Generator().manual_seed(3)).frames
    np.testing.assert_allclose(as_float[0], streamed / 255.0, atol=1e-6)
    lat = pipe("x", num_frames=21, output_type="latent", generator=torch.Generator().manual_seed(3)).frames
    assert lat.shape == (1, 16, pipe.latent_frames_for(21), 8, 8)


def test_batch_of_prompts_gives_per_prompt_videos():
    pipe = tiny_self_forcing_pipeline()
    out = pipe(["a red circle", "a blue square"], num_frames=9, output_type="uint8").frames
    assert out.shape == (2, 9, 64, 64, 3)


def test_prompts_change_the_video():
    pipe = tiny_self_forcing_pipeline()
    a = pipe("a red circle", num_frames=9, output_type="uint8", generator=torch.Generator().manual_seed(0)).frames
    b = pipe("a blue square", num_frames=9, output_type="uint8", generator=torch.Generator().manual_seed(0)).frames
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_frame_counts_are_rejected(bad):
    with pytest.raises(ValueError, match="num_frames"):
        next(iter(tiny_self_forcing_pipeline().stream("x", num_frames=bad)))


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="height must be a positive multiple of 16"):
        next(iter(tiny_self_forcing_pipeline().stream("x", num_frames=9, height=40)))


def test_cfg_keeps_a_cache_per_branch():
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(), "rolling", window_frames=6)
    list(pipe.stream("a red circle", num_frames=33, guidance_scale=3.0, negative_prompt="blurry"))
    branches = {row["branch"] for row in genkv.cache_stats(pipe)["layers"]}
    assert branches == {"cond", "uncond"}


# -- checkpoints -------------------------------------------------------------------------------------------
# Upstream names of block 0 (the Self-Forcing CausalWanModel state dict), as published in its checkpoints.
UPSTREAM_BLOCK0 = {
    "model.blocks.0.modulation", "model.blocks.0.self_attn.q.weight", "model.blocks.0.self_attn.q.bias",
    "model.blocks.0.self_attn.k.weight", "model.blocks.0.self_attn.k.bias", "model.blocks.0.self_attn.v.weight",
    "model.blocks.0.self_attn.v.bias", "model.blocks.0.self_attn.o.weight", "model.blocks.0.self_attn.o.bias",
    "model.blocks.0.self_attn.norm_q.weight", "model.blocks.0.self_attn.norm_k.weight",
    "model.blocks.0.norm3.weight", "model.blocks.0.norm3.bias",
    "model.blocks.0.cross_attn.q.weight", "model.blocks.0.cross_attn.q.bias",
    "model.blocks.0.cross_attn.k.weight", "model.blocks.0.cross_attn.k.bias",
    "model.blocks.0.cross_attn.v.weight", "model.blocks.0.cross_attn.v.bias",
    "model.blocks.0.cross_attn.o.weight", "model.blocks.0.cross_attn.o.bias",
    "model.blocks.0.cross_attn.norm_q.weight", "model.blocks.0.cross_attn.norm_k.weight",
    "model.blocks.0.ffn.0.weight", "model.blocks.0.ffn.0.bias", "model.blocks.0.ffn.2.weight", "model.blocks.0.ffn.2.bias",
}
UPSTREAM_TOP = {
    "model.patch_embedding.weight", "model.patch_embedding.bias", "model.text_embedding.0.weight",
    "model.text_embedding.0.bias", "model.text_embedding.2.weight", "model.text_embedding.2.bias",
    "model.time_embedding.0.weight", "model.time_embedding.0.bias", "model.time_embedding.2.weight",
    "model.time_embedding.2.bias", "model.time_projection.1.weight", "model.time_projection.1.bias",
    "model.head.modulation", "model.head.head.weight", "model.head.head.bias",
}


def _upstream_checkpoint(model):
    return to_upstream_state_dict(model)


def test_upstream_names_are_exactly_the_published_ones():
    names = set(_upstream_checkpoint(tiny_wan_transformer()))
    block0 = {n for n in names if n.startswith("model.blocks.0.")}
    assert block0 == UPSTREAM_BLOCK0
    assert {n for n in names if not n.startswith("model.blocks.")} == UPSTREAM_TOP
    assert len(names) == 15 + 27 * 2


def test_conversion_agrees_with_diffusers_single_file_converter():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    upstream = _upstream_checkpoint(tiny_wan_transformer())
    ours = convert_self_forcing_state_dict(upstream)
    theirs = convert_wan_transformer_to_diffusers({k[len("model."):]: v for k, v in upstream.items()})
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_checkpoint_round_trip_reproduces_the_model(tmp_path):
    source = tiny_wan_transformer(seed=1)
    upstream = _upstream_checkpoint(source)
    fsdp = {k.replace("model.", "model._fsdp_wrapped_module.", 1): v for k, v in upstream.items()}
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": fsdp, "generator_ema": upstream, "step": 600}, path)
    target = tiny_wan_transformer(seed=2)
    x = torch.randn(1, 16, 3, 8, 8)
    t, text = torch.tensor([400.0]), torch.randn(1, 7, 32)
    assert not torch.allclose(target(x, t, text).sample, source(x, t, text).sample)
    load_self_forcing_checkpoint(target, path)  # generator_ema
    assert torch.equal(target(x, t, text).sample, source(x, t, text).sample)
    load_self_forcing_checkpoint(tiny_wan_transformer(seed=3), path, use_ema=False)  # generator (FSDP names)


def test_mismatched_checkpoint_lists_the_keys(tmp_path):
    upstream = _upstream_checkpoint(tiny_wan_transformer(num_layers=1))
    path = tmp_path / "one_layer.pt"
    torch.save({"generator_ema": upstream}, path)
    with pytest.raises(CheckpointError, match=r"1 unexpected|27 missing: blocks\.1\.") as err:
        load_self_forcing_checkpoint(tiny_wan_transformer(num_layers=2), path)
    assert "blocks.1.attn1" in str(err.value)
    wide = _upstream_checkpoint(tiny_wan_transformer(ffn_dim=64))
    torch.save({"generator_ema": wide}, path)
    with pytest.raises(CheckpointError, match="of another shape: blocks.0.ffn"):
        load_self_forcing_checkpoint(tiny_wan_transformer(), path)


@pytest.mark.parametrize(
    "content, message",
    [(b"not a checkpoint", "is not a PyTorch checkpoint"), (None, "not found")],
)
def test_unreadable_checkpoints_fail_clearly(tmp_path, content, message):
    path = tmp_path / "ckpt.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_self_forcing_checkpoint(tiny_wan_transformer(), path)


def test_checkpoint_without_generator_fails_clearly(tmp_path):
    path = tmp_path / "opt.pt"
    torch.save({"optimizer": {"lr": 1.0}}, path)
    with pytest.raises(CheckpointError, match="no 'generator_ema' / 'generator'"):
        load_self_forcing_checkpoint(tiny_wan_transformer(), path)


# -- loading -----------------------------------------------------------------------------------------------
def test_save_and_from_pretrained_round_trip(tmp_path):
    pipe = tiny_self_forcing_pipeline(seed=4)
    pipe.save_pretrained(tmp_path / "sf")
    loaded = SelfForcingPipeline.from_pretrained(tmp_path / "sf")
    assert isinstance(loaded.scheduler, SelfForcingScheduler)
    a = pipe("x", num_frames=9, output_type="uint8", generator=torch.Generator().manual_seed(0)).frames
    b = loaded("x", num_frames=9, output_type="uint8", generator=torch.Generator().manual_seed(0)).frames
    assert np.array_equal(a, b)


def test_from_pretrained_on_a_wan_folder_with_a_self_forcing_checkpoint(tmp_path):
    pipe = tiny_self_forcing_pipeline(seed=5)
    folder = tmp_path / "wan"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "WanPipeline"  # what a Wan2.1 diffusers folder says
    index["scheduler"] = ["diffusers", "UniPCMultistepScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    trained = tiny_wan_transformer(seed=9)
    ckpt = tmp_path / "sf.pt"
    torch.save({"generator_ema": to_upstream_state_dict(trained)}, ckpt)
    loaded = SelfForcingPipeline.from_pretrained(folder, checkpoint=ckpt, max_sequence_length=64,
                                                 default_height=64, default_width=64)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.transformer.state_dict()[name], tensor)
    assert loaded("x", num_frames=9, output_type="uint8").frames.shape == (1, 9, 64, 64, 3)
