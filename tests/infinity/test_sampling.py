"""Bit sampling as the official sampler: top-p on two-way bit logits, torch.multinomial in the official order."""

import torch

from genkv.pipelines.infinity.bsq_vae import bits_to_codes
from genkv.pipelines.infinity.sampling import sample_bits


def test_draws_equal_torch_multinomial_with_the_same_generator():
    logits = torch.randn(2, 50, 2)
    ours = sample_bits(logits, top_k=900, top_p=0.0, generator=torch.Generator().manual_seed(5))
    probs = logits.softmax(-1).view(-1, 2)
    official = torch.multinomial(probs, 1, replacement=True, generator=torch.Generator().manual_seed(5)).view(2, 50)
    assert torch.equal(ours, official)


def test_top_p_drops_a_bit_value_of_probability_at_most_one_minus_top_p():
    # p(1) = sigmoid(4) = 0.982: with top_p = 0.97 the 0.018 value goes; with top_p = 0.99 it stays.
    logits = torch.tensor([[[0.0, 4.0]]]).expand(1, 4000, 2)
    g = torch.Generator().manual_seed(0)
    assert bool((sample_bits(logits, top_p=0.97, generator=g) == 1).all())
    assert int((sample_bits(logits, top_p=0.99, generator=g) == 0).sum()) > 20


def test_codes_are_plus_minus_one_over_sqrt_bits():
    codes = bits_to_codes(torch.tensor([[[[1, 0, 0, 1]]]]))
    assert codes.shape == (1, 4, 1, 1, 1)
    assert torch.allclose(codes.flatten(), torch.tensor([0.5, -0.5, -0.5, 0.5]))
