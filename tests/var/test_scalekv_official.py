"""ScaleKV ``mode="official"`` (genkv.scales.official) against references written here, not the code under test:
hand-built keeps, a float64 re-derivation of the official score (summed raw logits of a grid of patch
centres, centred max-pool, window and start token forced), the official budgets-file format, and the
compression threshold ``base_capacity``."""

import json
import math

import pytest
import torch

import genkv
from genkv.pipelines.var import MultiScaleVQVAE, VARConfig, VARPipeline, VARTransformer
from genkv.scales.official import OfficialScaleCache, official_style_caps, official_window
from genkv.testing import tiny_var_pipeline

INFINITY = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)


def tiny_var(patch_nums, depth=2, seed=0, heads=2):
    """A random VAR with any scales (``heads`` x 16), small enough for a CPU test."""
    g = torch.Generator().manual_seed(seed)
    config = VARConfig(depth=depth, num_classes=10, vocab_size=32, z_channels=8, patch_nums=patch_nums,
                       width=16 * heads, head_dim=16)
    torch.manual_seed(seed)
    vqvae = MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                            patch_nums=patch_nums, share_quant_resi=2)
    return VARPipeline(VARTransformer(config).init_random(g, std=0.3).eval(), vqvae.eval())


def sample(pipe, **kw):
    return pipe(class_labels=[1, 4], guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw).images


def official_json(blocks, drafters, scales=range(9, 14), high=920, low=600):
    """A budgets file in the official format: "Scale N" -> "Block i" (1 = drafter), "Max", "Min", ..."""
    out = {}
    for n in scales:
        entry = {f"Block {b}": int(b in drafters) for b in range(blocks)}
        entry.update({"High": len(drafters), "Max": high + n, "Min": low - n, "Limit": high + n + 1})
        out[f"Scale {n}"] = entry
    return out


def ref_priority(q, k, win, kernel, keep_start):
    """float64: (sum of the window queries) . k / sqrt(d) (the sum of raw logits is linear in q), window columns
    out, centred max-pool (a loop, clipped at the ends), window and (optionally) token 0 forced in."""
    n, d = k.shape[-2], k.shape[-1]
    score = (q.double().sum(-2, keepdim=True) @ k.double().transpose(-1, -2))[..., 0, :] / math.sqrt(d)
    score[..., win] = -math.inf
    r = kernel // 2
    pooled = torch.stack([score[..., max(0, i - r): i + r + 1].amax(-1) for i in range(n)], -1)
    pooled[..., win] = math.inf
    if keep_start:
        pooled[..., 0] = math.inf
    return pooled


def kept_positions(kept_v):
    """Positions carried in v[..., 0] (the tests put each token's cache position there)."""
    return kept_v[..., 0].round().long()


def assert_top_set(kept, priority, cap, tol=1e-4):
    """``kept`` (m,) distinct positions, ``cap`` of them, none ranked below a dropped one."""
    chosen = torch.zeros(priority.shape[-1], dtype=torch.bool)
    chosen[kept] = True
    assert len(kept) == cap == int(chosen.sum())
    assert priority[chosen].min() >= priority[~chosen].max() - tol


def test_window_is_the_official_grid_of_patch_centres():
    # i * (side // 4) + (side // 4 - 1) // 2 on each axis (official scale_kv.py); the last 16 tokens below side 4
    assert official_window(10, 100, 16) == [r * 10 + c for r in (0, 2, 4, 6) for c in (0, 2, 4, 6)]
    assert official_window(16, 256, 16) == [r * 16 + c for r in (1, 5, 9, 13) for c in (1, 5, 9, 13)]
    assert official_window(13, 169 + 7, 16) == [7 + r * 13 + c for r in (1, 4, 7, 10) for c in (1, 4, 7, 10)]
    assert official_window(3, 14, 16) == list(range(14)) and official_window(3, 30, 16) == list(range(14, 30))


