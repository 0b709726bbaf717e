"""ScaleKV and HACK on their *selecting* paths against float64 references computed in the test.

The pipeline-level "budget 1.0 equals the full cache" tests never run the selection (both caches short-cut it).
Here every call of a budgeted cache is checked while it runs, on synthetic scales and inside the tiny VAR
pipeline:

* attention: the output equals float64 softmax attention over exactly (what the cache kept before) + (the new
  scale);
* selection: the tokens kept are a top-``cap`` set of a float64 priority computed here from the documented rule
  (ties may go either way, nothing else may): ScaleKV: the observation window's summed attention, smoothed by a
  centred max-pool of ``pool_kernel`` (clipped at the ends), the window's own tokens first. HACK: the
  observation queries' summed attention per head, structural heads taking the newest scale, then the first two
  scales, first; and ``cap`` from the budget split ``alpha B_C + (1 - alpha) B_S = B``;
* HACK's head roles: the ``alpha`` fraction of heads with the lowest column variance of the observation
  queries' attention are contextual.
"""

import math

import pytest
import torch

import genkv
from genkv.scales.cache import BudgetedScaleCache
from genkv.scales.heads import HeadAwareScaleCache
from genkv.testing import tiny_var_pipeline

TOL = 1e-5  # float32 scores against float64 ones


def ref_window(side, window):
    """The observation window: a sqrt(window)-square grid of patch centres of a side x side scale."""
    g = math.isqrt(window)
    if side <= g:
        return list(range(side * side))
    centres = [int((i + 0.5) * side / g) for i in range(g)]
    return [r * side + c for r in centres for c in centres]


def ref_max_pool(score, kernel):
    """Centred max over ``kernel`` neighbours along the last axis, clipped at the ends (float64, a loop)."""
    r = kernel // 2
    n = score.shape[-1]
    return torch.stack([score[..., max(0, i - r) : i + r + 1].amax(-1) for i in range(n)], -1)


def kept_indices(kept, candidates):
    """Which rows of ``candidates`` (n, D) the rows of ``kept`` (m, D) are (exact copies, each exactly once)."""
    same = (kept[:, None, :] == candidates[None, :, :]).all(-1)
    assert (same.sum(1) == 1).all(), "a kept key is not exactly one of the candidate keys"
    return same.to(torch.int8).argmax(1)


def assert_top_set(idx, priority, cap, where):
    """``idx`` holds ``cap`` distinct tokens, none ranked (float64 ``priority``) below one left out."""
    n = priority.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[idx] = True
    assert len(idx) == cap and int(chosen.sum()) == cap, f"{where}: kept {len(idx)} tokens, expected {cap}"
    if cap < n and cap > 0:
        worst_kept, best_dropped = priority[chosen].min(), priority[~chosen].max()
        assert worst_kept >= best_dropped - TOL, (
            f"{where}: kept a token of priority {float(worst_kept):.6g} but dropped one of {float(best_dropped):.6g}")


def ref_attention(q, k, v, bias=None):
    logits = q.double() @ k.double().transpose(-1, -2)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1) @ v.double()


# -- ScaleKV -----------------------------------------------------------------------------------------------


class CheckedScaleKV(BudgetedScaleCache):
    """BudgetedScaleCache that checks its attention and every selection against the float64 rule."""

    selections = 0

    def attend(self, layer, scale, q, k, v):
        history = (self.k[layer], self.v[layer])
        out = super().attend(layer, scale, q, k, v)
        kk = k if history[0] is None else torch.cat([history[0], k], 2)
        vv = v if history[1] is None else torch.cat([history[1], v], 2)
        torch.testing.assert_close(out.double(), ref_attention(q, kk, vv), rtol=1e-5, atol=1e-5)
        return out

    def keep(self, layer, scale, q, k, v):
        kept_k, kept_v = super().keep(layer, scale, q, k, v)
        cap, n = self.caps[layer][scale], k.shape[2]
        if cap >= n:
            assert torch.equal(kept_k, k) and torch.equal(kept_v, v)
            return kept_k, kept_v
        side = self.patch_nums[scale]
        current = side * side
        win = ref_window(side, self.window)
        score = torch.softmax(q[:, :, win].double() @ k.double().transpose(-1, -2), -1).sum(2)
        priority = ref_max_pool(score, self.pool_kernel)
        priority[..., [n - current + w for w in win]] = math.inf
        for b in range(k.shape[0]):
            for h in range(k.shape[1]):
                idx = kept_indices(kept_k[b, h], k[b, h])
                assert_top_set(idx, priority[b, h], cap, f"scalekv layer {layer} scale {scale} row {b} head {h}")
                assert torch.equal(kept_v[b, h], v[b, h, idx])
        if len(win) < cap:  # some tokens were chosen by the smoothed score, not forced
            self.selections += 1
        return kept_k, kept_v


