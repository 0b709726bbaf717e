"""What every keeper (the policy that decides which K/V stay in memory) implements."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..cache import ChunkInfo, KVCacheStore, LayerKVCache
    from ..rope import FrameOffsetRotaryPosEmbed


def largest_history_frames(budget_bytes: int, cost, chunk_frames: int, tokens_per_frame: int, minimum: int,
                           method: str) -> int:
    """The most history frames (>= ``minimum``) whose caches, ``cost(history_tokens, chunk_tokens)`` bytes, fit
    ``budget_bytes`` (cost grows linearly with the history); a one-line ``ValueError`` when not even ``minimum``.

    Example:
        >>> largest_history_frames(1000, lambda t, n: 10 * (t + n), 1, 4, 2, "rolling")
        24
    """
    chunk_tokens = chunk_frames * tokens_per_frame
    fixed = cost(0, chunk_tokens)
    per_frame = cost(tokens_per_frame, chunk_tokens) - fixed
    frames = (budget_bytes - fixed) // per_frame if budget_bytes >= fixed else -1
    if frames < minimum:
        need = cost(minimum * tokens_per_frame, chunk_tokens)
        raise ValueError(f"{method}: budget_bytes={budget_bytes} cannot hold {minimum} history frame(s) and a chunk; "
                         f"at least {need} bytes are needed")
    return int(frames)


class CacheKeeper:
    """Base keeper: keeps every committed token (the exact, growing cache).

    A keeper runs once per committed chunk, after the chunk's clean pass: :meth:`commit` turns the staged
    tokens ``[length, length + staged)`` of one layer cache into history. Subclasses override the hooks they
    change; the defaults describe an unbounded cache with absolute positions.
    """

    method_name = "full"
    #: RoPE table length of the patched model, set by ``apply_genkv``; positions past it are re-based by
    #: keepers that can do so without changing what attention sees.
    rope_table_frames: int | None = None
    #: the patched model's rotary embedding (``FrameOffsetRotaryPosEmbed``), set by ``apply_genkv``; None for a
    #: model without one (keepers that compare keys then compare them as stored)
    rope: "FrameOffsetRotaryPosEmbed | None" = None
    #: True for a keeper whose caches keep one layout for the whole video: the history is a fixed region of
    #: ``max_history_tokens`` slots (live ones, and empty ones with count 0: a key bias of -inf) and the chunk is
    #: staged right after it. Every forward then reads the same buffers with the same shapes, so one CUDA
    #: graph can serve every chunk, and the keeper plans on the device (no host sync per commit).
    fixed_layout: bool = False

    #: memory budget for the self-attention cache (all layers of a CFG branch), in bytes; a bounded keeper turns
    #: it into its frame budget at a video's first chunk (:meth:`fit_bytes`)
    budget_bytes: int | None = None

    def fit_bytes(self, budget_bytes: int, cost, chunk_frames: int, tokens_per_frame: int) -> dict:
        """Set the largest frame budget whose caches fit ``budget_bytes``; ``cost(history_tokens, chunk_tokens)``
        gives the bytes of all layers. Returns what was chosen (reported by ``cache_stats``)."""
        raise ValueError(f"{self.method_name} keeps every token: budget_bytes needs a bounded method "
                         "(rolling, tempcache, fastar)")

    def check_chunk(self, num_frames: int) -> None:
        """Raise ``ValueError`` if a chunk of ``num_frames`` latent frames cannot be held."""

    def max_history_tokens(self, chunk: "ChunkInfo") -> int | None:
        """Bound on committed tokens per layer (None = unbounded); lets bounded caches allocate once."""
        return None

    def commit(self, cache: "LayerKVCache", chunk: "ChunkInfo") -> None:
        cache.length += cache.staged

    def commit_layers(self, caches: "list[LayerKVCache]", chunk: "ChunkInfo") -> None:
        """Commit the staged chunk of every layer; override to batch work (and host syncs) across layers."""
        for cache in caches:
            self.commit(cache, chunk)

    # -- RoPE re-basing --------------------------------------------------------------------------------
    def rebase_limit(self, store: "KVCacheStore") -> int | None:
        """Highest RoPE position (exclusive) a chunk may reach before :meth:`rebase_delta` is asked."""
        return None

    def rebase_delta(self, store: "KVCacheStore", frame_start: int, num_frames: int) -> int:
        """Frames by which to move re-basable keys (and later positions) back; 0 = no re-basing."""
        return 0

    def rebasable_tokens(self, cache: "LayerKVCache") -> "np.ndarray | None":
        """Slots whose keys move when re-basing (None = all)."""
        return None
