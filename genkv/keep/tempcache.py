"""TempCache: merge near-duplicate keys along time, keep a hard token budget.

For softmax attention, keys that are *identical* can be represented by one key whose logit gets ``+log(count)``
and whose value is the mean of the group's values: ``sum_i exp(q.k) v_i = count * exp(q.k) * mean(v)``. So
merging exact duplicates changes nothing, and merging near-duplicates (cosine similarity >= ``threshold``)
approximates that.

At each commit, frame by frame, every new token looks for its temporal correspondent among the previous
frame's tokens (same spatial position and a ``radius`` neighbourhood, which lets a group follow slow motion).
Keys are stored after RoPE, whose temporal rotation alone makes a repeated key one frame later a different
vector (on the trained sprite model, ~0-14% of tokens pass a 0.95 threshold as stored, 15-29% once the
rotation is undone). So by default (``match="content"``) each candidate pair is compared with the new key
rotated by the relative position of the candidate (``R(p_old - p_new)``, from the model's own RoPE tables),
which is the similarity of the keys before RoPE. ``match="stored"`` compares the keys as attention sees them:
with ``threshold=1.0`` only true duplicates merge, and attention is exact.
A match joins that group: the group takes the newest key (and its frame and position, so the next frame can
match it again), the count-weighted mean value and count + 1 (see ``max_count`` below); the new token's slot is
freed. Matching is decided jointly over heads and batch (the minimum similarity must pass), so every slot means
the same thing in every head and the buffer stays a plain ``(B, S, H, D)`` tensor.

Budget: after merging, if a layer holds more than ``max_tokens``, the least recently seen slots go first
(oldest ``frame_index``: a group refreshed by a match counts as recent), unmerged before merged among equals,
then the lower position; sink frames are never merged or evicted.

Layout: the cache is *fixed* (:attr:`genkv.keep.base.CacheKeeper.fixed_layout`): a history region of
``max_tokens`` slots for the whole video, empty slots with count 0 (key bias ``-inf``), the chunk staged after
it. A commit plans everything on the device (no host sync) and moves only the chunk's surviving tokens, into the
history's empty slots, so every forward of every chunk sees the same buffers and shapes (one CUDA graph each).

A group keeps its newest key, position included: in ``content`` mode its older members are then attended as
if they sat at the newest frame, the approximation FAST-AR's TempCache makes.

``max_count`` (off by default) caps what a group stands for. Uncapped, a group that has merged a static region for
hundreds of frames carries a ``log(count)`` logit bias beyond any count a trained window held (Self-Forcing attends
to at most 21 frames) and a value averaged evenly over all those frames. Capped, a group's count stops at
``max_count``: its bias stays ``log(max_count)``; until then its value is the plain mean, from then on each new
member's value gets weight ``1 / max_count`` (the older ones fade by ``(max_count - 1) / max_count`` a frame: a running
average). No longer exact for long exact duplicates, by design; ``cache_stats``' "tokens represented" then counts at
most ``max_count`` per group. On the trained sprite model's 1000-frame rollouts, uncapped merging slows the render's
motion; docs/BENCHMARKS.md (twenty-first session) has what caps of 3 and 21 did to that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..cache import EMPTY_FRAME, copy_rows_, select_rows
from ..compile import CompiledOnCuda
from ..switches import env_flag, optional_kernel
from .base import CacheKeeper, largest_history_frames

if TYPE_CHECKING:  # pragma: no cover
    from ..cache import ChunkInfo, KVCacheStore, LayerKVCache


def _neighbourhood(grid: tuple[int, int], radius: int, device: torch.device) -> torch.Tensor:
    """(T, K) positions around each position of a (rows, cols) grid, clamped at the borders (K = (2r+1)^2)."""
    rows, cols = grid
    r = torch.arange(rows, device=device).view(-1, 1, 1)
    c = torch.arange(cols, device=device).view(1, -1, 1)
    offsets = torch.arange(-radius, radius + 1, device=device)
    dr = offsets.repeat_interleave(len(offsets)).view(1, 1, -1)
    dc = offsets.repeat(len(offsets)).view(1, 1, -1)
    rr = (r + dr).clamp(0, rows - 1)
    cc = (c + dc).clamp(0, cols - 1)
    return (rr * cols + cc).reshape(rows * cols, -1)


def pair_scores(
    k: torch.Tensor, slots: torch.Tensor, k_new: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """Merge score of every (staged token, candidate slot) pair: the cosine similarity of the candidate's key
    ``k[:, slots[f, t, c]]`` and the staged key ``k_new[:, f, t]`` (moved by ``rotation[t, c]`` first, when
    given), minimum over batch and heads; 1.0 where the two are equal element for element (so ``threshold=1``
    merges exact duplicates whatever the rounding of the norms).

    Shapes: ``k`` (B, S, H, D), ``slots`` (F, T, K), ``k_new`` (B, F, T, H, D), rotation tables (T, K, D) in
    the interleaved-pair layout of :func:`genkv.rope.apply_rotary_emb`; returns float32 (F, T, K). Leading dims
    may be added to ``slots`` and after ``k_new``'s batch (``(L, F, T, K)``, ``(B, L, F, T, H, D)``: several
    layers on one token axis), and come out in front of the result. Written as
    plain elementwise + reductions so that ``torch.compile`` fuses it into a few kernels with no (B, F, T, K,
    H, D) intermediate (on a GPU this is most of a commit's time when run eagerly).

    Example:
        >>> k = torch.randn(1, 8, 2, 4)
        >>> slots = torch.arange(4).view(1, 4, 1)            # token t of the new frame vs slot t
        >>> pair_scores(k, slots, k[:, :4].unsqueeze(1), None).flatten().tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    old = k[:, slots.flatten()].unflatten(1, slots.shape).float()  # (B, [L,] F, T, K, H, D)
    new = k_new.float().unsqueeze(-3)  # (B, [L,] F, T, 1, H, D)
    new_even, new_odd = new[..., 0::2], new[..., 1::2]
    if rotation is not None:
        cos, sin = rotation
        shape = (*(1,) * (new.dim() - 4), *cos.shape[:2], 1, cos.shape[-1] // 2)
        cos, sin = cos[..., 0::2].reshape(shape), sin[..., 1::2].reshape(shape)
        new_even, new_odd = new_even * cos - new_odd * sin, new_even * sin + new_odd * cos
    old_even, old_odd = old[..., 0::2], old[..., 1::2]
    dot = (old_even * new_even + old_odd * new_odd).sum(-1)
    norms = (old * old).sum(-1) * (new * new).sum(-1)  # a rotation keeps the new key's norm
    cosine = dot / norms.clamp_min(1e-24).sqrt()
    exact = ((old_even == new_even) & (old_odd == new_odd)).all(-1)
    cosine = torch.where(exact, torch.ones_like(cosine), cosine)
    return cosine.amin(dim=-1).amin(dim=0)


_pair_scores_compiled = CompiledOnCuda(pair_scores, "tempcache merge scores")


# ``genkv.kernels.pair_scores`` unless ``GENKV_PAIR_SCORES_KERNEL=0``, where Triton imports; else None. On by
# default since 2026-12-06: on an H200 the merge scores take 2.23 ms against 7.20 compiled, and the keeper's commit
# 10.0 ms a chunk against 16.7 (docs/BENCHMARKS.md, eleventh session)
_PAIR_SCORES_KERNEL = optional_kernel("pair_scores") if env_flag("GENKV_PAIR_SCORES_KERNEL", True) else None
# CPU tensors go through the kernel only where a test asks (the Triton interpreter is orders of magnitude slower than
# the torch ops: on by default, it ran every CPU rollout of TempCache and fastar through it)
_KERNEL_ON_CPU = False


def _pair_scores_fused(k: torch.Tensor, slots: torch.Tensor, k_new: torch.Tensor,
                       rotation: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """:func:`pair_scores` as fast as this device runs it: genkv's one-pass kernel where it is on and takes the keys
    (CUDA; CPU tensors only when a test sets ``_KERNEL_ON_CPU`` under ``TRITON_INTERPRET=1``), else
    ``torch.compile`` of the torch ops on CUDA, else the ops eagerly."""
    kernel = _PAIR_SCORES_KERNEL
    if kernel is not None and (k.is_cuda or _KERNEL_ON_CPU) and kernel.pair_scores_applies(k, k_new) \
            and kernel.triton_runs_on(k):
        return kernel.pair_scores_triton(k, slots, k_new, rotation)
    return _pair_scores_compiled(k, slots, k_new, rotation)


#: how keys are compared (see the module docstring)
MATCH_MODES = ("content", "stored")


class TemporalMerge(CacheKeeper):
    """The TempCache keeper (see the module docstring)."""

    method_name = "tempcache"
    fixed_layout = True  # see CacheKeeper.fixed_layout

    def __init__(
        self, threshold: float, radius: int, sink_frames: int, budget_frames: int, max_tokens: int | None,
        match: str = "content", max_count: int | None = None,
    ) -> None:
        if match not in MATCH_MODES:
            raise ValueError(f"tempcache: match must be 'content' or 'stored', got {match!r}")
        if max_count is not None and (not isinstance(max_count, int) or isinstance(max_count, bool) or max_count < 1):
            raise ValueError(f"tempcache: max_count must be an integer >= 1 (or None for no cap), got {max_count!r}")
        self.match = match
        self.max_count = max_count
        self.threshold = threshold
        self.radius = radius
        self.sink_frames = sink_frames
        self.budget_frames = budget_frames
        self.max_tokens = max_tokens
        self._tables: dict[tuple, object] = {}  # neighbourhoods and rotations per (grid, radius, device)

    def budget(self, chunk: "ChunkInfo") -> int:
        if self.max_tokens is not None:
            return self.max_tokens
        return self.budget_frames * chunk.tokens_per_frame

    def max_history_tokens(self, chunk: "ChunkInfo") -> int:
        return self.budget(chunk)

    def fit_bytes(self, budget_bytes: int, cost, chunk_frames: int, tokens_per_frame: int) -> dict:
        """The largest ``budget_frames`` whose caches fit ``budget_bytes`` (see CacheKeeper.fit_bytes)."""
        self.budget_frames = largest_history_frames(budget_bytes, cost, chunk_frames, tokens_per_frame,
                                                    self.sink_frames + 1, self.method_name)
        self.max_tokens = None
        tokens = self.budget_frames * tokens_per_frame
        return {"budget_bytes": budget_bytes, "budget_frames": self.budget_frames, "history_tokens": tokens,
                "bytes": cost(tokens, chunk_frames * tokens_per_frame)}

    def check_chunk(self, num_frames: int) -> None:
        pass

    # -- merging -------------------------------------------------------------------------------------------
    @staticmethod
    def _grid(chunk: "ChunkInfo") -> tuple[int, int]:
        """(rows, cols) of a frame's tokens; one row when the chunk does not say (or says inconsistently)."""
        grid = chunk.grid or (1, chunk.tokens_per_frame)
        return grid if grid[0] * grid[1] == chunk.tokens_per_frame else (1, chunk.tokens_per_frame)

    def _candidates(self, chunk: "ChunkInfo", device: torch.device) -> torch.Tensor:
        grid = self._grid(chunk)
        key = (grid, self.radius, str(device))
        if key not in self._tables:
            self._tables[key] = _neighbourhood(grid, self.radius, device)
        return self._tables[key]

    def _rotation(self, chunk: "ChunkInfo", device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin) tables (T, K, D) moving each staged token's key to each candidate's position (one frame
        earlier, the candidate's row and column), or None when keys are compared as stored."""
        if self.match == "stored" or self.rope is None:
            return None
        grid = self._grid(chunk)
        key = (grid, self.radius, str(device), "rotation")
        if key not in self._tables:
            nbr = self._candidates(chunk, device)
            own = torch.arange(nbr.shape[0], device=device).view(-1, 1)
            cols = grid[1]
            dt = torch.full_like(nbr, -1)
            cos, sin = self.rope.relative_rotation(dt, nbr // cols - own // cols, nbr % cols - own % cols)
            self._tables[key] = (cos.float().to(device), sin.float().to(device))
        return self._tables[key]

    @torch.no_grad()
    def _similarities(self, group: "_LayerGroup", chunk: "ChunkInfo", frames: list[int],
                      frame_start: torch.Tensor) -> tuple:
        """Candidate slots (L, F, T, K) and their similarity to each staged token (L, F, T, K), for all merging
        frames of the chunk in every layer of ``group``, in one batched pass.

        A group takes the newest key, so frame j's correspondents carry exactly frame j-1's *staged* keys
        whether or not those merged: the similarities of every frame can be computed before any merge. Frame 0
        of the chunk looks up the previous frame's live slots in the history; later frames point at the staged
        slots of the frame before (redirected to their group's slot while merging, see :meth:`_merge_chunk`).
        """
        tpf = chunk.tokens_per_frame
        layers, first, end, device = group.layers, group.length, group.end, group.device
        nbr = self._candidates(chunk, device)  # (T, K) positions
        cands = []
        table = None
        for j in frames:
            if j == 0:
                # Slot of each spatial position of the previous frame (-1 where it is gone); no host sync.
                live = group.frame_index[:, :end] == frame_start - 1
                table = torch.full((layers, tpf + 1), -1, dtype=torch.int64, device=device)
                slots = torch.arange(end, device=device).expand(layers, end)
                table.scatter_(1, torch.where(live, group.token_pos[:, :end], tpf), slots)
                table.narrow(1, tpf, 1).fill_(-1)  # a fill kernel: `table[:, tpf] = -1` copies a host scalar
                cands.append(table[:, nbr])
            else:
                cands.append((first + (j - 1) * tpf + nbr).expand(layers, *nbr.shape))
        cand = torch.stack(cands, 1)  # (L, F, T, K)
        safe = cand.clamp(min=0)
        # One token axis over all layers (layer l's slot s at l * capacity + s): the score kernel gathers the
        # candidates of every layer at once. The merging frames are a suffix of the chunk: one staged range.
        k_new = group.staged_keys().narrow(2, frames[0] * tpf, len(frames) * tpf).unflatten(2, (len(frames), tpf))
        if group.quantized:
            # Their slots hold codes: dequantize each candidate slot once (not once per token and neighbour that
            # names it, K = 9-25 copies: ~15 GiB of fp32 keys at Wan shapes, more than the history), then score
            # them as stored. The slots are the previous frame's (frame 0's candidates, in table order) and the
            # staged frames but the last (later frames' candidates), the same every chunk: static shapes.
            sources = [] if table is None else [table[:, :tpf].clamp(min=0)]
            sources.append((first + torch.arange((chunk.num_frames - 1) * tpf, device=device)).expand(layers, -1))
            src = torch.cat(sources, 1)  # (L, S')
            width = 0 if table is None else tpf
            keys = group.dequantized_layer_keys(src)
            local = torch.stack([nbr if j == 0 else width + (j - 1) * tpf + nbr for j in frames])  # (F, T, K)
            flat_slots = local + (torch.arange(layers, device=device) * src.shape[1]).view(-1, 1, 1, 1)
        else:
            flat_slots = safe + group.offsets.view(-1, 1, 1, 1)
            keys = group.flat_k
        score = _pair_scores_fused(keys, flat_slots, k_new, self._rotation(chunk, device))
        score = score.masked_fill_(cand < 0, -float("inf"))  # gone from the previous frame
        return safe, score

    def _merging_frames(self, chunk: "ChunkInfo") -> list[int]:
        """The chunk's frames that may merge into the frame before them (neither they nor it a sink)."""
        return [j for j in range(chunk.num_frames) if chunk.frame_start + j - 1 >= self.sink_frames]

    @torch.no_grad()
    def _merge_chunk(self, group: "_LayerGroup", chunk: "ChunkInfo", frame_start: torch.Tensor) -> None:
        """Merge the staged frames of the chunk into their temporal correspondents, frame after frame, in every
        layer of ``group`` at once (each layer's tokens merge only within that layer)."""
        frames = self._merging_frames(chunk)
        if not frames or self.threshold > 1.0:
            return
        tpf = chunk.tokens_per_frame
        layers, first, staged, device = group.layers, group.length, group.staged, group.device
        batch, heads, dim = group.batch, group.heads, group.dim
        safe, score = self._similarities(group, chunk, frames, frame_start)
        best_all, arg_all = score.max(dim=-1)  # (L, F, T)
        target_all = safe.gather(3, arg_all[..., None]).squeeze(3)  # (L, F, T) slots
        match_all = best_all >= self.threshold
        ids = torch.arange(tpf, device=device)
        if self.radius > 0:  # conflicts are per (layer, frame): resolve them as L * F rows
            match_all = self._resolve_conflicts(match_all.flatten(0, 1), best_all.flatten(0, 1),
                                                target_all.flatten(0, 1), ids, group.capacity).view_as(match_all)
        # home[l, i]: the slot that holds staged token i's key after the merges so far (its own, or its group's).
        home = torch.arange(first, first + staged, device=device).repeat(layers, 1)
        offsets = group.offsets.view(-1, 1)
        for n, j in enumerate(frames):
            frame = (frame_start + j).expand(layers * tpf)  # a device value: a recorded commit replays for any chunk
            new_slots = home.narrow(1, j * tpf, tpf).clone()  # the frame's own staged slots (home is unchanged
            # there yet: only frame j writes them)
            match = match_all[:, n]
            target = target_all[:, n]
            if j > 0:  # staged slot of frame j-1 -> where that token lives now
                target = home.gather(1, target - first)

            # Update the groups in place. Unmatched tokens "update" their own slot with its own values, so every
            # index below is unique and the writes need no host-side selection.
            dest = torch.where(match, target, new_slots)  # (L, T) slots
            flat = (dest + offsets).flatten()  # ... on the all-layer token axis
            c_old = group.flat_count[flat]
            c_new = c_old + match.flatten()  # + 1 where merged
            if self.max_count is not None:
                # A capped group weighs its members as if it held max_count: the newest frame's value gets
                # 1 / max_count, so past the cap the value is a running average (older frames fade geometrically).
                c_new = c_new.clamp(max=float(self.max_count))
                c_old = c_new - match.flatten().to(c_new.dtype)
            staged_rows = slice(first + j * tpf, first + (j + 1) * tpf)
            w_old = (c_old / c_new).view(1, -1, 1, 1)
            merged = match.flatten().view(1, -1, 1, 1)
            if group.quantized:
                # Only the destination slots are dequantized; each written slot is quantized once, here. An
                # unmatched token's slot gets its own staged value (what it holds), not a round trip of it.
                frame_rows = slice(j * tpf, (j + 1) * tpf)
                group.write(flat, group.chunk_k[:, :, frame_rows], group.chunk_v[:, :, frame_rows],
                            blend=(w_old.flatten(), match.flatten()))
            else:
                v_dest = select_rows(group.flat_v, 1, flat).float()  # (B, L * T, H, D)
                v_src = group.v[:, :, staged_rows].reshape(batch, layers * tpf, heads, dim).float()
                mean_v = torch.where(merged, v_dest * w_old + v_src * (1 - w_old), v_dest)
                copy_rows_(group.flat_v, 1, flat, mean_v.to(group.v.dtype))
                # (copies: an unmatched token's source and destination are the same slot)
                copy_rows_(group.flat_k, 1, flat, _merged_copy(group.k[:, :, staged_rows], 1))
            group.flat_count.index_copy_(0, flat, c_new)
            group.flat_frame.index_copy_(0, flat, frame)
            group.flat_pos.index_copy_(0, flat, _merged_copy(group.token_pos[:, staged_rows], 0))
            # The merged tokens' own slots are free now.
            group.frame_index[:, staged_rows].masked_fill_(match, EMPTY_FRAME)
            home.narrow(1, j * tpf, tpf).copy_(dest)

    @staticmethod
    def _resolve_conflicts(match: torch.Tensor, best: torch.Tensor, target: torch.Tensor, ids: torch.Tensor,
                           capacity: int) -> torch.Tensor:
        """Two tokens of one frame may pick one group: the better match wins (ties: the lower position).

        Done for every merging frame at once on the candidate slots as found (frame j's are frame j-1's staged
        slots). The merge loop redirects those to their groups, but that map is one-to-one on a frame's tokens
        (a group takes at most one token per frame), so the conflicts are the same ones. Rows of ``match``
        (R, T) are independent (frames, or frames of several layers).
        """
        frames = match.shape[0]
        span = capacity + 1  # one scatter row per frame; the last column collects the tokens that do not merge
        offset = (torch.arange(frames, device=match.device) * span).view(-1, 1)
        slot = torch.where(match, target, capacity) + offset
        top = torch.full((frames * span,), -float("inf"), device=best.device).scatter_reduce(
            0, slot.flatten(), torch.where(match, best, -float("inf")).flatten(), "amax"
        )
        match = match & (best == top[slot])
        slot = torch.where(match, target, capacity) + offset
        lowest = torch.full((frames * span,), len(ids), device=ids.device, dtype=torch.int64).scatter_reduce(
            0, slot.flatten(), torch.where(match, ids, len(ids)).expand_as(match).flatten(), "amin"
        )
        return match & (ids == lowest[slot])

    def commit(self, cache: "LayerKVCache", chunk: "ChunkInfo") -> None:
        self.commit_layers([cache], chunk)

    def commit_graph_key(self, chunk: "ChunkInfo") -> tuple:
        """What a commit launches besides the buffers it works on: two commits with equal keys (on the same
        layout) launch the same kernels, the chunk's first frame being an input (``frame_start``), so a recorded
        commit can be replayed for every later chunk (see :meth:`KVCacheStore.commit`)."""
        return (tuple(self._merging_frames(chunk)), chunk.num_frames, chunk.tokens_per_frame, self._grid(chunk),
                self.budget(chunk))

    @torch.no_grad()
    def commit_layers(self, caches: "list[LayerKVCache]", chunk: "ChunkInfo",
                      frame_start: torch.Tensor | None = None) -> None:
        """Merge, evict and place the survivors in every layer, planned on the device: no host sync, so the host
        goes on launching (the decode, the next chunk) while the GPU commits. ``frame_start``, a 0-d int64
        tensor on the caches' device holding ``chunk.frame_start``, is the only per-chunk value the kernels read
        (made here when not given), so the whole commit can be recorded as a CUDA graph. Layers that share one
        allocation (:class:`~genkv.cache.LayerStack`, as :class:`~genkv.cache.KVCacheStore` makes them) are
        committed together, one kernel per step for all of them; a lone cache is a stack of one."""
        if not caches:
            return
        if frame_start is None:
            # a fill kernel (a host tensor copied over would wait for the device)
            frame_start = torch.full((), chunk.frame_start, dtype=torch.int64, device=caches[0].device)
        budget = self.budget(chunk)
        if self.sink_frames * chunk.tokens_per_frame >= budget:
            raise ValueError(
                f"tempcache: the budget ({budget} tokens) cannot hold the {self.sink_frames} sink frames "
                f"({self.sink_frames * chunk.tokens_per_frame} tokens); raise max_tokens or lower sink_frames"
            )
        for cache in caches:
            if not cache.fixed or cache.length != budget:
                raise RuntimeError(
                    f"tempcache keeps a fixed-layout cache of {budget} history slots; got "
                    f"{'a growing cache' if not cache.fixed else f'{cache.length} slots'} (make it with "
                    "LayerKVCache(max_tokens, fixed=True), as KVCacheStore does)"
                )
        for group in _LayerGroup.split(caches):
            if group.quantized:  # the chunk's codes in its staged slots: merges and moves then work on codes
                group.write_staged()
            self._merge_chunk(group, chunk, frame_start)
            self._evict_and_fill(group, budget)
            # statistics: left on the device (``cache_stats`` reads them; no sync in the chunk loop)
            counts = group.token_count[:, : group.length]
            merged, represented = (counts > 1).sum(1), counts.sum(1)
            for i, cache in enumerate(group.caches):
                cache.info["merged_groups"] = merged[i]
                cache.info["tokens_represented"] = represented[i]

    def _evict_and_fill(self, group: "_LayerGroup", budget: int) -> None:
        """Keep at most ``budget`` live slots per layer (evicting the oldest last-seen first, unmerged before
        merged among equals, then the lower position; sinks never) and move the chunk's surviving staged tokens
        into the history region's empty slots, lowest first. Only the survivors move (the history stays where it
        is), and whenever eviction runs it leaves exactly as many empty slots as there are survivors, so the
        history region never holds stale empty slots: it fills from the front, then stays full."""
        hist, staged, end, layers = group.length, group.staged, group.end, group.layers
        frames = group.frame_index[:, :end]  # (L, end) views: the fills below write the buffers
        counts = group.token_count[:, :end]
        positions = group.token_pos[:, :end]
        device = frames.device
        live = frames != EMPTY_FRAME
        evictable = live & (frames >= self.sink_frames)
        # A total order on the live slots that does not depend on where they sit in the buffer (a live slot's
        # frame and position are unique: they are its newest member's), so any layout evicts the same tokens.
        field = (1 << 20) - 1
        order_key = ((frames.clamp(min=0) << 40) | (counts.long().clamp(max=field) << 20)
                     | positions.clamp(0, field))
        order_key = order_key.masked_fill(~evictable, torch.iinfo(torch.int64).max)
        order = torch.argsort(order_key, dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(end, device=device).expand(layers, end))
        excess = live.sum(1, keepdim=True) - budget  # device values: <= 0 evicts nothing
        keep = live & ~(evictable & (rank < excess))
        # Empty history slots in ascending order (a full-width stable sort: the plan never leaves the device);
        # the i-th surviving staged token goes to the i-th of them, the others stay where they are (a no-op).
        holes = torch.argsort(keep[:, :hist].to(torch.int32), dim=1, stable=True)
        survives = keep[:, hist:]
        nth = (torch.cumsum(survives, 1) - 1).clamp(0, max(hist - 1, 0))  # (clamped where nothing survives)
        dest = torch.where(survives, holes.gather(1, nth), torch.arange(hist, end, device=device))
        flat = (dest + group.offsets.view(-1, 1)).flatten()
        frames.narrow(1, 0, hist).masked_fill_(~keep[:, :hist], EMPTY_FRAME)  # evicted: empty
        counts.narrow(1, 0, hist).masked_fill_(~keep[:, :hist], 0.0)
        if group.quantized:  # survivors' codes move as they are (no re-quantization)
            from genkv.kernels.quant_kv import copy_slots

            source = (torch.arange(hist, end, device=device) + group.offsets.view(-1, 1)).flatten()
            copy_slots(group.codes, source, flat)
        else:
            for buffer, flat_buffer in ((group.k, group.flat_k), (group.v, group.flat_v)):
                copy_rows_(flat_buffer, 1, flat, _merged_copy(buffer[:, :, hist:end], 1))
        for rows, flat_rows in ((frames, group.flat_frame), (counts, group.flat_count),
                                (positions, group.flat_pos)):
            flat_rows.index_copy_(0, flat, _merged_copy(rows[:, hist:end], 0))
        # the staging region is empty until the next chunk stages into it
        frames.narrow(1, hist, staged).fill_(EMPTY_FRAME)
        counts.narrow(1, hist, staged).fill_(0.0)
        positions.narrow(1, hist, staged).fill_(-1)

    # -- prompt switches -----------------------------------------------------------------------------------
    # A merged slot has no latent of its own (its value is the mean of several frames' tokens), so a re-cache
    # cannot recompute it. Instead the cache is rebuilt from the frames whose tokens a cache of this budget holds
    # without merging: the sinks and the newest ones; they are committed again, chunk by chunk, through the same
    # merges, under the new prompt. Older merged history (what the merges had kept beyond those frames) is dropped.
    def recache_frames(self, newest_frame: int, tokens_per_frame: int) -> list[int]:
        """Latent frames a re-cache (``recache=True`` at a prompt switch) commits again, the newest committed
        frame being ``newest_frame``: the sink frames and the newest ``budget - sinks`` frames (the budget in
        whole frames).

        Example:
            >>> TemporalMerge(0.95, 1, sink_frames=1, budget_frames=4, max_tokens=None).recache_frames(9, 16)
            [0, 7, 8, 9]
        """
        tokens = self.max_tokens if self.max_tokens is not None else self.budget_frames * tokens_per_frame
        window = max(tokens // tokens_per_frame - self.sink_frames, 1)
        sinks = range(min(self.sink_frames, newest_frame + 1))
        return sorted(set(sinks) | set(range(max(self.sink_frames, newest_frame - window + 1), newest_frame + 1)))

    @torch.no_grad()
    def flush(self, caches: "list[LayerKVCache]") -> None:
        """infinity-RoPE's KV flush on merged slots: keep the sink frames' slots and the newest frame's (every
        slot whose newest member is the newest frame: its own tokens and the groups it joined, their values and
        counts as they are); empty the others. On the device, no host sync."""
        for cache in caches:
            frames = cache.frame_index[: cache.length]
            live = frames != EMPTY_FRAME
            newest = frames.masked_fill(~live, -1).amax()
            drop = live & (frames >= self.sink_frames) & (frames != newest)
            frames.masked_fill_(drop, EMPTY_FRAME)
            cache.token_count[: cache.length].masked_fill_(drop, 0.0)

    # -- RoPE re-basing ------------------------------------------------------------------------------------
    def rebase_limit(self, store: "KVCacheStore") -> int | None:
        return self.rope_table_frames

    def rebase_delta(self, store: "KVCacheStore", frame_start: int, num_frames: int) -> int:
        oldest = None
        for layers in store.caches.values():
            for cache in layers:
                if cache.length:
                    frames = cache.frame_index[: cache.length]
                    frames = frames[frames >= self.sink_frames]
                    if frames.numel():
                        value = int(frames.min())
                        oldest = value if oldest is None else min(oldest, value)
        if oldest is None:
            oldest = frame_start
        return max(0, oldest - self.sink_frames - store.position_shift)

    def rebasable_tokens(self, cache: "LayerKVCache") -> np.ndarray:
        frames = cache.frame_index[: cache.length].cpu().numpy()
        return np.flatnonzero(frames >= self.sink_frames)



class _LayerGroup:
    """Layer caches committed together: their buffers as one ``(B, L, capacity, H, D)`` tensor and
    ``(L, capacity)`` records (a :class:`~genkv.cache.LayerStack`'s, or a lone cache's with L = 1), plus flat
    views with one token axis over all layers (layer ``l``'s slot ``s`` at ``l * capacity + s``) for the
    gathers and scatters that address slots of several layers at once."""

    def __init__(self, caches: "list[LayerKVCache]", k, v, frame_index, token_pos, token_count,
                 quantized: tuple | None = None) -> None:
        self.caches = caches
        self.k, self.v = k, v
        self.frame_index, self.token_pos, self.token_count = frame_index, token_pos, token_count
        self.layers, self.capacity = frame_index.shape
        self.length, self.staged = caches[0].length, caches[0].staged
        self.end = self.length + self.staged
        self.device = frame_index.device
        # Quantized layers (kv_dtype != "bf16"): k / v are None; ``codes`` is a flat QuantizedKV over the
        # L * capacity slots with smoothing factors 1, ``channel`` (B, L, H, D) the layers' own factors and
        # ``chunk_k`` / ``chunk_v`` (B, L, n, H, D) the staged chunks in full precision.
        self.quantized = quantized is not None
        if quantized is not None:
            self.codes, self.channel, self.chunk_k, self.chunk_v = quantized
            self.batch, _, _, self.heads, self.dim = self.chunk_k.shape
        else:
            self.batch, _, _, self.heads, self.dim = k.shape
            # (views: stacked buffers and lone caches are contiguous over (L, capacity))
            self.flat_k = k.view(self.batch, self.layers * self.capacity, self.heads, self.dim)
            self.flat_v = v.view(self.batch, self.layers * self.capacity, self.heads, self.dim)
        self.flat_frame = frame_index.view(-1)
        self.flat_pos = token_pos.view(-1)
        self.flat_count = token_count.view(-1)
        self.offsets = torch.arange(self.layers, device=self.device) * self.capacity

    # -- quantized layers: reads dequantize only the slots asked for, writes quantize only the slots written --
    def staged_keys(self) -> torch.Tensor:
        """(B, L, staged, H, D) keys of the chunk being committed."""
        if self.quantized:
            return self.chunk_k[:, :, : self.staged]
        return self.k[:, :, self.length : self.end]

    def dequantized_layer_keys(self, slots: torch.Tensor) -> torch.Tensor:
        """fp32 keys (B, L * S', H, D) of per-layer slots ``slots`` (L, S'), layer-major: each layer's smoothing
        factors broadcast over its slots (no per-slot copy of them)."""
        from genkv.kernels.quant_kv import dequantize_keys, select_slots

        flat = (slots + self.offsets.view(-1, 1)).flatten()
        keys = dequantize_keys(select_slots(self.codes, flat)).unflatten(1, slots.shape)
        return (keys * self.channel[:, :, None]).flatten(1, 2)

    def write(self, flat: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layers: slice = slice(None),
              blend: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Quantize keys and values (B, L', T, H, D) of the group's layers ``layers`` into ``flat`` (L' * T,
        layer-major): keys divided by their layer's factors first (exact: powers of two; the flat codes' own
        factors are 1). ``blend`` ``(weight, merged)`` (L' * T,): where merged, the value written is the slot's
        stored value times ``weight`` plus the new one times ``1 - weight`` (``write_rows``: one kernel on CUDA)."""
        from genkv.kernels.quant_write import write_rows

        write_rows(self.codes, flat, keys, values, self.channel[:, layers], blend)

    def write_staged(self) -> None:
        """The chunk's codes into its staged slots of every layer (measuring each layer's key smoothing factors
        on its first committed keys)."""
        from genkv.kernels.quant_kv import key_channel_scales

        keys = self.chunk_k[:, :, : self.staged]
        fresh = [c for c in self.caches if not c.quant.smoothing_set]
        if fresh:  # the first commit (host flags: a recorded commit, never the first, holds no such work)
            factors = key_channel_scales(keys.flatten(0, 1)).view(self.batch, self.layers, self.heads, self.dim)
            self.channel.copy_(factors)
            for c in fresh:
                c.quant.smoothing_set = True
        flat = torch.arange(self.length, self.end, device=self.device) + self.offsets.view(-1, 1)  # (L, staged)
        # A few layers at a time: quantizing writes fp32 temporaries of its input (~1 GiB per copy for 30 Wan
        # layers' chunk), which a graph's memory pool would otherwise keep at their all-layer size.
        step = -(-self.layers // _WRITE_GROUPS)
        for first in range(0, self.layers, step):
            part = slice(first, first + step)
            self.write(flat[part].flatten(), keys[:, part], self.chunk_v[:, part, : self.staged], layers=part)

    @classmethod
    def split(cls, caches: "list[LayerKVCache]") -> "list[_LayerGroup]":
        """Whole stacks (in order, with equal lengths) as one group each; every other cache alone."""
        groups, rest, seen = [], [], set()
        for cache in caches:
            stack = cache.stack
            if stack is None or id(stack) in seen:
                continue
            members = [c for c in caches if c.stack is stack]
            if stack.covers(members) and len({(c.length, c.staged) for c in members}) == 1:
                seen.add(id(stack))
                quantized = None if stack.codes is None else (stack.codes, stack.channel, stack.chunk_k,
                                                              stack.chunk_v)
                groups.append(cls(members, stack.k, stack.v, stack.frame_index, stack.token_pos,
                                  stack.token_count, quantized=quantized))
        for cache in caches:
            if cache.stack is None or id(cache.stack) not in seen:
                records = (cache.frame_index.unsqueeze(0), cache.token_pos.unsqueeze(0), cache.token_count.unsqueeze(0))
                if cache.quant is not None:
                    from dataclasses import replace

                    codes = cache.quant.codes
                    flat = replace(codes, key_channel_scale=torch.ones_like(codes.key_channel_scale))
                    quantized = (flat, codes.key_channel_scale.unsqueeze(1), cache.quant.chunk_k.unsqueeze(1),
                                 cache.quant.chunk_v.unsqueeze(1))
                    rest.append(cls([cache], None, None, *records, quantized=quantized))
                else:
                    rest.append(cls([cache], cache.k.unsqueeze(1), cache.v.unsqueeze(1), *records))
        return groups + rest


#: a quantized group writes its staged chunk in this many layer slices (bounds the temporaries of quantizing)
_WRITE_GROUPS = 5


def _merged_copy(x: torch.Tensor, dim: int) -> torch.Tensor:
    """A fresh contiguous copy of ``x`` with dims ``dim`` and ``dim + 1`` merged (one copy kernel whether or not a
    view could merge them: the copy is needed because the result is scattered back into the buffer ``x`` views)."""
    shape = (*x.shape[:dim], x.shape[dim] * x.shape[dim + 1], *x.shape[dim + 2 :])
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    out.view(x.shape).copy_(x)
    return out
