"""route_blocks: selection rules, determinism, and the dense limit."""

import os

import pytest
import torch

from genkv.kernels import block_sparse_attention, pool_blocks, route_blocks


def test_pool_blocks_averages_real_rows_of_a_ragged_tail():
    x = torch.arange(10, dtype=torch.float32).view(1, 10, 1, 1)
    pooled = pool_blocks(x, 4)
    assert pooled.flatten().tolist() == [1.5, 5.5, 8.5]


def test_top_k_keeps_the_best_scoring_blocks_plus_always_blocks():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 32, 2, 16, generator=g), torch.randn(1, 128, 2, 16, generator=g)
    idx, counts = route_blocks(q, k, block_m=16, block_n=16, top_k=2, always=[7])
    scores = torch.einsum("bhqd,bhkd->bhqk", pool_blocks(q, 16), pool_blocks(k, 16))
    for h in range(2):
        for m in range(2):
            chosen = set(idx[0, h, m, : counts[0, h, m]].tolist())
            best = set(scores[0, h, m].topk(2).indices.tolist())
            assert chosen == best | {7}
            assert idx[0, h, m, : counts[0, h, m]].tolist() == sorted(chosen)  # ascending


def test_selection_is_deterministic_and_top_p_one_selects_all():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 48, 3, 16, generator=g), torch.randn(1, 200, 3, 16, generator=g)
    a = route_blocks(q, k, block_m=16, block_n=32, top_p=0.6)
    b = route_blocks(q, k, block_m=16, block_n=32, top_p=0.6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _, counts = route_blocks(q, k, block_m=16, block_n=32, top_p=1.0)
    assert (counts == 7).all()


def test_top_k_of_all_blocks_is_dense_attention():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, n, 2, 16, generator=g) for n in (40, 90, 90))
    idx, counts = route_blocks(q, k, block_m=16, block_n=16, top_k=6)
    out = block_sparse_attention(q, k, v, idx, counts, block_m=16, block_n=16, backend="torch")
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(out, sdpa.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_invalid_always_ids_are_ignored_and_bad_arguments_raise():
    q, k = torch.randn(1, 16, 1, 16), torch.randn(1, 64, 1, 16)
    _, counts = route_blocks(q, k, block_m=16, block_n=16, top_k=1, always=[-1, 99])
    assert counts.item() == 1
    import pytest

    with pytest.raises(ValueError, match="top_k"):
        route_blocks(q, k, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        route_blocks(q, k, top_p=1.5)


def _triton_available():
    from genkv.kernels.block_sparse import triton_available

    return triton_available()


def _triton_device(backend: str = "triton") -> str:
    """Where a Triton kernel runs: the CPU under the interpreter (``TRITON_INTERPRET=1``, as conftest sets),
    else the GPU (``TRITON_INTERPRET=0 pytest`` on the GPU machine)."""
    if backend != "triton" or os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("Triton without its interpreter needs a CUDA device")
    return "cuda"


@pytest.mark.skipif(not _triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("n_kv_tokens,top_k", [(1000, 5), (5000, 40), (300, 50)])
def test_fused_triton_routing_matches_an_exact_float64_top_k(n_kv_tokens, top_k):
    """The fused kernel (scores + bisection top-k) selects exactly the k best blocks of a float64 ranking."""
    g = torch.Generator().manual_seed(n_kv_tokens)
    q, k = torch.randn(1, 40, 3, 32, generator=g), torch.randn(1, n_kv_tokens, 3, 32, generator=g)
    always = [0, 3]
    dev = _triton_device()
    idx, counts = route_blocks(q.to(dev), k.to(dev), block_m=16, block_n=16, top_k=top_k, always=always,
                               backend="triton")
    idx, counts = idx.cpu(), counts.cpu()
    scores = torch.einsum("bhqd,bhkd->bhqk", pool_blocks(q, 16).double(), pool_blocks(k, 16).double())
    n_kv = scores.shape[-1]
    for h in range(3):
        for m in range(scores.shape[2]):
            want = set(scores[0, h, m].topk(min(top_k, n_kv)).indices.tolist()) | set(always)
            n = int(counts[0, h, m])
            assert idx[0, h, m, :n].tolist() == sorted(want)
            assert sorted(idx[0, h, m].tolist()) == list(range(n_kv))  # the rest follows: a permutation


@pytest.mark.skipif(not _triton_available(), reason="triton is not installed")
def test_fused_triton_routing_breaks_ties_toward_lower_block_ids():
    q = torch.ones(1, 16, 1, 16)
    k = torch.ones(1, 16 * 6, 1, 16)  # six identical key blocks: all scores tie
    k[:, 16:32] = -1.0  # block 1 scores lowest
    dev = _triton_device()
    idx, counts = route_blocks(q.to(dev), k.to(dev), block_m=16, block_n=16, top_k=3, backend="triton")
    idx, counts = idx.cpu(), counts.cpu()
    assert counts.item() == 3 and idx[0, 0, 0, :3].tolist() == [0, 2, 3]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("top_k", [2, 6])
def test_empty_blocks_are_never_chosen_unless_forced(backend, top_k):
    """A fixed-layout cache's empty blocks: the choice equals top-k over the other blocks (float64 scores), plus
    the forced ones, whichever the backend; with fewer live blocks than top_k, only live ones are added."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 32, 2, 16, generator=g), torch.randn(1, 128, 2, 16, generator=g)
    empty = torch.zeros(8, dtype=torch.bool)
    empty[[1, 2, 3, 5, 6]] = True  # live: 0, 4, 7; block 6 is empty but forced
    dev = _triton_device(backend)
    idx, counts = route_blocks(q.to(dev), k.to(dev), block_m=16, block_n=16, top_k=top_k, always=[6],
                               empty_blocks=empty.to(dev), backend=backend)
    idx, counts = idx.cpu(), counts.cpu()
    scores = torch.einsum("bhqd,bhkd->bhqk", pool_blocks(q, 16).double(), pool_blocks(k, 16).double())
    scores = scores.masked_fill(empty, -float("inf"))
    for h in range(2):
        for m in range(2):
            chosen = set(idx[0, h, m, : counts[0, h, m]].tolist())
            best = set(scores[0, h, m].topk(min(top_k, 3)).indices.tolist())
            assert chosen == best | {6}
    with pytest.raises(ValueError, match="empty_blocks"):
        route_blocks(q, k, block_m=16, block_n=16, top_k=2, empty_blocks=empty[:4])
