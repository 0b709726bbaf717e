"""InfinityPipeline on the tiny random-weight model: call shapes and types, CFG as upstream, the scale KV cache
through genkv's methods, and the official scale schedules."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import genkv
import genkv.pipelines.infinity.pipeline as pipeline_module
from genkv.pipelines import InfinityPipeline
from genkv.pipelines.infinity import scale_schedule
from genkv.testing import tiny_infinity_pipeline

PROMPTS = ["a red cube", "a cat on a mat"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_infinity_pipeline(seed=0)


@pytest.fixture(autouse=True)
def _full_cache(pipe):
    genkv.remove_genkv(pipe)
    yield
    genkv.remove_genkv(pipe)


def sample(pipe, prompt=PROMPTS, seed=0, **kwargs):
    kwargs.setdefault("output_type", "pt")
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_output_types_and_shapes(pipe):
    assert isinstance(pipe, InfinityPipeline)
    pt = sample(pipe, guidance_scale=3.0)
    assert pt.shape == (2, 3, 32, 32) and 0 <= float(pt.min()) and float(pt.max()) <= 1
    np_images = sample(pipe, guidance_scale=3.0, output_type="np")
    assert isinstance(np_images, np.ndarray) and np_images.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy())
    pil = sample(pipe, "one prompt", output_type="pil")
    assert len(pil) == 1 and pil[0].size == (32, 32) and pil[0].mode == "RGB"
    with pytest.raises(ValueError, match="output_type"):
        pipe("x", output_type="latent")
    with pytest.raises(ValueError, match="prompt"):
        pipe([])


def test_seeded_and_batch_independent(pipe):
    a, b = sample(pipe, seed=1), sample(pipe, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(pipe, seed=2))
    # With top_k=1 nothing is random: each prompt's image does not depend on the others in the batch.
    both = sample(pipe, top_k=1)
    assert torch.allclose(both[1:], sample(pipe, PROMPTS[1:], top_k=1), atol=1e-5)


def _first_scale_logits(pipe, monkeypatch, **kwargs):
    """The bit logits the sampler receives at the first scale (their inputs do not depend on sampled bits)."""
    seen = []
    original = pipeline_module.sample_bits
    monkeypatch.setattr(pipeline_module, "sample_bits", lambda logits, *a: (seen.append(logits), original(logits, *a))[1])
    pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)
    monkeypatch.setattr(pipeline_module, "sample_bits", original)
    return seen[0]


def test_guidance_combines_conditional_and_learned_unconditional_logits(pipe, monkeypatch):
    features, mask = pipe.encode_prompt(PROMPTS)
    # official: each prompt's tokens are replaced by the first rows of the learned cfg_uncond
    uncond = pipe.transformer.cfg_uncond.detach()[: mask.shape[1]].expand(len(PROMPTS), -1, -1)
    cond_logits = _first_scale_logits(pipe, monkeypatch, prompt_embeds=(features, mask), guidance_scale=1.0)
    uncond_logits = _first_scale_logits(pipe, monkeypatch, prompt_embeds=(uncond, mask), guidance_scale=1.0)
    guided = _first_scale_logits(pipe, monkeypatch, prompt_embeds=(features, mask), guidance_scale=4.0, tau=0.5)
    expected = (4.0 * cond_logits + (1 - 4.0) * uncond_logits) / 0.5  # tau divides both branches first
    assert torch.allclose(guided, expected, atol=1e-4)
    # guidance 1 is the plain conditional model (no unconditional branch is even run)
    plain = _first_scale_logits(pipe, monkeypatch, prompt=PROMPTS, guidance_scale=1.0)
    assert torch.allclose(plain, cond_logits, atol=1e-5)
    assert not torch.allclose(cond_logits, uncond_logits, atol=1e-3)


def test_guidance_one_runs_no_unconditional_branch_and_negative_prompts_change_guided_images(pipe):
    sample(pipe, guidance_scale=1.0)
    assert pipe.last_cache.k[0] is None  # the last scale's K/V are dropped: look at the recorded rows instead
    rows_plain = pipe.last_cache.rows[0][0][1]
    sample(pipe, guidance_scale=3.0)
    assert pipe.last_cache.rows[0][0][1] == 2 * rows_plain  # conditional + unconditional rows
    a = sample(pipe, guidance_scale=3.0, top_k=1)
    b = sample(pipe, guidance_scale=3.0, top_k=1, negative_prompt="blurry")
    assert not torch.equal(a, b)
    c = sample(pipe, guidance_scale=[3.0] * 6 + [1.0], top_k=1)  # per-scale guidance (official cfg_list)
    assert not torch.equal(a, c)


def test_full_cache_method_equals_default_and_scalekv_at_budget_one_equals_full(pipe):
    reference = sample(pipe, guidance_scale=3.0)
    genkv.apply_genkv(pipe, "full")
    assert torch.equal(sample(pipe, guidance_scale=3.0), reference)
    genkv.apply_genkv(pipe, "scalekv", budget=1.0)
    assert torch.equal(sample(pipe, guidance_scale=3.0), reference)


@pytest.mark.parametrize("method", ["scalekv", "hack"])
def test_budgeted_methods_run_and_report(pipe, method):
    genkv.apply_genkv(pipe, "full")
    sample(pipe, guidance_scale=3.0)
    full = genkv.cache_stats(pipe)
    genkv.apply_genkv(pipe, method, budget=0.5)
    images = sample(pipe, guidance_scale=3.0)
    stats = genkv.cache_stats(pipe)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert stats["method"] == method and 0 < stats["peak_bytes"] < full["peak_bytes"]
    assert sorted(stats["scales"]) == list(range(7))


def test_aspect_ratio_schedule_and_square_only_budgets(pipe):
    images = sample(pipe, PROMPTS[:1], h_div_w=0.5)
    h, w = scale_schedule("0.06M", 0.5)[-1]
    assert (h, w) == (11, 22) and images.shape == (1, 3, 2 * h, 2 * w)
    genkv.apply_genkv(pipe, "scalekv", budget=0.5)
    with pytest.raises(ValueError, match="square"):
        sample(pipe, PROMPTS[:1], h_div_w=0.5)


def test_official_schedules():
    assert scale_schedule("1M", 1.0) == ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20),
                                         (24, 24), (32, 32), (40, 40), (48, 48), (64, 64))
    tokens = {pn: sum(h * w for h, w in scale_schedule(pn)) for pn in ("0.06M", "0.25M", "0.60M", "1M")}
    assert tokens == {"0.06M": 521, "0.25M": 2521, "0.60M": 6425, "1M": 10521}
    assert scale_schedule("1M", 1 / 3)[-1] == (37, 111) and scale_schedule("1M", 2.9)[-1] == (111, 37)
    with pytest.raises(ValueError, match="pn"):
        scale_schedule("2M")


@pytest.mark.skipif(not os.environ.get("GENKV_INFINITY_DIR"), reason="set GENKV_INFINITY_DIR to an Infinity checkout")
def test_parity_with_the_official_code():
    script = Path(__file__).resolve().parents[2] / "eval" / "infinity_parity.py"
    run = subprocess.run([sys.executable, str(script), "--infinity", os.environ["GENKV_INFINITY_DIR"], "--depth", "2"],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0 and "RESULT" in run.stdout and "PASS" in run.stdout, run.stdout[-2000:]


def test_from_pretrained_loads_official_files_and_a_local_t5_folder(pipe, tmp_path):
    torch.save(pipe.transformer.state_dict(), tmp_path / "infinity_tiny.pth")
    torch.save({"vae": pipe.vae.state_dict()}, tmp_path / "infinity_vae_tiny.pth")
    pipe.text_encoder.save_pretrained(tmp_path / "t5")
    pipe.tokenizer.save_pretrained(tmp_path / "t5")
    loaded = InfinityPipeline.from_pretrained(tmp_path / "infinity_tiny.pth", vae=tmp_path / "infinity_vae_tiny.pth",
                                              text_encoder=tmp_path / "t5", pn="0.06M", max_length=64)
    assert torch.equal(sample(loaded, guidance_scale=3.0), sample(pipe, guidance_scale=3.0))
    with pytest.raises(ValueError, match="local flan-t5 folder"):
        InfinityPipeline.from_pretrained(tmp_path / "infinity_tiny.pth", vae=tmp_path / "infinity_vae_tiny.pth",
                                         text_encoder=tmp_path / "google/flan-t5-xl")
