"""TempCache's merge-score kernel (genkv.kernels.pair_scores) against a float64 reference written here: the cosine of
each candidate's key and the staged key rotated to the candidate's position, minimum over heads and batch, 1.0 for
an element-for-element duplicate; and against genkv.keep.tempcache.pair_scores (the torch path it replaces).
Runs the kernel (the interpreter on a CPU, in float32/float16; the GPU in bfloat16 too)."""

from __future__ import annotations

import pytest
import torch

from genkv.keep.tempcache import pair_scores
from genkv.kernels.pair_scores import pair_scores_triton
from .test_block_sparse import device_for

DEVICE = device_for("triton")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _float64_scores(k, slots, k_new, rotation):
    """(L, F, T, K) in float64 from the same (rounded) keys; slots (L, F, T, K), k_new (B, L, F, T, H, D)."""
    old = k.double()[:, slots]  # (B, L, F, T, K, H, D)
    new = k_new.double().unsqueeze(-3).expand_as(old)
    even, odd = new[..., 0::2], new[..., 1::2]
    if rotation is not None:
        cos, sin = (t.double()[..., None, :] for t in rotation)  # (T, K, 1, D)
        even, odd = even * cos[..., 0::2] - odd * sin[..., 1::2], even * sin[..., 1::2] + odd * cos[..., 0::2]
    dot = (old[..., 0::2] * even + old[..., 1::2] * odd).sum(-1)
    cosine = dot / ((old * old).sum(-1) * (new * new).sum(-1)).clamp_min(1e-24).sqrt()
    return cosine.amin(-1).amin(0)


def _case(batch, layers, frames, tokens, cands, heads, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    slots_per_layer = 40
    k = torch.randn(batch, layers * slots_per_layer, heads, dim, generator=g)
    slots = torch.randint(0, slots_per_layer, (layers, frames, tokens, cands), generator=g)
    slots += (torch.arange(layers) * slots_per_layer).view(-1, 1, 1, 1)
    # staged keys near their first candidate (scores close to 1, as merges are), the rest random
    k_new = k[:, slots[..., 0]] + 0.2 * torch.randn(batch, layers, frames, tokens, heads, dim, generator=g)
    angle = torch.rand(tokens, cands, dim // 2, generator=g) * 6
    # the pair's cos at channel 2j and its sin at 2j + 1 (Wan's tables repeat each there; here the other channel
    # holds noise, so reading the wrong one shows)
    noise = torch.rand(tokens, cands, dim // 2, generator=g) * 5 + 2
    rotation = (torch.stack([torch.cos(angle), noise], -1).flatten(-2),
                torch.stack([noise, torch.sin(angle)], -1).flatten(-2))
    return k.to(DEVICE, dtype), slots.to(DEVICE), k_new.to(DEVICE, dtype), tuple(t.to(DEVICE) for t in rotation)


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2, 3, 5, 9, 3, 16), (2, 1, 2, 4, 4, 4, 32), (1, 3, 1, 6, 25, 2, 8)])
def test_scores_equal_float64_and_the_torch_path(shape, dtype, rotate):
    k, slots, k_new, rotation = _case(*shape, dtype, seed=sum(shape))
    rotation = rotation if rotate else None
    got = pair_scores_triton(k, slots, k_new, rotation)
    assert got.shape == slots.shape and got.dtype == torch.float32
    want = _float64_scores(k, slots, k_new, rotation)
    assert (got.double() - want).abs().max().item() < 2e-6
    torch_path = pair_scores(k, slots, k_new, rotation)
    assert (got - torch_path).abs().max().item() < 2e-6


@pytest.mark.parametrize("new_dtype", [torch.float16, torch.bfloat16])
def test_float32_candidates_against_16_bit_staged_keys(new_dtype):
    # a quantized history: candidates dequantized in float32, the staged chunk's keys as the model made them
    k, slots, k_new, rotation = _case(1, 2, 3, 5, 9, 3, 16, torch.float32, seed=11)
    k_new = k_new.to(new_dtype)
    k_new[:, 0, 0, 1] = k[:, slots[0, 0, 1, 2]].to(new_dtype)  # a duplicate as far as 16 bits can say
    k[:, slots[0, 0, 1, 2]] = k_new[:, 0, 0, 1].float()  # ... and the candidate holding exactly those values
    for rot in (None, rotation):
        got = pair_scores_triton(k, slots, k_new, rot)
        want = _float64_scores(k, slots, k_new, rot)
        assert (got.double() - want).abs().max().item() < 2e-6
        assert (got - pair_scores(k, slots, k_new, rot)).abs().max().item() < 2e-6
    assert pair_scores_triton(k, slots, k_new, None)[0, 0, 1, 2].item() == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicates_score_exactly_one_and_a_zero_key_zero(dtype):
    k, slots, k_new, _ = _case(1, 1, 1, 6, 4, 2, 16, dtype, seed=7)
    k_new[:, 0, 0, 1] = k[:, slots[0, 0, 1, 2]]  # token 1's third candidate is its exact duplicate
    k_new[:, 0, 0, 2] = 0  # a zero key: cosine 0 everywhere (the norms' floor, no NaN)
    identity = (torch.ones(6, 4, 16, device=DEVICE), torch.zeros(6, 4, 16, device=DEVICE))
    for rotation in (None, identity):
        got = pair_scores_triton(k, slots, k_new, rotation)
        assert got[0, 0, 1, 2].item() == 1.0
        assert torch.equal(got[0, 0, 2], torch.zeros(4, device=DEVICE))
        assert (got[0, 0, 1, :2] < 1).all() and (got[0, 0, 1, 3] < 1)  # the others merely similar, or not


def test_every_duplicate_scores_exactly_one_whatever_the_rounding_of_its_norm():
    # float32's dot / sqrt(|k|^2 |k|^2) is 1 +- an ulp for many keys: duplicates must merge at threshold 1 anyway
    k, slots, _, _ = _case(1, 1, 1, 64, 9, 3, 16, torch.float32, seed=9)
    k = k * torch.logspace(-2, 2, k.shape[1], device=DEVICE).view(1, -1, 1, 1)
    identity = (torch.ones(64, 9, 16, device=DEVICE), torch.zeros(64, 9, 16, device=DEVICE))
    for rotation in (None, identity):
        duplicates = pair_scores_triton(k, slots, k[:, slots[..., 4]], rotation)  # each token's 5th candidate
        assert bool((duplicates[..., 4] == 1.0).all())


def test_one_layer_without_the_layer_axis_and_batch_minimum():
    k, slots, k_new, rotation = _case(2, 1, 2, 5, 9, 3, 16, torch.float32, seed=3)
    got = pair_scores_triton(k, slots[0], k_new[:, 0], rotation)
    assert got.shape == slots.shape[1:]
    assert torch.equal(got, pair_scores_triton(k, slots, k_new, rotation)[0])
    # the minimum over batch: each batch row alone scores at least as high
    for b in range(2):
        alone = pair_scores_triton(k[b:b + 1], slots, k_new[b:b + 1], rotation)[0]
        assert (alone >= got).all()