def _scales(patch_nums, b, h, d, seed):
    g = torch.Generator().manual_seed(seed)
    for p in patch_nums:
        n = p * p
        q = torch.nn.functional.normalize(torch.randn(b, h, n, d, generator=g), dim=-1) * 4
        k = torch.nn.functional.normalize(torch.randn(b, h, n, d, generator=g), dim=-1)
        yield q, k, torch.randn(b, h, n, d, generator=g)


@pytest.mark.parametrize("pool_kernel", [3, 5, 7])
def test_scalekv_max_pool_smoothing_selects_a_top_set_of_a_float64_centred_max_pool(pool_kernel):
    patch_nums = (1, 2, 3, 4, 5, 6)
    seen = [sum(p * p for p in patch_nums[: i + 1]) for i in range(len(patch_nums))]
    caps = [[max(1, int(0.4 * s)) for s in seen]]
    cache = CheckedScaleKV(1, patch_nums, caps, window=4, pool_kernel=pool_kernel)
    for scale, (q, k, v) in enumerate(_scales(patch_nums, 3, 4, 8, seed=pool_kernel)):
        cache.attend(0, scale, q, k, v)
    assert cache.selections >= 3


def test_scalekv_in_the_tiny_var_pipeline_checked_at_every_scale_and_equal_to_apply_genkv():
    pipe = tiny_var_pipeline(seed=2)
    kw = dict(class_labels=[1, 5], guidance_scale=4.0, output_type="np")
    for budget, kernel in ((0.5, 5), (0.7, 3)):
        caps = [[int(math.floor(budget * s + 1e-9)) for s in (1, 5, 14, 30)] for _ in range(3)]
        checked = CheckedScaleKV(3, (1, 2, 3, 4), caps, window=4, pool_kernel=kernel)
        images = pipe(**kw, generator=torch.Generator().manual_seed(0), kv_cache=checked).images
        assert checked.selections > 0
        genkv.apply_genkv(pipe, "scalekv", budget=budget, window=4, pool_kernel=kernel, mode="genkv")
        assert (pipe(**kw, generator=torch.Generator().manual_seed(0)).images == images).all()
        genkv.remove_genkv(pipe)


# -- HACK --------------------------------------------------------------------------------------------------


def ref_observations(n, m):
    m = min(m, n)
    return sorted({round(i * (n - 1) / max(m - 1, 1)) for i in range(m)})