def test_hand_built_keep_sums_raw_logits_not_softmax_probabilities():
    # scales 1, 2, 4 -> 21 tokens; window 4 = a 2x2 grid on the 4x4 scale: local 0, 2, 8, 10 -> cache 5, 7, 13, 15.
    # Every key is (a_j, 0, 0, 0) and the window queries are (8, -1, -1, -1) along axis 0: the summed logits are
    # 5 a_j / 2, so the kept rest is the largest a_j. Summed softmax probabilities would keep the largest a_j
    # and then the smallest (the three negative queries spread mass towards them).
    n, window = 21, [5, 7, 13, 15]
    a = torch.linspace(-1, 1, n)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    a[0] = -2.0  # the start token scores lowest of all
    k = torch.zeros(1, 1, n, 4)
    k[..., 0] = a
    v = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 1, n, 4).clone()
    q = torch.zeros(1, 1, 16, 4)
    q[0, 0, [0, 2, 8, 10], 0] = torch.tensor([8.0, -1.0, -1.0, -1.0])
    rest = [j for j in torch.argsort(a, descending=True).tolist() if j not in window]
    for keep_start, want in ((False, rest[:3]), (True, [0, *rest[:2]])):
        cache = OfficialScaleCache(1, (1, 2, 4), [[1, 5, 7]], base_capacity=5, window=4, pool_kernel=1,
                                   keep_start=keep_start)
        _, kept_v = cache.keep(0, 2, q, k, v)
        assert kept_positions(kept_v)[0, 0].tolist() == sorted(window + want)


@pytest.mark.parametrize("keep_start", [True, False])
def test_selection_is_a_top_set_of_a_float64_rederivation(keep_start):
    g = torch.Generator().manual_seed(5)
    b, h, d, side, history = 2, 3, 8, 10, 55
    n = history + side * side
    q = torch.randn(b, h, side * side, d, generator=g) * 3
    k = torch.nn.functional.normalize(torch.randn(b, h, n, d, generator=g), dim=-1)
    v = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(b, h, n, d).clone()
    cap = 50
    cache = OfficialScaleCache(1, (1, 2, 3, 4, 5, side), [[None] * 5 + [cap]], base_capacity=10,
                               keep_start=keep_start)
    kept_k, kept_v = cache.keep(0, 5, q, k, v)
    win = [history + r * side + c for r in (0, 2, 4, 6) for c in (0, 2, 4, 6)]
    for i in range(b):
        for j in range(h):
            kept = kept_positions(kept_v[i, j])
            assert kept.tolist() == sorted(kept.tolist())  # cache order
            priority = ref_priority(q[i, j, [w - history for w in win]], k[i, j], win, 5, keep_start)
            assert_top_set(kept, priority, cap)
            assert torch.equal(kept_k[i, j], k[i, j, kept])


def test_start_token_is_never_evicted_in_the_pipeline_and_nothing_below_base_capacity():
    pipe = genkv.apply_genkv(tiny_var((1, 2, 3, 4, 5, 6, 8)), "scalekv", budget=0.3, window=4)
    cache = pipe.new_cache()
    assert isinstance(cache, OfficialScaleCache) and cache.base_capacity == round(0.3 * 91)  # 91: all but 8x8
    seen, starts = [1, 5, 14, 30, 55, 91], {}
    original = cache.keep

    def keep(layer, scale, q, k, v):
        kept_k, kept_v = original(layer, scale, q, k, v)
        starts.setdefault(scale, []).append(bool((kept_k[:, :, 0] == k[:, :, 0]).all()))
        if seen[scale] <= cache.base_capacity:
            assert kept_k is k
        return kept_k, kept_v

    cache.keep = keep
    sample(pipe, kv_cache=cache)
    tokens = {s: row["tokens"] for s, row in cache.stats()["scales"].items()}
    assert tokens[1] == [5, 5] and tokens[2] == [14, 14]  # up to base_capacity 27: nothing is evicted
    assert all(tokens[s][1] < seen[s] for s in range(3, 6))  # past it, every scale is compressed
    assert all(all(v) for v in starts.values()) and len(starts) == 6


