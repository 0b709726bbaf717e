"""TempCache: the exact-merge lemma, never-merge equals full, budgets over long rollouts."""

import pytest
import torch

import genkv
from genkv.cache import ChunkInfo, LayerKVCache
from genkv.keep.tempcache import TemporalMerge
from genkv.read.dense import DenseSelfAttention
from genkv.testing import tiny_self_forcing_pipeline
from genkv.pipelines import SelfForcingScheduler


def _attend(q, k, v, bias=None):
    """float64 reference: softmax(q k^T / sqrt(d) + bias) v."""
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    if bias is not None:
        logits = logits + bias.double().permute(0, 2, 1)[:, :, None, :]
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v.double())


def _commit(keeper, cache, k, v, frame_start, frames, grid):
    tpf = grid[0] * grid[1]
    cache.stage(k, v)
    chunk = ChunkInfo(frame_start, frames, tpf, frame_start, grid)
    cache.label_staged(chunk)
    cache.tokens_seen += cache.staged
    keeper.commit(cache, chunk)
    cache.staged = 0


def test_merging_exact_duplicates_is_exact_attention():
    """Frames that repeat keys (values differ) merge into groups; attention with log(count) is unchanged."""
    g = torch.Generator().manual_seed(0)
    grid, heads, dim = (3, 4), 2, 8
    tpf = grid[0] * grid[1]
    base_k = torch.randn(1, tpf, heads, dim, generator=g)
    frames_k, frames_v = [], []
    for f in range(6):
        k = base_k.clone()
        k[:, f % tpf] = torch.randn(heads, dim, generator=g)  # one token per frame changes
        frames_k.append(k)
        frames_v.append(torch.randn(1, tpf, heads, dim, generator=g))  # values all differ
    keeper = TemporalMerge(threshold=1.0, radius=1, sink_frames=0, budget_frames=100, max_tokens=None)
    cache = LayerKVCache(keeper.budget(ChunkInfo(0, 3, tpf, 0, grid)), fixed=True)
    for c in range(2):
        _commit(keeper, cache, torch.cat(frames_k[3 * c : 3 * c + 3], 1), torch.cat(frames_v[3 * c : 3 * c + 3], 1),
                3 * c, 3, grid)
    all_k, all_v = torch.cat(frames_k, 1), torch.cat(frames_v, 1)
    assert cache.live_tokens() < all_k.shape[1]  # merging happened
    assert cache.token_count[: cache.length].sum() == all_k.shape[1]  # every token is represented once
    q = torch.randn(1, 5, heads, dim, generator=g)
    k, v, bias = cache.history()
    want = _attend(q, all_k, all_v)
    torch.testing.assert_close(_attend(q, k, v, bias), want, rtol=1e-6, atol=1e-6)
    got = DenseSelfAttention().attend(q, k, v, bias).double()  # the reader genkv runs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_near_duplicates_merge_only_above_threshold():
    g = torch.Generator().manual_seed(1)
    grid = (2, 2)
    k0 = torch.randn(1, 4, 1, 8, generator=g)
    k1 = k0 + 0.05 * torch.randn(1, 4, 1, 8, generator=g)
    cos = torch.nn.functional.cosine_similarity(k0, k1, dim=-1).min().item()
    for threshold, merges in ((cos - 1e-3, True), (min(cos + 1e-3, 1.0), False)):
        keeper = TemporalMerge(threshold=threshold, radius=0, sink_frames=0, budget_frames=10, max_tokens=None)
        cache = LayerKVCache(40, fixed=True)
        _commit(keeper, cache, torch.cat([k0, k1], 1), torch.randn(1, 8, 1, 8), 0, 2, grid)
        assert (cache.live_tokens() == 4) == merges


def _static_scene_pipeline():
    """Tiny pipeline on a static scene with no temporal RoPE: every frame's keys repeat exactly."""
    pipe = tiny_self_forcing_pipeline(seed=3)
    rope = pipe.transformer.rope
    rope.freqs_cos[:, : rope.t_dim] = 1.0
    rope.freqs_sin[:, : rope.t_dim] = 0.0
    pipe.scheduler = SelfForcingScheduler(denoising_step_list=(1000,))  # no fresh noise between steps
    frame = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return pipe, frame.repeat(1, 1, 15, 1, 1)


def _rollout(pipe, latents):
    embeds = pipe.encode_prompt("a red circle")
    return torch.cat(list(pipe.rollout(embeds, latents.shape[2], 32, 32, latents=latents)), 2)