def ref_caps(budget, seen, heads, n_contextual, share):
    """(structural, contextual) tokens per head: the layer keeps floor(budget x seen x heads); a contextual head
    ``share`` of the average, structural heads what is left (each at most ``seen``), contextual heads then take
    what the structural ones could not use."""
    total = math.floor(budget * seen * heads + 1e-9)
    if n_contextual in (0, heads):
        return total // heads, total // heads
    contextual = min(seen, math.floor(share * total / heads))
    structural = min(seen, (total - n_contextual * contextual) // (heads - n_contextual))
    contextual = min(seen, (total - (heads - n_contextual) * structural) // n_contextual)
    assert n_contextual * contextual + (heads - n_contextual) * structural <= total
    return structural, contextual


class CheckedHACK(HeadAwareScaleCache):
    """HeadAwareScaleCache (no merging) that checks attention, head roles and every selection."""

    selections = 0

    def attend(self, layer, scale, q, k, v):
        before = self.groups[layer]
        classified_before = layer in self.contextual
        out = super().attend(layer, scale, q, k, v)
        if self.budget >= 1.0:
            return out
        heads_total = q.shape[1]
        if before is None:
            before = [(torch.arange(heads_total), k[:, :, :0], v[:, :, :0], None)]
        cand_k, cand_v = {}, {}
        for heads, hk, hv, hc in before:
            assert hc is None
            kk, vv = torch.cat([hk, k[:, heads]], 2), torch.cat([hv, v[:, heads]], 2)
            torch.testing.assert_close(out[:, heads].double(), ref_attention(q[:, heads], kk, vv),
                                       rtol=1e-5, atol=1e-5)
            for i, h in enumerate(heads.tolist()):
                cand_k[h], cand_v[h] = kk[:, i], vv[:, i]
        if scale == len(self.patch_nums) - 1:
            return out
        current = self.patch_nums[scale] ** 2
        if not classified_before and cand_k[0].shape[1] > current:  # the first scale with history: heads get their roles
            probs = torch.stack([torch.softmax(q[:, h, ref_observations(current, self.observations)].double()
                                               @ cand_k[h].double().transpose(-1, -2), -1)
                                 for h in range(heads_total)], 1)
            variance = probs.var(dim=2, unbiased=False).sum(-1).mean(0)
            n_ctx = int(round(self.alpha * heads_total))
            want = set(torch.argsort(variance)[:n_ctx].tolist())
            assert self.contextual[layer] == [h in want for h in range(heads_total)], f"roles of layer {layer}"
        roles = self.contextual.get(layer, [False] * heads_total)
        n_ctx = sum(roles)
        seen = sum(p * p for p in self.patch_nums[: scale + 1])
        structural_cap, contextual_cap = ref_caps(self.budget, seen, heads_total, n_ctx, self.contextual_share)
        init = sum(p * p for p in self.patch_nums[:2])
        obs = ref_observations(current, self.observations)
        for heads, kk, vv, _ in self.groups[layer]:
            for i, h in enumerate(heads.tolist()):
                is_contextual = roles[h] and n_ctx < heads_total
                n = cand_k[h].shape[1]  # each kind of head holds its own history
                cap = min(n, contextual_cap if is_contextual else structural_cap)
                priority = torch.softmax(q[:, h, obs].double() @ cand_k[h].double().transpose(-1, -2), -1).sum(1)
                if not is_contextual:  # layout tokens first (the newest scale, then the first two scales),
                    priority[:, n - current :] = 2000  # as a class: when the cap cuts into one, which of
                    priority[:, : min(init, n - current)] = 1000  # its tokens stay is not specified
                for b in range(q.shape[0]):
                    idx = kept_indices(kk[b, i], cand_k[h][b])
                    where = f"hack layer {layer} scale {scale} head {h} ({'contextual' if is_contextual else 'structural'}) row {b}"
                    assert_top_set(idx, priority[b], cap, where)
                    assert torch.equal(vv[b, i], cand_v[h][b, idx])
                forced = 0 if is_contextual else min(n, current + min(init, n - current))
                if forced < cap < n:
                    self.selections += 1
        return out


@pytest.mark.parametrize("budget,alpha,share", [(0.35, 0.5, 0.3), (0.6, 0.25, 0.5), (0.5, 0.75, 1.0)])
def test_hack_selection_roles_and_caps_against_float64_references(budget, alpha, share):
    patch_nums = (1, 2, 3, 4, 5, 6)
    cache = CheckedHACK(2, patch_nums, budget, alpha=alpha, contextual_share=share, observations=8)
    for layer_seed in range(2):
        for scale, (q, k, v) in enumerate(_scales(patch_nums, 2, 4, 8, seed=10 + layer_seed)):
            cache.attend(layer_seed, scale, q, k, v)
    assert cache.selections >= 4
    assert all(sum(r) == round(alpha * 4) for r in cache.contextual.values())


def test_hack_in_the_tiny_var_pipeline_checked_at_every_scale_and_equal_to_apply_genkv():
    pipe = tiny_var_pipeline(seed=3)
    kw = dict(class_labels=[2, 8], guidance_scale=4.0, output_type="np")
    total = 0
    for budget in (0.3, 0.6):
        checked = CheckedHACK(3, (1, 2, 3, 4), budget, observations=6)
        images = pipe(**kw, generator=torch.Generator().manual_seed(0), kv_cache=checked).images
        total += checked.selections
        assert len(checked.contextual) == 3
        genkv.apply_genkv(pipe, "hack", budget=budget, observations=6, mode="genkv")
        assert (pipe(**kw, generator=torch.Generator().manual_seed(0)).images == images).all()
        genkv.remove_genkv(pipe)
    assert total > 0
