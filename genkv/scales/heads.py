"""HACK: head-aware KV budgets for next-scale models.

Heads come in two kinds. *Structural* heads attend along (multi-)diagonals, to the spatially corresponding
tokens of earlier scales; *contextual* heads attend to a few semantic tokens that every query looks at
(vertical stripes). Contextual heads survive heavy compression; structural ones need their layout tokens. So:

- classification: per (layer, head), the column-wise variance of the attention at the last scale (how unevenly
  the queries share each key), summed over keys, averaged over samples; the ``alpha`` fraction with the lowest
  variance are contextual (:func:`classify_heads`, written as JSON by ``genkv calibrate --method hack``);
  without a file, each layer's heads are classified once, at the first scale that has history, from the same
  statistic over the observation queries.
- budgets: contextual heads keep ``contextual_share`` of the average per-head budget, structural heads the rest
  (never more than every token): ``alpha B_C + (1 - alpha) B_S = B``.
- selection: structural heads keep the first two scales and the newest scale, then the history tokens the
  observation queries attend to most; contextual heads keep the top tokens by attention from the observation
  queries (``observations`` evenly spaced queries of the current scale).
- ``keep_layout=True`` (``hack``'s default, the paper's rule): that layout set (first two scales + newest scale)
  is always kept by structural heads, whatever the budget: a structural cap below it is raised to it, and the
  contextual heads get what the layer's budget has left (possibly nothing), so when the layout set alone
  exceeds the budget the layer keeps more than ``budget``. With ``keep_layout=False`` (``mode="genkv"``) the caps
  stay within the budget and a cap below the layout set keeps an unspecified part of it.

Heads of one kind are kept together in one tensor per layer (the paper's static re-ordering), so each kind's
memory is really its budget. Evicted tokens are dropped, or with ``merge=True`` merged into the kept key they
are most similar to (:func:`merge_into_kept`: the kept key stays, the value becomes the count-weighted mean and
attention adds ``log(count)`` to that key's logit, exact when the evicted keys duplicate kept ones); the counts
are stored too, and the caps shrink so that K, V and counts stay within the budget.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .cache import FullScaleCache, window_attention


def merge_into_kept(keys: torch.Tensor, values: torch.Tensor, counts: torch.Tensor, keep: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the tokens at ``keep`` (B, H, k) of ``keys``/``values`` (B, H, n, D) with ``counts`` (B, H, n) and
    merge every other token into the kept one whose key is most similar (dot product: VAR's keys are unit
    length): the kept key stays, values are averaged with the counts as weights, counts add up. Attention over
    the result with ``log(count)`` added to each logit equals attention over all ``n`` tokens whenever each
    merged key equals the key it joins.

    Example:
        >>> import torch
        >>> k = torch.nn.functional.normalize(torch.randn(1, 1, 3, 4), dim=-1)
        >>> k = torch.cat([k, k[:, :, :1]], dim=2)                  # token 3 duplicates token 0
        >>> v, c = torch.randn(1, 1, 4, 4), torch.ones(1, 1, 4)
        >>> kk, vv, cc = merge_into_kept(k, v, c, torch.tensor([[[0, 1, 2]]]))
        >>> cc.tolist(), torch.allclose(vv[0, 0, 0], (v[0, 0, 0] + v[0, 0, 3]) / 2)
        ([[[2.0, 1.0, 1.0]]], True)
    """
    b, h, n, d = keys.shape
    kept = torch.zeros(b, h, n, dtype=torch.bool, device=keys.device).scatter_(2, keep, True)
    evicted = torch.argsort(kept.to(torch.int8), dim=-1, stable=True)[..., : n - keep.shape[-1]]  # the others
    wide = torch.promote_types(values.dtype, torch.float32)  # average in float32 (or float64) at least
    take = lambda x, idx: x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))  # noqa: E731
    k_kept, v_kept, c_kept = take(keys, keep), take(values, keep).to(wide), counts.gather(2, keep)
    if evicted.shape[-1] == 0 or keep.shape[-1] == 0:  # nothing to merge, or nothing to merge into
        return k_kept, v_kept.to(values.dtype), c_kept
    k_out, v_out, c_out = take(keys, evicted), take(values, evicted).to(wide), counts.gather(2, evicted)
    join = (k_out.to(wide) @ k_kept.to(wide).transpose(-1, -2)).argmax(dim=-1)  # (B, H, evicted)
    c_new = c_kept.scatter_add(2, join, c_out)
    v_sum = (v_kept * c_kept[..., None]).scatter_add(2, join[..., None].expand(-1, -1, -1, d), v_out * c_out[..., None])
    return k_kept, (v_sum / c_new[..., None]).to(values.dtype), c_new


