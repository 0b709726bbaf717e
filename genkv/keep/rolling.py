"""Rolling window with sink frames (Self-Forcing's local attention, LongLive's frame sink)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .base import CacheKeeper, largest_history_frames

if TYPE_CHECKING:  # pragma: no cover
    from ..cache import ChunkInfo, KVCacheStore, LayerKVCache


class SinkWindow(CacheKeeper):
    """Keep the first ``sink_frames`` latent frames forever and the most recent frames of a window.

    ``window_frames`` counts the frames a chunk attends to besides the sinks, *including its own*: a chunk
    of C frames sees the sinks plus the newest ``window_frames - C`` committed frames plus itself. This is
    upstream's ``local_attn_size = sink_frames + window_frames`` (LongLive: 3 sink + 9 recent, buffer 12).

    Eviction takes whole frames, oldest first, never a sink frame. Freed slots are overwritten in place by
    the chunk's surplus tokens (one copy of at most a chunk per layer; the buffer never shifts).

    Positions: keys keep the RoPE position they were committed with, as upstream does, until the next
    chunk would pass ``max_position``. Then every non-sink key is rotated back so the oldest window frame
    sits right after the sinks. Relative positions inside the window are unchanged by this, so attention
    among window and current chunk is the same; a key is re-rotated only once per ``max_position`` frames.
    """

    method_name = "rolling"

    def __init__(self, sink_frames: int, window_frames: int, max_position: int | None, rebase: bool) -> None:
        self.sink_frames = sink_frames
        self.window_frames = window_frames
        self.max_position = max_position
        self.rebase = rebase

    def check_chunk(self, num_frames: int) -> None:
        if self.window_frames < num_frames:
            raise ValueError(
                f"rolling: window_frames={self.window_frames} is smaller than a chunk ({num_frames} latent "
                f"frames); use window_frames >= {num_frames}"
            )

    def fit_bytes(self, budget_bytes: int, cost, chunk_frames: int, tokens_per_frame: int) -> dict:
        """The widest window whose caches fit ``budget_bytes`` (sinks kept; see CacheKeeper.fit_bytes)."""
        frames = largest_history_frames(budget_bytes, cost, chunk_frames, tokens_per_frame, self.sink_frames,
                                        self.method_name)
        self.window_frames = frames - self.sink_frames + chunk_frames
        tokens = frames * tokens_per_frame
        return {"budget_bytes": budget_bytes, "window_frames": self.window_frames, "history_tokens": tokens,
                "bytes": cost(tokens, chunk_frames * tokens_per_frame)}

    def history_frames(self, chunk_frames: int) -> int:
        return self.sink_frames + self.window_frames - chunk_frames

    def max_history_tokens(self, chunk: "ChunkInfo") -> int:
        return self.history_frames(chunk.num_frames) * chunk.tokens_per_frame

    def commit(self, cache: "LayerKVCache", chunk: "ChunkInfo") -> None:
        budget = self.max_history_tokens(chunk)
        total = cache.length + cache.staged
        if total <= budget:
            cache.length = total
            return
        frames = cache.frame_host[:total]
        # Which frames stay: all sinks, then the newest non-sink frames until the budget is full.
        kept_frames: set[int] = set()
        room = budget // chunk.tokens_per_frame
        distinct = np.unique(frames)
        for f in distinct[distinct < self.sink_frames]:
            kept_frames.add(int(f))
        for f in distinct[distinct >= self.sink_frames][::-1]:
            if len(kept_frames) >= room:
                break
            kept_frames.add(int(f))
        keep = np.isin(frames, np.fromiter(kept_frames, dtype=np.int64, count=len(kept_frames)))
        holes = np.flatnonzero(~keep[:budget])
        movers = budget + np.flatnonzero(keep[budget:])
        # Sinks never exceed the room (window_frames >= chunk), so exactly `budget` tokens are kept and
        # every hole below the budget has one kept token above it to take its place.
        assert len(holes) == len(movers)
        cache.move_tokens(movers, holes)
        cache.length = budget

    # -- RoPE re-basing --------------------------------------------------------------------------------
    def _limit(self) -> int | None:
        return self.max_position if self.max_position is not None else self.rope_table_frames

    def rebase_limit(self, store: "KVCacheStore") -> int | None:
        return self._limit() if self.rebase else None

    def rebase_delta(self, store: "KVCacheStore", frame_start: int, num_frames: int) -> int:
        oldest_window_frame = max(self.sink_frames, frame_start - (self.window_frames - num_frames))
        target_shift = oldest_window_frame - self.sink_frames
        return max(0, target_shift - store.position_shift)

    def rebasable_tokens(self, cache: "LayerKVCache") -> np.ndarray:
        return np.flatnonzero(cache.frame_host[: cache.length] >= self.sink_frames)
