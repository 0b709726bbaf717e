"""Self-Forcing pipeline trust: upstream's noise order, prompt padding, strict checkpoint keys, ``scheduler=``."""

import json

import numpy as np
import pytest
import torch

from genkv.pipelines import CheckpointError, SelfForcingPipeline, SelfForcingScheduler
from genkv.pipelines.self_forcing import (
    from_upstream_layout,
    load_self_forcing_checkpoint,
    to_upstream_layout,
    to_upstream_state_dict,
)
from genkv.testing import tiny_self_forcing_pipeline, tiny_wan_transformer

STEPS = 4  # SelfForcingScheduler's default denoising steps


def _spy(pipe):
    """Record each chunk's initial sample (the first forward's input) and every re-noise draw."""
    starts, renoise = [], []
    flow, next_sample = pipe._flow, pipe.scheduler.next_sample

    def spy_flow(sample, timestep, *args, **kwargs):
        if timestep == float(pipe.scheduler.timesteps[0]):
            starts.append(sample.clone())
        return flow(sample, timestep, *args, **kwargs)

    def spy_next(sample, flow_, x0, step, noise):
        renoise.append(noise.clone())
        return next_sample(sample, flow_, x0, step, noise)

    pipe._flow, pipe.scheduler.next_sample = spy_flow, spy_next
    return starts, renoise


def _render(pipe, generator, batch=1, frames=17, **kwargs):
    prompt = ["a red circle"] * batch
    return pipe(prompt, num_frames=frames, output_type="latent", generator=generator, **kwargs).frames