class HeadAwareScaleCache(FullScaleCache):
    """Per layer, structural and contextual heads each keep their own budget (see the module docstring)."""

    name = "hack"

    def __init__(self, num_layers: int, patch_nums: tuple[int, ...], budget: float, alpha: float = 0.5,
                 contextual_share: float = 0.3, observations: int = 32,
                 contextual: list[list[bool]] | None = None, merge: bool = False, keep_layout: bool = False) -> None:
        self.budget, self.alpha, self.contextual_share = budget, alpha, contextual_share
        self.merge, self.keep_layout = merge, keep_layout
        self.observations, self.fixed_roles = observations, contextual
        super().__init__(num_layers, patch_nums)

    def reset(self) -> None:
        super().reset()
        self.groups: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None] = [None] * self.num_layers
        # layer -> contextual flag per head, once classified. Kept on the host with each group's kind and size,
        # so the per-(layer, scale) bookkeeping never waits for the GPU (it did: ~1100 syncs per VAR-d30 batch).
        self.contextual: dict[int, list[bool]] = {}
        self.group_kinds: list[list[bool]] = [[] for _ in range(self.num_layers)]
        self._observed: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _caps(self, seen: int, heads: int, n_contextual: int, layout: int = 0) -> tuple[int, int]:
        """(structural, contextual) tokens per head; ``layout``: the structural heads' forced set (kept whatever
        the budget when ``keep_layout``; the contextual heads then share what is left of the layer's budget)."""
        total = math.floor(self.budget * seen * heads + 1e-9)  # tokens x heads kept by the whole layer
        if n_contextual in (0, heads):
            uniform = total // heads
            return max(uniform, layout) if self.keep_layout and n_contextual == 0 else uniform, uniform
        per_head = total / heads
        contextual = min(seen, math.floor(self.contextual_share * per_head))
        structural = min(seen, (total - n_contextual * contextual) // (heads - n_contextual))
        contextual = min(seen, (total - (heads - n_contextual) * structural) // n_contextual)
        if self.keep_layout and structural < layout:
            structural = layout
            contextual = min(contextual, max(0, (total - (heads - n_contextual) * structural) // n_contextual))
        return structural, contextual

    def _observe(self, q: torch.Tensor) -> torch.Tensor:
        """At most ``observations`` evenly spaced queries of the current scale (indices built once per size)."""
        n = q.shape[2]
        key = (n, q.device)
        if key not in self._observed:
            m = min(self.observations, n)
            idx = sorted({round(i * (n - 1) / max(m - 1, 1)) for i in range(m)})
            self._observed[key] = torch.tensor(idx, device=q.device)
        return q.index_select(2, self._observed[key])

    def _roles(self, layer: int, q: torch.Tensor, kk: torch.Tensor) -> list[bool]:
        """Contextual flag per head for this layer: from the calibration file, else the lowest column variance
        of the observation queries' attention (one host sync per layer and image batch, at the first scale with
        history)."""
        heads = q.shape[1]
        if self.fixed_roles is not None:
            return [bool(x) for x in self.fixed_roles[layer]]
        column_variance = window_attention(self._observe(q), kk, lambda p: p.var(dim=2, unbiased=False).sum(-1))
        variance = column_variance.mean(0)  # (H,)
        n_contextual = int(round(self.alpha * heads))
        lowest = set(torch.argsort(variance)[:n_contextual].tolist())
        return [h in lowest for h in range(heads)]

    def attend(self, layer, scale, q, k, v):
        if self.budget >= 1.0:  # nothing is ever evicted: exactly the full cache
            return super().attend(layer, scale, q, k, v)
        out = torch.empty_like(q)
        groups = self.groups[layer]
        last = scale == len(self.patch_nums) - 1
        if groups is None:  # the first scale: one group, every head
            everything = torch.arange(q.shape[1], device=q.device)
            counts = q.new_zeros(q.shape[0], q.shape[1], 0, dtype=torch.float32) if self.merge else None
            groups = [(everything, k[:, :, :0], v[:, :, :0], counts)]
        seen = sum(p * p for p in self.patch_nums[: scale + 1])
        new_groups, kept_tokens, kept_bytes = [], 0, 0
        for heads, hk, hv, hc in groups:
            kk = torch.cat([hk, k[:, heads]], dim=2)
            vv = torch.cat([hv, v[:, heads]], dim=2)
            cc = mask = None
            if hc is not None:  # merged keys: log(count) on their logits (the new scale's tokens count 1)
                cc = torch.cat([hc, hc.new_ones(hc.shape[0], hc.shape[1], k.shape[2])], dim=2)
                mask = cc.log()[:, :, None, :].to(q.dtype)
            out[:, heads] = F.scaled_dot_product_attention(q[:, heads], kk, vv, attn_mask=mask, scale=1.0)
            if not last:
                new_groups.append((heads, q[:, heads], kk, vv, cc))
        self.groups[layer] = None
        if not last:
            self.groups[layer] = self._regroup(layer, scale, seen, new_groups)
            kept_tokens = max(g[1].shape[2] for g in self.groups[layer])
            kept_bytes = sum(2 * g[1].numel() * g[1].element_size() + (0 if g[3] is None else g[3].numel() * 4)
                             for g in self.groups[layer])
        self.rows.setdefault(scale, [(0, 0)] * self.num_layers)[layer] = (kept_tokens, kept_bytes)
        return out

    def _regroup(self, layer, scale, seen, groups):
        """Split (on the first scale with history) and prune each kind of head to its budget."""
        current = self.patch_nums[scale] ** 2
        init = sum(p * p for p in self.patch_nums[:2])
        if layer not in self.contextual and groups[0][2].shape[2] > current:  # first history: classify, split
            heads, q, kk, vv, cc = groups[0]
            self.contextual[layer] = roles = self._roles(layer, q, kk)
            split, kinds = [], []
            for kind in (False, True):  # structural heads first, then contextual
                members = [h for h, r in enumerate(roles) if r == kind]
                if members:
                    pick = torch.tensor(members, device=q.device)
                    split.append((heads.index_select(0, pick), q.index_select(1, pick), kk.index_select(1, pick),
                                  vv.index_select(1, pick), None if cc is None else cc.index_select(1, pick)))
                    kinds.append(kind)
            groups, self.group_kinds[layer] = split, kinds
        roles = self.contextual.get(layer)
        n_contextual = sum(roles) if roles is not None else 0
        heads_total = sum(len(g[0]) for g in groups)
        kinds = self.group_kinds[layer] if roles is not None else [False] * len(groups)
        # the structural heads' layout set: the newest scale and the first two scales (all of one group's
        # heads hold as many tokens; the contextual group, if any, comes last)
        n_structural = groups[0][2].shape[2]
        layout = min(n_structural, current + min(init, n_structural - current))
        structural_cap, contextual_cap = self._caps(seen, heads_total, n_contextual, layout)
        pruned = []
        for (heads, q, kk, vv, cc), kind in zip(groups, kinds):
            is_contextual = kind and n_contextual < heads_total
            cap = contextual_cap if is_contextual else structural_cap
            if cc is not None:  # the float32 counts take their share of the budget
                per_token = 2 * kk.shape[-1] * kk.element_size()
                cap = cap * per_token // (per_token + 4)
                if self.keep_layout and not is_contextual:
                    cap = max(cap, layout)
            n = kk.shape[2]
            if cap >= n:
                pruned.append((heads, kk, vv, cc))
                continue
            score = window_attention(self._observe(q), kk, lambda probs: probs.sum(2))
            if not is_contextual:  # layout tokens first: the newest scale, then the first two scales
                score[..., n - current:] = 3e38
                score[..., : min(init, n - current)] = 2e38
            keep = score.topk(cap, dim=-1).indices.sort(dim=-1).values
            if cc is not None:
                pruned.append((heads, *merge_into_kept(kk, vv, cc, keep)))
                continue
            idx = keep[..., None].expand(-1, -1, -1, kk.shape[-1])
            pruned.append((heads, kk.gather(2, idx), vv.gather(2, idx), None))
        return pruned


@torch.no_grad()
def classify_heads(pipe, class_labels: list[int], alpha: float = 0.5, seed: int = 0,
                   guidance_scale: float = 4.0) -> dict:
    """Column-variance classification at the last scale (module docstring); returns a JSON-able dict."""
    config = pipe.transformer.config
    sums = torch.zeros(config.depth, config.num_heads, dtype=torch.float64)

    class _Probe(FullScaleCache):
        def attend(self, layer, scale, q, k, v):
            if scale == len(self.patch_nums) - 1 and self.k[layer] is not None:
                keys = torch.cat([self.k[layer], k], dim=2)
                probs = torch.softmax(q.float() @ keys.float().transpose(-1, -2), dim=-1)
                sums[layer] += probs.var(dim=2, unbiased=False).sum(-1).mean(0).double().cpu()
            return super().attend(layer, scale, q, k, v)

    probe = _Probe(config.depth, tuple(config.patch_nums))
    pipe(class_labels=list(class_labels), guidance_scale=guidance_scale,
         generator=torch.Generator().manual_seed(seed), output_type="np", kv_cache=probe)
    order = torch.argsort(sums.flatten())
    contextual = torch.zeros(sums.numel(), dtype=torch.bool)
    contextual[order[: int(round(alpha * sums.numel()))]] = True
    return {"method": "hack", "depth": config.depth, "alpha": alpha,
            "contextual": contextual.view_as(sums).tolist(), "column_variance": sums.tolist()}


def load_head_roles(path: str | Path, depth: int, heads: int) -> list[list[bool]]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"head roles file {str(path)!r} not found; write one with `genkv calibrate --method hack`")
    data = json.loads(path.read_text())
    roles = data.get("contextual")
    if data.get("depth") != depth or not roles or len(roles[0]) != heads:
        raise ValueError(f"head roles file {str(path)!r} is for depth {data.get('depth')}, this model has depth "
                         f"{depth} with {heads} heads; calibrate this model with `genkv calibrate --method hack`")
    return roles
