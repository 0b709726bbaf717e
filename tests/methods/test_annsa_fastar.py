"""AnnSA (routed block-sparse self-attention) and fastar (TempCache + AnnSA + AnnCA)."""

import pytest
import torch

import genkv
from genkv.testing import tiny_self_forcing_pipeline

BLOCKS = dict(block_m=16, block_n=16)


def _run(pipe, embeds, noise, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.cat(list(pipe.rollout(embeds, noise.shape[2], 64, 64, latents=noise, generator=gen)), 2)


@pytest.fixture(scope="module")
def setup():
    pipe = tiny_self_forcing_pipeline(seed=11)
    embeds = pipe.encode_prompt("a green triangle")
    noise = torch.randn(1, 16, 12, 8, 8, generator=torch.Generator().manual_seed(4))
    genkv.apply_genkv(pipe, "full")
    return pipe, embeds, noise, _run(pipe, embeds, noise)


def test_annsa_with_every_block_selected_equals_full(setup):
    pipe, embeds, noise, full = setup
    genkv.apply_genkv(pipe, "annsa", top_k=1000, **BLOCKS)  # more blocks than exist
    torch.testing.assert_close(_run(pipe, embeds, noise), full, rtol=1e-5, atol=1e-5)
    assert genkv.cache_stats(pipe)["self_density"] == pytest.approx(1.0)
    genkv.apply_genkv(pipe, "annsa", top_k=None, top_p=1.0, **BLOCKS)
    torch.testing.assert_close(_run(pipe, embeds, noise), full, rtol=1e-5, atol=1e-5)


def test_annsa_sparse_routing_reads_less_and_changes_the_output(setup):
    pipe, embeds, noise, full = setup
    genkv.apply_genkv(pipe, "annsa", top_k=1, **BLOCKS)
    sparse = _run(pipe, embeds, noise)
    density = genkv.cache_stats(pipe)["self_density"]
    assert 0 < density < 1.0
    assert not torch.allclose(sparse, full, atol=1e-4)
    # A dense first step and routing per step are both honoured (different results, same shapes).
    genkv.apply_genkv(pipe, "annsa", top_k=1, dense_steps=4, **BLOCKS)
    assert not torch.allclose(_run(pipe, embeds, noise), sparse, atol=1e-6)
    genkv.apply_genkv(pipe, "annsa", top_k=1, refresh="step", **BLOCKS)
    assert _run(pipe, embeds, noise).shape == full.shape


def test_fastar_with_exact_settings_equals_full(setup):
    pipe, embeds, noise, full = setup
    genkv.apply_genkv(pipe, "fastar", threshold=1.5, budget_frames=100, top_k=1000, prompt_top_k=1000,
                      sink_frames=0, **BLOCKS)
    torch.testing.assert_close(_run(pipe, embeds, noise), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_dtype", ["bf16", "int8"])
def test_fastar_split_read_renders_what_the_single_kernel_call_renders(setup, kv_dtype):
    """``chunk_attention="sdpa"`` (the chunk's own keys by dense SDPA, the kernel resuming over the routed history)
    is the same attention: a sparse, merging, budgeted rollout renders the same frames. Key blocks of 32 over
    16-token frames: the chunk starts mid-block whenever the history holds an odd number of frames."""
    pipe, embeds, noise, full = setup
    settings = dict(budget_frames=5, top_k=1, threshold=0.9, prompt_top_k=8, block_m=16, block_n=32,
                    kv_dtype=kv_dtype)
    genkv.apply_genkv(pipe, "fastar", **settings)
    single = _run(pipe, embeds, noise)
    assert 0 < genkv.cache_stats(pipe)["self_density"] < 1
    genkv.apply_genkv(pipe, "fastar", chunk_attention="sdpa", **settings)
    split = _run(pipe, embeds, noise)
    assert not torch.allclose(single, full, atol=1e-4)  # sparse and merged for real
    # int8: a float32 rounding difference can move a committed value across a code boundary (one level of the
    # history changes), which the later chunks carry: measured up to 3.4e-5 after four chunks.
    tol = 1e-5 if kv_dtype == "bf16" else 1e-4
    torch.testing.assert_close(split, single, rtol=tol, atol=tol)


def test_fastar_long_rollout_stays_under_budget_with_flat_memory():
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=12), "fastar", budget_frames=6, top_k=2,
                             prompt_top_k=8, threshold=0.5, **BLOCKS)
    embeds = pipe.encode_prompt("a red circle bouncing")
    sizes = []
    for _ in pipe.rollout(embeds, 450, 64, 64, generator=torch.Generator().manual_seed(0)):  # 150 chunks
        stats = genkv.cache_stats(pipe)
        assert all(row["tokens"] <= 6 * 16 for row in stats["layers"])
        sizes.append(stats["bytes"])
    assert len(set(sizes[2:])) == 1
    assert stats["tokens_seen"] == 450 * 16 * 2
    assert 0 < stats["self_density"] < 1 and 0 < stats["cross_density"] < 1
    assert stats["method"] == "fastar"


@pytest.mark.parametrize(
    "overrides, field",
    [({"top_k": 0}, "top_k"), ({"top_k": None, "top_p": None}, "top_k"), ({"top_p": 1.5}, "top_p"),
     ({"block_m": 24}, "block_m"), ({"refresh": "never"}, "refresh"), ({"dense_steps": -1}, "dense_steps")],
)
def test_annsa_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        genkv.get_method("annsa", **overrides)


def test_fastar_validation_and_presets():
    with pytest.raises(ValueError, match="prompt_top_k"):
        genkv.get_method("fastar", prompt_top_k=0)
    with pytest.raises(ValueError, match="budget_frames"):
        genkv.get_method("fastar", sink_frames=4, budget_frames=3)
    assert genkv.get_method("fastar_fast").budget_frames < genkv.get_method("fastar_fidelity").budget_frames
    assert genkv.load_preset("fastar").name == "fastar"