@pytest.mark.parametrize("batch", [1, 2])
def test_upstream_noise_consumes_the_generator_as_upstreams_inference_does(batch):
    pipe = tiny_self_forcing_pipeline()
    starts, renoise = _spy(pipe)
    generator = torch.Generator().manual_seed(7)
    latents = _render(pipe, generator, batch, noise="upstream")
    b, c, t, h, w = latents.shape  # 17 frames -> 5 latent -> 6 (two chunks of 3)
    # Upstream, written out: inference.py draws the whole video's noise (B, T, C, H, W) first; then for each
    # block, between its denoising steps, randn_like(denoised_pred.flatten(0, 1)): (B * F, C, H, W).
    ref = torch.Generator().manual_seed(7)
    video = torch.randn((b, t, c, h, w), generator=ref, dtype=torch.float32)
    per_chunk = [[torch.randn((b * 3, c, h, w), generator=ref) for _ in range(STEPS - 1)] for _ in range(t // 3)]
    assert len(starts) == t // 3 and len(renoise) == (t // 3) * (STEPS - 1)
    for i, start in enumerate(starts):
        assert torch.equal(start, from_upstream_layout(video[:, 3 * i : 3 * i + 3]))
        for k, drawn in enumerate(per_chunk[i]):
            assert torch.equal(renoise[i * (STEPS - 1) + k], from_upstream_layout(drawn.unflatten(0, (b, 3))))
    assert torch.equal(generator.get_state(), ref.get_state())  # nothing else was drawn


def test_upstream_noise_without_a_generator_draws_from_the_global_rng_as_set_seed_does():
    pipe = tiny_self_forcing_pipeline()
    torch.manual_seed(3)  # upstream's set_seed(3)
    a = _render(pipe, None, noise="upstream")
    b = _render(pipe, torch.Generator().manual_seed(3), noise="upstream")
    assert torch.equal(a, b)


def test_upstream_noise_from_the_constructor_and_the_default_is_unchanged():
    pipe = tiny_self_forcing_pipeline()
    starts, renoise = _spy(pipe)
    default = _render(pipe, torch.Generator().manual_seed(5))
    # genkv's order: each chunk draws (B, C, 3, h, w) when it starts, then one draw of that shape per re-noise.
    ref = torch.Generator().manual_seed(5)
    shape = tuple(starts[0].shape)
    for i in range(len(starts)):
        assert torch.equal(starts[i], torch.randn(shape, generator=ref))
        for k in range(STEPS - 1):
            assert torch.equal(renoise[i * (STEPS - 1) + k], torch.randn(shape, generator=ref))
    assert torch.equal(default, _render(pipe, torch.Generator().manual_seed(5), noise="chunk"))
    upstream = _render(pipe, torch.Generator().manual_seed(5), noise="upstream")
    assert not torch.equal(default, upstream)
    pipe.register_to_config(noise="upstream")
    assert torch.equal(_render(pipe, torch.Generator().manual_seed(5)), upstream)
    with pytest.raises(ValueError, match="noise must be one of"):
        _render(pipe, None, noise="numpy")


def test_upstream_noise_with_given_latents_draws_only_the_renoise():
    pipe = tiny_self_forcing_pipeline()
    starts, renoise = _spy(pipe)
    given = torch.randn(1, 16, 6, 8, 8)
    _render(pipe, torch.Generator().manual_seed(1), latents=given, noise="upstream")
    assert torch.equal(torch.cat(starts, dim=2), given)
    ref = torch.Generator().manual_seed(1)
    assert torch.equal(renoise[0], from_upstream_layout(torch.randn((3, 16, 8, 8), generator=ref).unsqueeze(0)))


def test_layout_helpers_are_inverse_views():
    x = torch.randn(2, 16, 6, 4, 5)
    up = to_upstream_layout(x)
    assert up.shape == (2, 6, 16, 4, 5) and up.data_ptr() == x.data_ptr()
    assert torch.equal(up[:, 4, 3], x[:, 3, 4])
    assert torch.equal(from_upstream_layout(up), x)
    with pytest.raises(ValueError, match="5-D"):
        to_upstream_layout(torch.zeros(2, 3))


# -- prompt embeddings ---------------------------------------------------------------------------------------
def test_short_prompt_embeds_are_zero_padded_to_the_text_length():
    pipe = tiny_self_forcing_pipeline()
    length = pipe.config.max_sequence_length
    short = torch.randn(1, 7, 32)
    padded = torch.cat([short, torch.zeros(1, length - 7, 32)], dim=1)

    def render(embeds, **kwargs):
        return pipe(prompt_embeds=embeds, num_frames=9, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **kwargs).frames

    assert torch.equal(render(short), render(padded))
    # and the negative branch too (CFG)
    neg = torch.randn(1, 3, 32)
    neg_padded = torch.cat([neg, torch.zeros(1, length - 3, 32)], dim=1)
    assert torch.equal(render(short, negative_prompt_embeds=neg, guidance_scale=3.0),
                       render(padded, negative_prompt_embeds=neg_padded, guidance_scale=3.0))
    with pytest.raises(ValueError, match=f"more than the text length {length}"):
        render(torch.randn(1, length + 1, 32))


# -- checkpoints: generator_ema vs generator -------------------------------------------------------------------
@pytest.mark.parametrize("present, use_ema, option", [("generator", True, "use_ema=False"),
                                                       ("generator_ema", False, "use_ema=True")])
def test_asking_for_the_weights_a_checkpoint_lacks_is_an_error_naming_what_it_has(tmp_path, present, use_ema,
                                                                                  option):
    path = tmp_path / "sf.pt"
    torch.save({present: to_upstream_state_dict(tiny_wan_transformer(seed=1)), "step": 3}, path)
    target = tiny_wan_transformer(seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    wanted = "generator_ema" if use_ema else "generator"
    with pytest.raises(CheckpointError, match=f"no '{wanted}' weights.*holds '{present}'.*pass {option}"):
        load_self_forcing_checkpoint(target, path, use_ema=use_ema)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing loaded
    load_self_forcing_checkpoint(target, path, use_ema=not use_ema)  # the option named works


def test_each_of_two_weight_sets_loads_its_own(tmp_path):
    ema, plain = tiny_wan_transformer(seed=1), tiny_wan_transformer(seed=2)
    path = tmp_path / "sf.pt"
    torch.save({"generator_ema": to_upstream_state_dict(ema), "generator": to_upstream_state_dict(plain)}, path)
    for use_ema, source in ((True, ema), (False, plain)):
        target = load_self_forcing_checkpoint(tiny_wan_transformer(seed=3), path, use_ema=use_ema)
        assert all(torch.equal(source.state_dict()[k], v) for k, v in target.state_dict().items())


# -- from_pretrained(..., scheduler=X) -------------------------------------------------------------------------
def test_from_pretrained_uses_the_given_scheduler_without_loading_the_folders(tmp_path):
    folder = tmp_path / "sf"
    tiny_self_forcing_pipeline(seed=4).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["genkv_missing_module", "MyCustomScheduler"]  # a class this machine cannot import
    (folder / "model_index.json").write_text(json.dumps(index))
    given = SelfForcingScheduler(sampler="euler", denoising_step_list=(1000, 500))
    loaded = SelfForcingPipeline.from_pretrained(folder, scheduler=given)
    assert loaded.scheduler is given
    frames = loaded("x", num_frames=9, output_type="uint8", generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 9, 64, 64, 3) and np.isfinite(frames).all()
