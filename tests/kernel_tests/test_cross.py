"""Sparse cross-attention helper: selection never picks padding; all real tokens + folded padding = dense."""

import math

import torch

from genkv.kernels import select_prompt_tokens, sparse_cross_attention


def test_all_real_tokens_plus_folded_padding_equals_dense_attention():
    g = torch.Generator().manual_seed(0)
    b, groups, tpf, h, d, length = 2, 3, 4, 2, 16, 12
    real = torch.tensor([5, 9])
    q = torch.randn(b, groups * tpf, h, d, generator=g)
    k = torch.randn(b, length, h, d, generator=g)
    v = torch.randn(b, length, h, d, generator=g)
    for i in range(b):  # identical padding rows
        k[i, real[i]:] = torch.randn(h, d, generator=g)
        v[i, real[i]:] = torch.randn(h, d, generator=g)
    idx, valid = select_prompt_tokens(q, k, tokens_per_group=tpf, top_k=10, valid_length=real)
    assert bool((idx[valid] < real.view(b, 1, 1, 1).expand_as(idx)[valid]).all())  # padding never selected
    rows = torch.arange(b)
    out = sparse_cross_attention(q, k, v, idx, valid, extra_k=k[rows, real], extra_v=v[rows, real],
                                 extra_bias=(length - real).float().log())
    dense = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(d), -1)
    want = torch.einsum("bhqk,bkhd->bqhd", dense, v.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_selection_takes_the_highest_scoring_real_tokens_per_group():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, 1, 8, generator=g)
    k = torch.randn(1, 10, 1, 8, generator=g)
    idx, valid = select_prompt_tokens(q, k, tokens_per_group=3, top_k=2, valid_length=torch.tensor([6]))
    for grp in range(2):
        score = q[0, 3 * grp : 3 * grp + 3, 0].mean(0) @ k[0, :6, 0].T
        assert set(idx[0, grp, 0].tolist()) == set(score.topk(2).indices.tolist())
    assert valid.all()