def test_budget_one_is_the_full_cache_and_budget_mode_is_shaped_like_the_official_files():
    pipe = tiny_var_pipeline()
    full = sample(pipe)
    assert (sample(genkv.apply_genkv(pipe, "scalekv", budget=1.0)) == full).all()
    caps = official_style_caps(32, INFINITY, 650 / 6425, drafters=(0, 23))
    start = caps.start_scale(INFINITY)
    assert caps.base_capacity == 650 and start == 7  # the official scripts start compressing at 921 tokens
    official_min = [632, 594, 526, 420]  # budgets/2b_10%_budget.json, "Scale 9".."Scale 12"
    for s, want in zip(range(7, 11), official_min):
        row = [caps.caps[layer][s] for layer in range(32)]
        assert sum(row) <= 650 * 32 and row[0] == row[23] == sum(p * p for p in INFINITY[: s + 1])
        assert abs(row[1] - want) <= 2


def test_official_budgets_file_loads_as_it_is_and_a_mismatched_one_errors(tmp_path):
    patch_nums = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)  # 13 scales, as the official files expect
    pipe = tiny_var(patch_nums)
    path = tmp_path / "2b_10%_budget.json"
    path.write_text(json.dumps(official_json(blocks=2, drafters={1}, high=300, low=100)))
    genkv.apply_genkv(pipe, "scalekv", budgets=str(path), window=4)
    cache = pipe.new_cache()
    cum = [sum(p * p for p in patch_nums[: s + 1]) for s in range(13)]
    # "Scale N" serves scale N - 2 (the last scale reuses "Scale 13"); Block 1 is the drafter: Max, else Min
    assert [cache.caps[0][s] for s in range(7, 13)] == [100 - 9, 100 - 10, 100 - 11, 100 - 12, 100 - 13, 100 - 13]
    assert [cache.caps[1][s] for s in range(7, 13)] == [309, 310, 311, 312, 313, 313]
    assert cache.base_capacity == cum[6] and cache.start == 7  # compression starts at the file's first scale
    sample(pipe, kv_cache=cache)
    tokens = {s: row["tokens"] for s, row in cache.stats()["scales"].items()}
    assert tokens[6] == [cum[6]] * 2 and tokens[7] == [91, cum[7]] and tokens[11] == [87, 313]
    with pytest.raises(ValueError, match=r"for 2 layers x 13 scales \(Infinity 1M\); this model has 3 layers x 4 "):
        sample(genkv.apply_genkv(tiny_var_pipeline(), "scalekv", budgets=str(path)))
    with pytest.raises(ValueError, match="starts compression at scale 5, but .* has caps only from scale 7"):
        sample(genkv.apply_genkv(pipe, "scalekv", budgets=str(path), base_capacity=56))
    with pytest.raises(ValueError, match="not found"):
        genkv.apply_genkv(pipe, "scalekv", budgets=str(tmp_path / "missing.json"))
    genkv_file = tmp_path / "genkv.json"
    genkv_file.write_text(json.dumps({"depth": 2, "patch_nums": list(patch_nums), "budget": 0.1, "caps": [[1] * 13] * 2}))
    with pytest.raises(ValueError, match="`genkv calibrate` file; use it with mode='genkv'"):
        sample(genkv.apply_genkv(pipe, "scalekv", budgets=str(genkv_file)))


def test_genkv_mode_is_the_earlier_selection():
    from genkv.scales.cache import BudgetedScaleCache

    pipe = genkv.apply_genkv(tiny_var_pipeline(), "scalekv", budget=0.3, mode="genkv")
    assert type(pipe.new_cache()) is BudgetedScaleCache
    with pytest.raises(ValueError, match="mode must be official or genkv"):
        genkv.apply_genkv(tiny_var_pipeline(), "scalekv", mode="paper")
