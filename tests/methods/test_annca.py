"""AnnCA: top-k prompt tokens per frame; padding folded into one exact key."""

import pytest
import torch

import genkv
from genkv.read.annca import TopKPromptAttention
from genkv.testing import tiny_self_forcing_pipeline


def _run(pipe, embeds, noise, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.cat(list(pipe.rollout(embeds, noise.shape[2], 32, 32, latents=noise, generator=gen)), 2)


@pytest.fixture(scope="module")
def setup():
    pipe = tiny_self_forcing_pipeline(seed=7)
    embeds = pipe.encode_prompt("a red circle bouncing left")  # ~27 real tokens of 64
    noise = torch.randn(1, 16, 9, 4, 4, generator=torch.Generator().manual_seed(3))
    genkv.apply_genkv(pipe, "full")
    return pipe, embeds, noise, _run(pipe, embeds, noise)


def test_topk_at_least_the_prompt_length_equals_full(setup):
    pipe, embeds, noise, full = setup
    real = int((embeds.abs().amax(-1) > 0).sum())
    assert 0 < real < embeds.shape[1]  # the prompt is padded
    for k in (real, real + 5, 200):
        genkv.apply_genkv(pipe, "annca", top_k=k)
        torch.testing.assert_close(_run(pipe, embeds, noise), full, rtol=1e-5, atol=1e-5)


def test_smaller_topk_changes_the_output_and_is_per_frame(setup):
    pipe, embeds, noise, full = setup
    genkv.apply_genkv(pipe, "annca", top_k=4)
    sparse = _run(pipe, embeds, noise)
    assert not torch.allclose(sparse, full, atol=1e-4)
    genkv.apply_genkv(pipe, "annca", top_k=4, per="chunk")
    assert not torch.allclose(_run(pipe, embeds, noise), sparse, atol=1e-6)


def test_reader_against_a_float64_reference_and_padding_never_selected():
    g = torch.Generator().manual_seed(0)
    b, frames, tpf, h, d, length, real, k = 2, 3, 5, 2, 8, 20, torch.tensor([7, 12]), 4
    q = torch.randn(b, frames * tpf, h, d, generator=g)
    key = torch.randn(b, length, h, d, generator=g)
    value = torch.randn(b, length, h, d, generator=g)
    for i in range(b):  # padding rows are one repeated vector, as after Wan's text projection
        key[i, real[i]:] = torch.randn(h, d, generator=g)
        value[i, real[i]:] = torch.randn(h, d, generator=g)

    class Store:
        branch = "cond"
        prompt_lengths = {"cond": real}
        read_stats: dict = {}

        class chunk:
            tokens_per_frame = tpf

    for k in (4, 9, 12):  # 9: the first prompt has fewer real tokens than k, the second more; 12: all of both
        got = TopKPromptAttention(k).attend(q, key, value, store=Store())
        want = torch.empty_like(got, dtype=torch.float64)
        for i in range(b):
            for f in range(frames):
                qf = q[i, f * tpf : (f + 1) * tpf].double()  # (T, H, D)
                for hh in range(h):
                    score = qf[:, hh].mean(0) @ key[i, : real[i], hh].double().T
                    chosen = score.topk(min(k, int(real[i]))).indices
                    keys = torch.cat([key[i, chosen, hh], key[i, real[i]:, hh]]).double()
                    vals = torch.cat([value[i, chosen, hh], value[i, real[i]:, hh]]).double()
                    w = (qf[:, hh] @ keys.T / d**0.5).softmax(-1)
                    want[i, f * tpf : (f + 1) * tpf, hh] = w @ vals
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_validation_names_the_field():
    with pytest.raises(ValueError, match="top_k"):
        genkv.get_method("annca", top_k=0)
    with pytest.raises(ValueError, match="per"):
        genkv.get_method("annca", per="token")
