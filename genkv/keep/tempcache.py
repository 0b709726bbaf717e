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
match it again), the count-weighted mean value and count + 1; the new token's slot is freed. Matching is
decided jointly over heads and batch (the minimum similarity must pass), so every slot means the same thing in
every head and the buffer stays a plain ``(B, S, H, D)`` tensor.

Budget: after merging, if a layer holds more than ``max_tokens``, the least recently seen slots go first
(oldest ``frame_index``: a group refreshed by a match counts as recent), unmerged before merged among equals,
then the lower position; sink frames are never merged or evicted.

Layout: the cache is *fixed* (:attr:`genkv.keep.base.CacheKeeper.fixed_layout`): a history region of
``max_tokens`` slots for the whole video, empty slots with count 0 (key bias ``-inf``), the chunk staged after
it. A commit plans everything on the device (no host sync) and moves only the chunk's surviving tokens, into the
history's empty slots, so every forward of every chunk sees the same buffers and shapes (one CUDA graph each).

A group keeps its newest key, position included: in ``content`` mode its older members are then attended as
if they sat at the newest frame, the approximation FAST-AR's TempCache makes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..cache import EMPTY_FRAME
from ..compile import CompiledOnCuda
from .base import CacheKeeper

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
    the interleaved-pair layout of :func:`genkv.rope.apply_rotary_emb`; returns float32 (F, T, K). Written as
    plain elementwise + reductions so that ``torch.compile`` fuses it into a few kernels with no (B, F, T, K,
    H, D) intermediate (on a GPU this is most of a commit's time when run eagerly).

    Example:
        >>> k = torch.randn(1, 8, 2, 4)
        >>> slots = torch.arange(4).view(1, 4, 1)            # token t of the new frame vs slot t
        >>> pair_scores(k, slots, k[:, :4].unsqueeze(1), None).flatten().tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    old = k[:, slots.flatten()].unflatten(1, slots.shape).float()  # (B, F, T, K, H, D)
    new = k_new.float().unsqueeze(3)  # (B, F, T, 1, H, D)
    new_even, new_odd = new[..., 0::2], new[..., 1::2]
    if rotation is not None:
        cos, sin = rotation
        shape = (1, 1, *cos.shape[:2], 1, cos.shape[-1] // 2)
        cos, sin = cos[..., 0::2].reshape(shape), sin[..., 1::2].reshape(shape)
        new_even, new_odd = new_even * cos - new_odd * sin, new_even * sin + new_odd * cos
    old_even, old_odd = old[..., 0::2], old[..., 1::2]
    dot = (old_even * new_even + old_odd * new_odd).sum(-1)
    norms = (old * old).sum(-1) * (new * new).sum(-1)  # a rotation keeps the new key's norm
    cosine = dot / norms.clamp_min(1e-24).sqrt()
    exact = ((old_even == new_even) & (old_odd == new_odd)).all(-1)
    cosine = torch.where(exact, torch.ones_like(cosine), cosine)
    return cosine.amin(dim=-1).amin(dim=0)


_pair_scores_fused = CompiledOnCuda(pair_scores, "tempcache merge scores")

#: how keys are compared (see the module docstring)
MATCH_MODES = ("content", "stored")


class TemporalMerge(CacheKeeper):
    """The TempCache keeper (see the module docstring)."""

    method_name = "tempcache"
    fixed_layout = True  # see CacheKeeper.fixed_layout

    def __init__(
        self, threshold: float, radius: int, sink_frames: int, budget_frames: int, max_tokens: int | None,
        match: str = "content",
    ) -> None:
        if match not in MATCH_MODES:
            raise ValueError(f"tempcache: match must be 'content' or 'stored', got {match!r}")
        self.match = match
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
    def _similarities(self, cache: "LayerKVCache", chunk: "ChunkInfo", frames: list[int],
                      frame_start: torch.Tensor) -> tuple:
        """Candidate slots (F, T, K) and their similarity to each staged token (F, T, K), for all merging frames
        of the chunk in one batched pass.

        A group takes the newest key, so frame j's correspondents carry exactly frame j-1's *staged* keys
        whether or not those merged: the similarities of every frame can be computed before any merge. Frame 0
        of the chunk looks up the previous frame's live slots in the history; later frames point at the staged
        slots of the frame before (redirected to their group's slot while merging, see :meth:`_merge_chunk`).
        """
        tpf = chunk.tokens_per_frame
        device = cache.k.device
        nbr = self._candidates(chunk, device)  # (T, K) positions
        first = cache.length
        cands = []
        for j in frames:
            if j == 0:
                end = cache.length + cache.staged
                # Slot of each spatial position of the previous frame (-1 where it is gone); no host sync.
                live = cache.frame_index[:end] == frame_start - 1
                table = torch.full((tpf + 1,), -1, dtype=torch.int64, device=device)
                table.scatter_(0, torch.where(live, cache.token_pos[:end], tpf), torch.arange(end, device=device))
                table.narrow(0, tpf, 1).fill_(-1)  # a fill kernel: `table[tpf] = -1` copies a host scalar (a sync)
                cands.append(table[nbr])
            else:
                cands.append(first + (j - 1) * tpf + nbr)
        cand = torch.stack(cands)  # (F, T, K)
        safe = cand.clamp(min=0)
        # The merging frames are a suffix of the chunk: their staged slots are one contiguous range.
        k_new = cache.k.narrow(1, first + frames[0] * tpf, len(frames) * tpf).unflatten(1, (len(frames), tpf))
        score = _pair_scores_fused(cache.k, safe, k_new, self._rotation(chunk, device))
        score = score.masked_fill_(cand < 0, -float("inf"))  # gone from the previous frame
        return safe, score

    def _merging_frames(self, chunk: "ChunkInfo") -> list[int]:
        """The chunk's frames that may merge into the frame before them (neither they nor it a sink)."""
        return [j for j in range(chunk.num_frames) if chunk.frame_start + j - 1 >= self.sink_frames]

    @torch.no_grad()
    def _merge_chunk(self, cache: "LayerKVCache", chunk: "ChunkInfo", frame_start: torch.Tensor) -> None:
        """Merge the staged frames of the chunk into their temporal correspondents, frame after frame."""
        frames = self._merging_frames(chunk)
        if not frames or self.threshold > 1.0:
            return
        tpf = chunk.tokens_per_frame
        device = cache.k.device
        first = cache.length
        safe, score = self._similarities(cache, chunk, frames, frame_start)
        best_all, arg_all = score.max(dim=-1)  # (F, T)
        target_all = safe.gather(2, arg_all[..., None]).squeeze(2)  # (F, T) slots
        match_all = best_all >= self.threshold
        ids = torch.arange(tpf, device=device)
        if self.radius > 0:
            match_all = self._resolve_conflicts(match_all, best_all, target_all, ids, cache.capacity)
        # home[i]: the slot that holds staged token i's key after the merges so far (its own, or its group's).
        home = torch.arange(first, first + cache.staged, device=device)
        for n, j in enumerate(frames):
            frame = (frame_start + j).expand(tpf)  # a device value: a recorded commit replays for any chunk
            new_slots = home.narrow(0, j * tpf, tpf).clone()  # the frame's own staged slots (home is unchanged
            # there yet: only frame j writes them)
            match = match_all[n]
            target = target_all[n]
            if j > 0:  # staged slot of frame j-1 -> where that token lives now
                target = home[target - first]

            # Update the groups in place. Unmatched tokens "update" their own slot with its own values, so every
            # index below is unique and the writes need no host-side selection.
            dest = torch.where(match, target, new_slots)
            c_old = cache.token_count[dest]
            c_new = c_old + match  # + 1 where merged
            v_dest = cache.v[:, dest].float()
            v_src = cache.v.narrow(1, first + j * tpf, tpf).float()
            w_old = (c_old / c_new).view(1, -1, 1, 1)
            mean_v = torch.where(match.view(1, -1, 1, 1), v_dest * w_old + v_src * (1 - w_old), v_dest)
            cache.v.index_copy_(1, dest, mean_v.to(cache.v.dtype))
            # (clones: an unmatched token's source and destination are the same slot)
            cache.k.index_copy_(1, dest, cache.k.narrow(1, first + j * tpf, tpf).clone())
            cache.token_count.index_copy_(0, dest, c_new)
            cache.frame_index.index_copy_(0, dest, frame)
            cache.token_pos.index_copy_(0, dest, cache.token_pos.narrow(0, first + j * tpf, tpf).clone())
            # The merged tokens' own slots are free now.
            cache.frame_index.narrow(0, first + j * tpf, tpf).masked_fill_(match, EMPTY_FRAME)
            home.narrow(0, j * tpf, tpf).copy_(dest)

    @staticmethod
    def _resolve_conflicts(match: torch.Tensor, best: torch.Tensor, target: torch.Tensor, ids: torch.Tensor,
                           capacity: int) -> torch.Tensor:
        """Two tokens of one frame may pick one group: the better match wins (ties: the lower position).

        Done for every merging frame at once on the candidate slots as found (frame j's are frame j-1's staged
        slots). The merge loop redirects those to their groups, but that map is one-to-one on a frame's tokens
        (a group takes at most one token per frame), so the conflicts are the same ones.
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
        (made here when not given), so the whole commit can be recorded as a CUDA graph."""
        if not caches:
            return
        if frame_start is None:
            # a fill kernel (a host tensor copied over would wait for the device)
            frame_start = torch.full((), chunk.frame_start, dtype=torch.int64, device=caches[0].k.device)
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
            self._merge_chunk(cache, chunk, frame_start)
            self._evict_and_fill(cache, budget)
            # statistics: left on the device (``cache_stats`` reads them; no sync in the chunk loop)
            counts = cache.token_count[: cache.length]
            cache.info["merged_groups"] = (counts > 1).sum()
            cache.info["tokens_represented"] = counts.sum()

    def _evict_and_fill(self, cache: "LayerKVCache", budget: int) -> None:
        """Keep at most ``budget`` live slots (evicting the oldest last-seen first, unmerged before merged among
        equals, then the lower position; sinks never) and move the chunk's surviving staged tokens into the
        history region's empty slots, lowest first. Only the survivors move (the history stays where it is), and
        whenever eviction runs it leaves exactly as many empty slots as there are survivors, so the history
        region never holds stale empty slots: it fills from the front, then stays full."""
        hist, staged = cache.length, cache.staged
        end = hist + staged
        frames = cache.frame_index[:end]
        counts = cache.token_count[:end]
        positions = cache.token_pos[:end]
        live = frames != EMPTY_FRAME
        evictable = live & (frames >= self.sink_frames)
        # A total order on the live slots that does not depend on where they sit in the buffer (a live slot's
        # frame and position are unique: they are its newest member's), so any layout evicts the same tokens.
        field = (1 << 20) - 1
        order_key = ((frames.clamp(min=0) << 40) | (counts.long().clamp(max=field) << 20)
                     | positions.clamp(0, field))
        order_key = order_key.masked_fill(~evictable, torch.iinfo(torch.int64).max)
        order = torch.argsort(order_key, stable=True)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(end, device=order.device))
        excess = live.sum() - budget  # a device scalar: <= 0 evicts nothing
        keep = live & ~(evictable & (rank < excess))
        # Empty history slots in ascending order (a full-width stable sort: the plan never leaves the device);
        # the i-th surviving staged token goes to the i-th of them, the others stay where they are (a no-op).
        holes = torch.argsort(keep[:hist].to(torch.int32), stable=True)
        survives = keep[hist:]
        nth = (torch.cumsum(survives, 0) - 1).clamp(0, max(hist - 1, 0))  # (clamped where nothing survives)
        dest = torch.where(survives, holes.index_select(0, nth),
                           torch.arange(hist, end, device=holes.device))
        frames.narrow(0, 0, hist).masked_fill_(~keep[:hist], EMPTY_FRAME)  # evicted: empty
        counts.narrow(0, 0, hist).masked_fill_(~keep[:hist], 0.0)
        for buffer in (cache.k, cache.v):
            buffer.index_copy_(1, dest, buffer.narrow(1, hist, staged).clone())
        for buffer in (frames, counts, positions):
            buffer.index_copy_(0, dest, buffer.narrow(0, hist, staged).clone())
        # the staging region is empty until the next chunk stages into it
        frames.narrow(0, hist, staged).fill_(EMPTY_FRAME)
        counts.narrow(0, hist, staged).fill_(0.0)
        positions.narrow(0, hist, staged).fill_(-1)

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

