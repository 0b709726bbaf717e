"""VARPipeline's samplers, more_smooth, patch_nums override and training checkpoints (issue 23, part 3).

The official-order tests re-implement the official ``VAR.autoregressive_infer_cfg`` draw order in plain torch on the
same tiny model: the head over all 2B rows, guidance ``(1 + t) * cond - t * uncond``, top-k then top-p, one
``torch.multinomial`` over every position of the batch per scale, and for ``more_smooth`` Gumbel noise drawn after it.
"""

from collections import OrderedDict

import pytest
import torch

from genkv.pipelines.var import VARCheckpointError, VARPipeline
from genkv.scales.cache import FullScaleCache
from genkv.testing import tiny_var_pipeline

LABELS = [1, 2, 7]


def reference_mask(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p written independently of genkv: keep the k largest, then the most likely tokens until the
    mass before them reaches top_p."""
    logits = logits.clone()
    if top_k > 0:
        kth = logits.sort(dim=-1, descending=True).values[..., top_k - 1: top_k]
        logits[logits < kth] = -torch.inf
    if top_p > 0:
        probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits[torch.zeros_like(drop).scatter(-1, order, drop)] = -torch.inf
    return logits


@torch.no_grad()
def reference_sample(pipe, labels, guidance, top_k, top_p, seed, more_smooth=False):
    """The official draw order in plain torch; returns the tokens of each scale and the images."""
    model, vae = pipe.transformer, pipe.vqvae
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    b = len(labels)
    cond, block_cond = model.condition(torch.tensor(labels + [config.num_classes] * b))
    x, cache = model.first_tokens(cond), FullScaleCache(config.depth, config.patch_nums)
    f_hat = torch.zeros(b, config.z_channels, config.patch_nums[-1], config.patch_nums[-1])
    codebook = vae.quantize.embedding.weight.detach()
    last, tokens = len(config.patch_nums) - 1, []
    for s, side in enumerate(config.patch_nums):
        logits = model.forward_scale(x, cond, block_cond, s, cache)  # (2B, l, V): all rows through the head at once
        ratio = s / last
        t = guidance * ratio
        masked = reference_mask((1 + t) * logits[:b] - t * logits[b:], top_k, top_p)
        probs = masked.softmax(-1).reshape(-1, masked.shape[-1])
        tokens.append(torch.multinomial(probs, 1, replacement=True, generator=gen).view(b, -1))
        if more_smooth:
            gumbel = -torch.empty_like(masked).exponential_(generator=gen).log()
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            h = torch.softmax((masked * (1 + ratio) + gumbel) / tau, -1) @ codebook.unsqueeze(0)  # as the official
        else:
            h = codebook[tokens[-1]]
        f_hat, nxt = vae.add_scale(s, f_hat, h.transpose(1, 2).reshape(b, -1, side, side))
        if s < last:
            start, end = config.scale_bounds()[s + 1]
            x = (model.word_embed(nxt.flatten(2).transpose(1, 2)) + model.level_positions()[:, start:end]).repeat(2, 1, 1)
    return tokens, (vae.decode_fhat(f_hat) + 1) / 2


def sample_recording_tokens(pipe, **kwargs):
    """Images of one call and the tokens it looked up in the codebook, scale by scale."""
    tokens = []
    hook = pipe.vqvae.quantize.embedding.register_forward_hook(lambda m, args, out: tokens.append(args[0].clone()))
    try:
        images = pipe(class_labels=LABELS, output_type="pt", **kwargs).images
    finally:
        hook.remove()
    return tokens, images


@pytest.mark.parametrize("guidance, top_k, top_p", [(4.0, 5, 0.8), (1.5, 0, 0.0), (3.0, 0, 0.9), (4.0, 12, 1.0)])
def test_official_sampler_draws_the_tokens_of_the_official_order_reimplemented_in_plain_torch(guidance, top_k, top_p):
    pipe = tiny_var_pipeline(seed=1)
    want_tokens, want_images = reference_sample(pipe, LABELS, guidance, top_k, top_p, seed=3)
    tokens, images = sample_recording_tokens(pipe, guidance_scale=guidance, top_k=top_k, top_p=top_p,
                                             sampler="official", generator=torch.Generator().manual_seed(3))
    assert len(tokens) == len(want_tokens)
    for got, want in zip(tokens, want_tokens):
        assert torch.equal(got, want)
    torch.testing.assert_close(images, want_images, rtol=0, atol=1e-6)


def test_official_sampler_with_more_smooth_follows_the_gumbel_formula_after_the_token_draw():
    pipe = tiny_var_pipeline(seed=1)
    _, want = reference_sample(pipe, LABELS, 4.0, 8, 0.9, seed=5, more_smooth=True)
    got = pipe(class_labels=LABELS, guidance_scale=4.0, top_k=8, top_p=0.9, sampler="official", more_smooth=True,
               generator=torch.Generator().manual_seed(5), output_type="pt").images
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    _, plain = reference_sample(pipe, LABELS, 4.0, 8, 0.9, seed=5)
    assert (got - plain).abs().max() > 1e-2  # smoothing changes the image, not just its rounding


def test_official_sampler_with_the_global_generator_matches_a_seeded_global_reference():
    pipe = tiny_var_pipeline(seed=2)
    torch.manual_seed(11)
    got = pipe(class_labels=LABELS, top_k=6, top_p=0.9, sampler="official", output_type="pt").images
    torch.manual_seed(11)
    again = pipe(class_labels=LABELS, top_k=6, top_p=0.9, sampler="official", generator=None, output_type="pt")
    assert torch.equal(got, again.images)
    _, want = reference_sample(pipe, LABELS, 4.0, 6, 0.9, seed=11)  # torch.manual_seed(11) seeds the CPU generator
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_fast_sampler_stays_the_default_and_differs_from_the_official_draws():
    pipe = tiny_var_pipeline(seed=1)

    def run(**kwargs):
        return pipe(class_labels=LABELS, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images

    default = run()
    assert torch.equal(default, run(sampler="fast"))
    assert not torch.equal(default, run(sampler="official"))
    smooth = run(more_smooth=True)
    assert not torch.equal(default, smooth)
    pipe.sample_batch = 2  # fast draws in slices of images: same numbers, same images (to the head's rounding)
    assert torch.equal(default, run())
    torch.testing.assert_close(run(more_smooth=True), smooth, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="sampler must be one of 'fast', 'official', got 'multinomial'"):
        run(sampler="multinomial")


def test_official_sampler_asks_for_a_generator_on_the_pipelines_device(monkeypatch):
    pipe = tiny_var_pipeline()
    monkeypatch.setattr(VARPipeline, "device", property(lambda self: torch.device("cuda")))
    with pytest.raises(ValueError, match=r"pass generator=torch.Generator\('cuda'\).manual_seed\(seed\), not a cpu"):
        pipe(class_labels=LABELS, sampler="official", generator=torch.Generator().manual_seed(0))


def save_tiny(tmp_path, pipe):
    var_path, vae_path = tmp_path / "var_tiny.pth", tmp_path / "vae_tiny.pth"
    torch.save(pipe.transformer.state_dict(), var_path)
    torch.save(pipe.vqvae.state_dict(), vae_path)
    return var_path, vae_path


def images_of(pipe):
    return pipe(class_labels=LABELS, generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_patch_nums_override_loads_a_schedule_of_the_users_and_a_mismatch_names_both(tmp_path):
    pipe = tiny_var_pipeline()
    var_path, vae_path = save_tiny(tmp_path, pipe)
    loaded = VARPipeline.from_pretrained(var_path, vae=vae_path, patch_nums=[1, 2, 3, 4])
    assert loaded.transformer.config.patch_nums == (1, 2, 3, 4)
    assert torch.equal(images_of(loaded), images_of(pipe))
    for wrong in ((1, 2, 5), (1, 1, 1, 3, 3, 3), (2, 1, 3, 4)):  # 30 tokens in 3 scales; in 6; first scale 2x2
        with pytest.raises(VARCheckpointError, match=rf"patch_nums \({wrong[0]}, .* does not match .*var_tiny.pth "
                                                     rf"\(30 tokens in 4 scales\)"):
            VARPipeline.from_pretrained(var_path, vae=vae_path, patch_nums=wrong)
    with pytest.raises(VARCheckpointError, match=r"30 tokens matches no known VAR schedule .* patch_nums="):
        VARPipeline.from_pretrained(var_path, vae=vae_path)


def test_patch_nums_against_a_released_schedule_names_it_and_warns_on_a_reordering(tmp_path):
    from genkv.pipelines.var import VARConfig, VARTransformer, load_var_transformer

    model = VARTransformer(VARConfig(depth=1, num_classes=2, vocab_size=8, z_channels=4, width=32, head_dim=16))
    torch.save(model.state_dict(), tmp_path / "var_d1.pth")
    with pytest.raises(VARCheckpointError, match=r"\(1, 2, 3\) \(14 tokens in 3 scales\) does not match .* "
                                                 r"\(680 tokens in 10 scales \(1, 2, 3, 4, 5, 6, 8, 10, 13, 16\)\)"):
        load_var_transformer(tmp_path / "var_d1.pth", patch_nums=(1, 2, 3))
    with pytest.warns(UserWarning, match="differs from the schedule"):
        load_var_transformer(tmp_path / "var_d1.pth", patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 16, 13))


def trainer_checkpoint(pipe) -> dict:
    """What the official train.py saves as ar-ckpt-*.pth: the trainer's state (config, both models, optimizer)
    and the run's arguments."""
    optimizer = torch.optim.AdamW(pipe.transformer.parameters())
    pipe.transformer.pos_1LC.sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    trainer = {"config": {"patch_nums": (1, 2, 3, 4), "resos": (16, 32, 48, 64), "label_smooth": 0.1, "prog_it": 0,
                          "last_prog_si": -1, "first_prog": True},
               "var_wo_ddp": pipe.transformer.state_dict(), "vae_local": pipe.vqvae.state_dict(),
               "var_opt": {"optimizer": optimizer.state_dict(), "scaler": {"scale": 1024.0, "_growth_tracker": 3}}}
    args = OrderedDict(depth=3, pn="1_2_3_4", patch_nums=(1, 2, 3, 4), tblr=1e-4, local_out_dir_path="/out")
    return {"epoch": 3, "iter": 0, "trainer": trainer, "args": args}


def test_a_training_checkpoint_loads_its_var_wo_ddp_and_vae_local_with_a_warning(tmp_path):
    pipe = tiny_var_pipeline()
    path = tmp_path / "ar-ckpt-last.pth"
    torch.save(trainer_checkpoint(pipe), path)
    with pytest.warns(UserWarning) as caught:
        loaded = VARPipeline.from_pretrained(path, vae=path)  # schedule from the trainer's config
    messages = [str(w.message) for w in caught]
    assert any("ar-ckpt-last.pth is a VAR training checkpoint: loading its ['trainer']['var_wo_ddp']" in m
               for m in messages)
    assert any("['trainer']['vae_local']" in m for m in messages)
    assert torch.equal(images_of(loaded), images_of(pipe))
    with pytest.warns(UserWarning), pytest.raises(VARCheckpointError, match=r"differs from the schedule \(1, 2, 3, 4\)"):
        VARPipeline.from_pretrained(path, vae=path, patch_nums=(1, 2, 5))
    broken = trainer_checkpoint(pipe)
    del broken["trainer"]["var_wo_ddp"]
    torch.save(broken, path)
    with pytest.raises(VARCheckpointError, match=r"training checkpoint without \['trainer'\]\['var_wo_ddp'\] "
                                                 r"\(it has config, vae_local, var_opt\)"):
        VARPipeline.from_pretrained(path, vae=path)