def test_tempcache_of_exact_duplicates_equals_full_on_a_model():
    pipe, latents = _static_scene_pipeline()
    genkv.apply_genkv(pipe, "full")
    full = _rollout(pipe, latents)
    genkv.apply_genkv(pipe, "tempcache", threshold=1.0, budget_frames=50)
    merged = _rollout(pipe, latents)
    stats = genkv.cache_stats(pipe)
    # The 3 identical frames of each chunk collapse into one; chunks differ from each other (their denoising
    # saw different histories), so groups do not span chunks.
    assert 3 * stats["tokens"] == stats["tokens_seen"]
    assert all(row["merged_groups"] == row["tokens"] for row in stats["layers"])
    torch.testing.assert_close(merged, full, rtol=1e-4, atol=1e-5)


def test_threshold_above_one_never_merges_and_equals_full():
    pipe = tiny_self_forcing_pipeline(seed=4)
    embeds = pipe.encode_prompt("a blue square")
    noise = torch.randn(1, 16, 12, 4, 4, generator=torch.Generator().manual_seed(2))

    def run():
        gen = torch.Generator().manual_seed(5)
        return torch.cat(list(pipe.rollout(embeds, 12, 32, 32, latents=noise, generator=gen)), 2)

    genkv.apply_genkv(pipe, "full")
    full = run()
    genkv.apply_genkv(pipe, "tempcache", threshold=1.5, budget_frames=100)
    never = run()
    stats = genkv.cache_stats(pipe)
    assert stats["tokens"] == stats["tokens_seen"]
    # (float32: the fixed layout reads through a -inf-masked bias, which reorders the rounding)
    torch.testing.assert_close(never, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["tempcache"])
def test_long_rollout_stays_under_budget(method):
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=5), method, threshold=0.5, budget_frames=9,
                             sink_frames=1)
    gen = torch.Generator().manual_seed(0)
    embeds = pipe.encode_prompt("a square")
    sizes = []
    for _ in pipe.rollout(embeds, 600, 32, 32, generator=gen):  # 200 chunks
        stats = genkv.cache_stats(pipe)
        sizes.append(stats["bytes"])
        assert all(row["tokens"] <= 9 * 4 for row in stats["layers"])
    assert len(set(sizes[3:])) == 1  # allocated memory is fixed once the first chunk is in
    assert stats["tokens_seen"] == 600 * 4 * 2
    # the sink frame survives: its 4 tokens are still there
    cache = genkv.get_store(pipe).caches["cond"][0]
    assert int((cache.frame_index[: cache.length] == 0).sum()) == 4


def test_validation_names_the_field():
    for overrides, field in (({"threshold": 3}, "threshold"), ({"radius": -1}, "radius"),
                             ({"budget_frames": 0}, "budget_frames"), ({"max_tokens": 0}, "max_tokens"),
                             ({"sink_frames": 3, "budget_frames": 2}, "budget_frames"),
                             ({"max_count": 0}, "max_count")):
        with pytest.raises(ValueError, match=field):
            genkv.get_method("tempcache", **overrides)


@pytest.mark.parametrize("cap", [1, 2, 4])
def test_a_capped_group_is_a_running_average_with_a_capped_bias(cap):
    """max_count: nine frames of one exactly repeated key per position (values all differ) merge into one group
    per position. Capped at ``cap``, its count stops at cap, its value is the first ``cap`` frames' mean faded by
    ``(cap - 1) / cap`` a frame with each later frame weighted ``1 / cap`` (float64 weights written out, not the
    running update), and attention sees that value under a log(cap) bias."""
    g = torch.Generator().manual_seed(5)
    grid, heads, dim, frames = (2, 3), 2, 8, 9
    tpf = grid[0] * grid[1]
    key = torch.randn(1, tpf, heads, dim, generator=g)
    values = torch.randn(1, frames, tpf, heads, dim, generator=g, dtype=torch.float64)
    keeper = TemporalMerge(threshold=1.0, radius=1, sink_frames=0, budget_frames=100, max_tokens=None,
                           match="stored", max_count=cap)
    cache = LayerKVCache(keeper.budget(ChunkInfo(0, 3, tpf, 0, grid)), fixed=True)
    for c in range(frames // 3):
        _commit(keeper, cache, key.repeat(1, 3, 1, 1), values[:, 3 * c : 3 * c + 3].flatten(1, 2).float(),
                3 * c, 3, grid)
    k, v, bias = cache.history()
    live = torch.nonzero(cache.token_count[: cache.length] > 0).flatten()
    assert len(live) == tpf and (cache.token_count[live] == cap).all()
    weights = torch.tensor([((cap - 1) / cap) ** (frames - cap) / cap] * cap
                           + [((cap - 1) / cap) ** (frames - 1 - f) / cap for f in range(cap, frames)],
                           dtype=torch.float64)
    assert abs(weights.sum().item() - 1.0) < 1e-12
    want_v = torch.einsum("f,bfthd->bthd", weights, values)  # (1, tpf, heads, dim), by position
    order = cache.token_pos[live].argsort()
    torch.testing.assert_close(v[:, live[order]].double(), want_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k[:, live[order]], key, rtol=0, atol=0)
    q = torch.randn(1, 5, heads, dim, generator=g)
    want = _attend(q, key, want_v, torch.full((1, tpf, heads), float(cap)).log())
    got = DenseSelfAttention().attend(q, k, v, bias).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merging_methods_hold_exactly_the_memory_of_the_rolling_window_they_replace():
    """The log(count) bias is derived from the per-slot counts every method keeps: no extra buffer."""
    sizes = {}
    for method, kw in (("rolling", dict(window_frames=9)), ("tempcache", dict(budget_frames=6)),
                       ("fastar", dict(budget_frames=6, top_k=2, prompt_top_k=4))):
        pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=0), method, **kw)
        for _ in pipe.stream("a red circle", num_frames=45):
            pass
        sizes[method] = genkv.get_store(pipe).memory_bytes()
    assert sizes["rolling"] == sizes["tempcache"] == sizes["fastar"] > 0


