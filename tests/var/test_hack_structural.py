"""HACK's structural heads keep the paper's layout set (the first two scales + the newest scale) at every budget,
0.1 included, checked on the tiny VAR by exact key identity; the contextual heads get what the layer's budget
leaves (nothing, when the layout set alone exceeds it)."""

import math

import pytest
import torch

import genkv
from genkv.scales.heads import HeadAwareScaleCache

from .test_scalekv_official import sample, tiny_var

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8)


def contains_rows(kept, rows):
    """Every row of ``rows`` (m, D) is exactly one of the rows of ``kept`` (n, D)."""
    return bool((rows[:, None, :] == kept[None, :, :]).all(-1).any(1).all())


class CheckedLayout(HeadAwareScaleCache):
    """Records each layer's keys per scale; after every kept scale checks the structural heads' kept keys hold
    scales 0 and 1 and the newest scale, and that the contextual heads keep only what the budget leaves."""

    def reset(self):
        super().reset()
        self.seen_keys = {}  # layer -> [k of scale 0, k of scale 1, ...]
        self.checked = 0

    def attend(self, layer, scale, q, k, v):
        out = super().attend(layer, scale, q, k, v)
        keys = self.seen_keys.setdefault(layer, [])
        keys.append(k)
        if scale == len(self.patch_nums) - 1 or scale < 2:
            return out
        roles = self.contextual.get(layer, [False] * q.shape[1])
        seen = sum(p * p for p in self.patch_nums[: scale + 1])
        layout = sum(p * p for p in self.patch_nums[:2]) + self.patch_nums[scale] ** 2
        n_ctx, heads_total = sum(roles), q.shape[1]
        total = math.floor(self.budget * seen * heads_total + 1e-9)
        for heads, kk, _, _ in self.groups[layer]:
            for i, h in enumerate(heads.tolist()):
                if roles[h] and n_ctx < heads_total:  # contextual: at most the layer's budget left over
                    left = max(0, (total - (heads_total - n_ctx) * max(layout, total // heads_total)) // n_ctx)
                    assert kk.shape[2] <= max(left, math.floor(self.contextual_share * total / heads_total))
                    continue
                for b in range(q.shape[0]):
                    forced = torch.cat([keys[0][b, h], keys[1][b, h], keys[scale][b, h]])
                    assert contains_rows(kk[b, i], forced), f"layer {layer} scale {scale} head {h} row {b}"
                self.checked += 1
        return out


@pytest.mark.parametrize("budget,alpha,merge", [(0.1, 0.5, False), (0.1, 0.0, False), (0.1, 0.5, True),
                                                (0.3, 0.5, False)])
def test_structural_heads_keep_the_first_two_scales_and_the_newest_at_any_budget(budget, alpha, merge):
    pipe = genkv.apply_genkv(tiny_var(PATCH_NUMS, heads=4), "hack", budget=budget, alpha=alpha, merge=merge)
    method = pipe.kv_method
    checked = CheckedLayout(2, PATCH_NUMS, budget, alpha=alpha, contextual_share=method.contextual_share,
                            observations=method.observations, merge=merge, keep_layout=True)
    images = sample(pipe, kv_cache=checked)
    assert checked.checked >= 2 * 4 * (2 if alpha else 4)  # scales 2..5, both layers, every structural head
    assert (sample(pipe) == images).all()  # what apply_genkv builds is the checked cache
    if budget == 0.1 and alpha:  # the layout set alone exceeds the budget: the contextual heads keep nothing
        kinds = {bool(kind): g[1].shape[2] for kind, g in zip(checked.group_kinds[0], checked.groups[0] or [])}
        stats = checked.stats()["scales"][5]["tokens"]
        assert stats == [1 + 4 + 36] * 2 and kinds in ({}, {False: 41, True: 0})


def test_genkv_mode_keeps_within_the_budget_and_cuts_the_layout_set():
    pipe = genkv.apply_genkv(tiny_var(PATCH_NUMS, heads=4), "hack", budget=0.1, mode="genkv")
    sample(pipe)
    cache = pipe.last_cache
    assert isinstance(cache, HeadAwareScaleCache) and not cache.keep_layout
    assert max(cache.stats()["scales"][5]["tokens"]) < 1 + 4 + 36