def test_conflicting_matches_keep_the_best_then_the_lowest_position_per_frame():
    from genkv.keep.tempcache import TemporalMerge

    g = torch.Generator().manual_seed(0)
    frames, tokens, capacity = 3, 40, 12
    for _ in range(20):
        match = torch.rand(frames, tokens, generator=g) < 0.7
        best = torch.randint(0, 4, (frames, tokens), generator=g).float()  # few values: many ties
        target = torch.randint(0, capacity, (frames, tokens), generator=g)
        got = TemporalMerge._resolve_conflicts(match, best, target, torch.arange(tokens), capacity)
        want = torch.zeros_like(match)
        for f in range(frames):  # brute force: per frame and target, the best score, then the lowest position
            for slot in range(capacity):
                rivals = [i for i in range(tokens) if match[f, i] and target[f, i] == slot]
                if rivals:
                    want[f, min(rivals, key=lambda i: (-best[f, i].item(), i))] = True
        assert torch.equal(got, want)


def _rope(head_dim: int = 24):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from genkv.rope import FrameOffsetRotaryPosEmbed

    return FrameOffsetRotaryPosEmbed.from_module(WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024))


def _rotated(rope, content: torch.Tensor, grid: tuple[int, int], frame_start: int) -> torch.Tensor:
    """Post-RoPE keys of (1, F*T, H, D) content for frames starting at ``frame_start`` (the model's own RoPE)."""
    frames = content.shape[1] // (grid[0] * grid[1])
    rope.frame_offset = frame_start
    cos, sin = rope(torch.zeros(1, 1, frames, 2 * grid[0], 2 * grid[1]))
    return genkv.rope.apply_rotary_emb(content.double(), cos.double(), sin.double())


def test_relative_rotation_moves_a_key_to_another_position():
    """R(p_c - p_n) applied to a key roped at p_n equals the same content roped at p_c (float64)."""
    rope = _rope()
    grid = (3, 4)
    g = torch.Generator().manual_seed(0)
    content = torch.randn(1, 12, 2, 24, generator=g, dtype=torch.float64)
    at_5 = _rotated(rope, content, grid, 5)  # frame 5, every position of the grid
    at_4 = _rotated(rope, content.flip(1), grid, 4)  # frame 4, the positions in reverse order
    pos = torch.arange(12)
    src, dst = pos, pos.flip(0)  # token i (frame 5, position i) moves to frame 4, position 11 - i
    cos, sin = rope.relative_rotation(torch.full_like(src, -1), dst // 4 - src // 4, dst % 4 - src % 4)
    moved = genkv.rope.apply_rotary_emb(at_5, cos.double()[None, :, None], sin.double()[None, :, None])
    torch.testing.assert_close(moved.flip(1), at_4, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("match, merges", [("content", True), ("stored", False)])
def test_content_matching_merges_keys_that_repeat_under_rope(match, merges):
    """A frame that repeats the previous frame's key content: RoPE turns the stored keys (cosine < 0.999 for
    random keys), so only content matching merges them, and the merged keys are the newest frame's."""
    rope = _rope()
    grid, tpf = (2, 3), 6
    g = torch.Generator().manual_seed(1)
    content = torch.randn(1, tpf, 2, 24, generator=g, dtype=torch.float64)
    keys = _rotated(rope, content.repeat(1, 2, 1, 1), grid, 0).float()
    # what the keeper scores as stored: the minimum over heads, at the same position
    stored_cos = torch.nn.functional.cosine_similarity(keys[:, :tpf], keys[:, tpf:], dim=-1).amin(-1).max()
    assert stored_cos < 0.999  # the repeat is not a duplicate as stored
    keeper = TemporalMerge(threshold=0.999, radius=1, sink_frames=0, budget_frames=10, max_tokens=None, match=match)
    keeper.rope = rope
    cache = LayerKVCache(60, fixed=True)
    _commit(keeper, cache, keys, torch.randn(1, 2 * tpf, 2, 24, generator=g), 0, 2, grid)
    assert (cache.live_tokens() == tpf) == merges
    if merges:  # every group holds two tokens and the frame-1 key
        torch.testing.assert_close(cache.token_count[:tpf], torch.full((tpf,), 2.0))
        torch.testing.assert_close(cache.k[:, :tpf], keys[:, tpf:])


def test_match_is_validated():
    for name in ("tempcache", "fastar"):
        with pytest.raises(ValueError, match="match"):
            genkv.get_method(name, match="rope")


def _scores_reference(k, slots, k_new, rotation):
    """float64: gather, rotate the new key with genkv's RoPE arithmetic, cosine, minimum over batch and heads."""
    old = k.double()[:, slots.flatten()].unflatten(1, slots.shape)
    new = k_new.double().unsqueeze(3).expand_as(old)
    if rotation is not None:
        cos, sin = (t.double()[None, None, :, :, None] for t in rotation)
        new = genkv.rope.apply_rotary_emb(new, cos, sin)
    return torch.nn.functional.cosine_similarity(old, new, dim=-1).amin(-1).amin(0)


def _score_inputs():
    from genkv.keep.tempcache import _neighbourhood

    g = torch.Generator().manual_seed(3)
    grid, frames = (3, 4), 2
    nbr = _neighbourhood(grid, 1, torch.device("cpu"))  # (12, 9)
    k = torch.randn(2, 40, 3, 24, generator=g)
    slots = torch.randint(0, 40, (frames, *nbr.shape), generator=g)
    k_new = torch.randn(2, frames, 12, 3, 24, generator=g)
    own = torch.arange(12).view(-1, 1)
    rotation = _rope().relative_rotation(torch.full_like(nbr, -1), nbr // 4 - own // 4, nbr % 4 - own % 4)
    return k, slots, k_new, tuple(t.float() for t in rotation)


@pytest.mark.parametrize("rotated", [True, False])
def test_pair_scores_match_a_float64_reference(rotated):
    from genkv.keep.tempcache import pair_scores

    k, slots, k_new, rotation = _score_inputs()
    rotation = rotation if rotated else None
    torch.testing.assert_close(pair_scores(k, slots, k_new, rotation).double(),
                               _scores_reference(k, slots, k_new, rotation), rtol=1e-5, atol=1e-5)


def test_compiled_pair_scores_equal_the_eager_ones():
    """The GPU path compiles the scores; the compiled function must compute what the eager one does."""
    from genkv.keep.tempcache import pair_scores

    k, slots, k_new, rotation = _score_inputs()
    compiled = torch.compile(pair_scores, dynamic=True)
    torch.testing.assert_close(compiled(k, slots, k_new, rotation), pair_scores(k, slots, k_new, rotation),
                               rtol=1e-5, atol=1e-6)


def test_eviction_keeps_the_sinks_and_the_newest_frames_in_place():
    """No merges (threshold > 1): a budget of 4 frames with 1 sink holds frame 0 and the 3 newest frames, each
    slot with its own token's key and value; every other slot, the staging region included, is empty (count 0,
    so attention never sees it). Only staged survivors move: the history's slots stay where they are."""
    g = torch.Generator().manual_seed(3)
    grid, heads, dim = (2, 2), 2, 8
    tpf = grid[0] * grid[1]
    keeper = TemporalMerge(threshold=1.5, radius=1, sink_frames=1, budget_frames=4, max_tokens=None)
    cache = LayerKVCache(4 * tpf, fixed=True)
    keys = torch.randn(1, 15 * tpf, heads, dim, generator=g)
    values = torch.randn(1, 15 * tpf, heads, dim, generator=g)
    before = None
    for c in range(5):
        chunk = slice(3 * c * tpf, (3 * c + 3) * tpf)
        _commit(keeper, cache, keys[:, chunk], values[:, chunk], 3 * c, 3, grid)
        if c == 3:
            before = {(int(f), int(p)): s for s, (f, p) in enumerate(zip(cache.frame_index, cache.token_pos))}
    live = cache.token_count > 0
    assert live[cache.length :].sum() == 0 and (cache.token_count[live] == 1).all()
    frames = cache.frame_index[live].tolist()
    assert sorted(frames) == sorted([0] * tpf + [f for f in (12, 13, 14) for _ in range(tpf)])
    for slot in torch.nonzero(live).flatten().tolist():
        token = int(cache.frame_index[slot]) * tpf + int(cache.token_pos[slot])
        torch.testing.assert_close(cache.k[:, slot], keys[:, token], rtol=0, atol=0)
        torch.testing.assert_close(cache.v[:, slot], values[:, token], rtol=0, atol=0)
    now = {(int(f), int(p)): s for s, (f, p) in enumerate(zip(cache.frame_index, cache.token_pos)) if live[s]}
    # the sink frame, the only history that survives the last chunk, kept its slots
    assert [now[(0, p)] for p in range(tpf)] == [before[(0, p)] for p in range(tpf)]
    assert (cache.frame_index[~live] == -2).all()


def _noisy_repeats_rollout(seed: int, chunks: int, match: str = "content", max_count: int | None = None) -> dict:
    """The cache after ``chunks`` chunks of noisy repeats of one frame under RoPE (merging and evicting: budget 5
    frames, 1 sink). ``content``: the repeats differ as stored and match once rotated; ``stored``: compared as they
    are."""
    rope = _rope(16)
    grid, heads, dim = (3, 4), 2, 16
    tpf = grid[0] * grid[1]
    g = torch.Generator().manual_seed(seed)
    content = torch.randn(1, tpf, heads, dim, generator=g, dtype=torch.float64)
    keeper = TemporalMerge(threshold=0.97, radius=1, sink_frames=1, budget_frames=5, max_tokens=None, match=match,
                           max_count=max_count)
    keeper.rope = rope
    cache = LayerKVCache(5 * tpf, fixed=True)
    for c in range(chunks):
        noisy = content.repeat(1, 3, 1, 1) + 0.05 * torch.randn(1, 3 * tpf, heads, dim, generator=g,
                                                               dtype=torch.float64)
        keys = (_rotated(rope, noisy, grid, 3 * c) if match == "content" else noisy).float()
        _commit(keeper, cache, keys, torch.randn(1, 3 * tpf, heads, dim, generator=g), 3 * c, 3, grid)
    return {name: getattr(cache, name).clone() for name in ("k", "v", "token_count", "frame_index", "token_pos")}


def test_a_cap_no_group_reaches_leaves_the_cache_bit_identical():
    """A cap above every count changes no bit of keys, values, counts, frames or positions."""
    plain, capped = _noisy_repeats_rollout(seed=6, chunks=5), _noisy_repeats_rollout(seed=6, chunks=5, max_count=10**6)
    assert plain["token_count"].max() > 2  # groups grew
    for name, tensor in plain.items():
        assert torch.equal(tensor, capped[name]), name


@pytest.mark.parametrize("match", ["content", "stored"])
def test_the_merge_score_kernel_commits_what_the_torch_scores_commit(match, monkeypatch):
    """GENKV_PAIR_SCORES_KERNEL=1's path (genkv.kernels.pair_scores, run here under the interpreter) leaves the same
    cache as the torch scores: four chunks of noisy repeats under RoPE, merging and evicting."""
    import genkv.keep.tempcache as tempcache
    from genkv.kernels import pair_scores as kernel

    if not kernel.triton_runs_on(torch.empty(1)):  # a GPU machine: CPU tensors reach Triton only when interpreted
        pytest.skip("the kernel takes CPU tensors under TRITON_INTERPRET=1 only; test_pair_scores runs it on CUDA")

    def run():
        return _noisy_repeats_rollout(seed=4, chunks=4, match=match)

    torch_path = run()
    calls = []
    monkeypatch.setattr(tempcache, "_PAIR_SCORES_KERNEL", kernel)  # as GENKV_PAIR_SCORES_KERNEL=1 at import
    monkeypatch.setattr(tempcache, "_KERNEL_ON_CPU", True)  # CPU tensors through the interpreter
    monkeypatch.setattr(kernel, "pair_scores_triton",
                        lambda *args, real=kernel.pair_scores_triton: calls.append(1) or real(*args))
    with_kernel = run()
    assert calls  # every merging commit scored by the kernel
    assert (torch_path["token_count"] > 1).any()  # groups formed: the scores decided something
    for name, want in torch_path.items():
        assert torch.equal(with_kernel[name], want), name
