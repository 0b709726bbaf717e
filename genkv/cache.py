"""The KV cache the attention processors read and write.

Layout (one :class:`LayerKVCache` per attention layer and CFG branch)::

    k, v        (B, capacity, H, D)   post-norm, post-RoPE keys and raw values, in diffusers' layout
    (key bias)  derived, not stored:  in a fixed layout (the merging keepers'), readers get ``log(token_count)``
                                      as a (B, S, H) broadcast view: ``log(n)`` for a key standing for n merged
                                      ones, 0 for a plain key, -inf for an empty slot. One value per slot, because
                                      keepers decide merges
                                      jointly over batch and heads; made from the counts, so merging costs no
                                      memory beyond what every method keeps
    frame_index (capacity,)           latent frame each token came from (absolute, never re-based)
    token_pos   (capacity,)           spatial index of the token inside its frame (h * W + w)
    token_count (capacity,)           original tokens a slot stands for (1; more once a keeper merges)

Tokens ``[0, length)`` are committed history (in a *fixed layout*, the keeper's choice, ``length`` never changes:
the history region holds live slots and empty ones, count 0, which attention never sees; see
:attr:`genkv.keep.base.CacheKeeper.fixed_layout`). Each forward of the current chunk *stages* its K/V at
``[length, length + n)`` (overwriting the previous step's, as upstream Self-Forcing does) and attention reads
the contiguous view ``[0, length + n)``: no concatenation, no copy of the history on the hot path. After the
chunk's clean pass, :meth:`KVCacheStore.commit` hands every layer to the method's keeper, which decides what
of the staged chunk becomes history (append, evict, merge). Compression therefore runs once per chunk, never
per attention call.

Order inside the buffer carries no meaning (attention is permutation-invariant over keys; positions are baked
into the keys by RoPE), which lets keepers overwrite evicted slots in place instead of shifting the buffer.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from .switches import env_flag

if TYPE_CHECKING:  # pragma: no cover
    from genkv.pipelines.self_forcing.step_graph import ChunkGraphs

    from .keep.base import CacheKeeper
    from .rope import FrameOffsetRotaryPosEmbed


#: frame_index of an empty slot in a fixed-layout cache (and of a slot a merge freed)
EMPTY_FRAME = -2

#: storage formats of the committed history (``kv_dtype``): the model's dtype, or genkv.kernels.quant_kv's codes
KV_DTYPES = ("bf16", "fp8", "int8", "int4")


def to_device_index(index: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host index array → device tensor without stalling the host (pinned, non-blocking copy).

    A copy from pageable memory would wait for all queued GPU work, so the host could not run ahead of the GPU
    (and launch the next chunk, or overlap the VAE decode) while a keeper plans evictions.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


#: whether :func:`copy_rows_` copies 8-byte words (env ``GENKV_WORD_COPIES``, read at import; ``0`` gives aten's
#: element copy, for a benchmark's A/B: the bits are the same)
WORD_COPIES: bool = env_flag("GENKV_WORD_COPIES", True)


def _as_words(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` seen as 8-byte words along its last dim (the same memory), or None where its layout does not allow it
    (a last dim not in whole words, not contiguous, or a stride or offset between words)."""
    size = t.element_size()
    if size >= 8 or t.dim() < 2 or t.dtype == torch.bool or t.is_complex():
        return None
    width = 8 // size
    if t.stride(-1) != 1 or t.shape[-1] % width or t.storage_offset() % width:
        return None
    if any(stride % width for stride in t.stride()[:-1]):
        return None
    return t.view(torch.int64)


def copy_rows_(target: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``target.index_copy_(dim, index, source)`` for a ``dim`` before the last, done on 8-byte words where both
    layouts allow it: the same bits land in the same places.

    aten's index copy moves one element per lane, so bf16 rows go two bytes at a time: a TempCache commit's copy
    of 30 layers' merged keys (144 MB) took ~340 us on an H100 (~0.85 TB/s; the eighth session's fp8 + TAEHV
    profile, 8 such calls a chunk). As int64 words the same copy has a quarter of the elements.

    Example:
        >>> import torch
        >>> target, source = torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16), torch.randn(1, 2, 2, 8).bfloat16()
        >>> index = torch.tensor([3, 0])
        >>> torch.equal(copy_rows_(target.clone(), 1, index, source), target.index_copy_(1, index, source))
        True
    """
    dim = dim % target.dim()
    if WORD_COPIES and dim < target.dim() - 1 and source.dtype == target.dtype:
        target_words, source_words = _as_words(target), _as_words(source)
        if target_words is not None and source_words is not None:
            target_words.index_copy_(dim, index, source_words)
            return target
    return target.index_copy_(dim, index, source)


def select_rows(source: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``source.index_select(dim, index)`` for a ``dim`` before the last, gathered as 8-byte words where the layout
    allows it (see :func:`copy_rows_`); the result is a new contiguous tensor of ``source``'s dtype.

    Example:
        >>> import torch
        >>> source = torch.randn(1, 5, 2, 8).bfloat16()
        >>> torch.equal(select_rows(source, 1, torch.tensor([4, 0])), source.index_select(1, torch.tensor([4, 0])))
        True
    """
    dim = dim % source.dim()
    if WORD_COPIES and dim < source.dim() - 1:
        words = _as_words(source)
        if words is not None:
            return words.index_select(dim, index).view(source.dtype)
    return source.index_select(dim, index)


#: bytes of a slot's per-token records (frame_index, token_pos int64; token_count float32)
_RECORD_BYTES = 8 + 8 + 4


def quantized_slots(capacity: int) -> int:
    """Slots a quantized cache allocates for ``capacity`` tokens: with ``heads``-laid-out scales
    (``GENKV_KV_SCALE_LAYOUT``) a multiple of ``SCALE_ALIGN``, so that the layers of a :class:`LayerStack`, laid end
    to end, each start their scale rows on the 16-byte boundary the kernel's asynchronous copies need (else it
    falls back to synchronous loads); ``capacity`` itself with ``tokens`` scales.

    Example:
        >>> quantized_slots(64)  # a multiple of 16 stays as it is under either layout
        64
    """
    from genkv.kernels import quant_kv

    return quant_kv.aligned_slots(capacity) if quant_kv.SCALE_LAYOUT == "heads" else capacity


@dataclass(frozen=True)
class ModelShape:
    """What sizes a layer cache: self-attention heads and head dim, bytes of the model's dtype, batch size."""

    heads: int
    head_dim: int
    dtype_bytes: int = 2
    batch: int = 1


def layer_cache_bytes(history_tokens: int, chunk_tokens: int, kv_dtype: str, shape: ModelShape) -> int:
    """Bytes one layer cache allocates for a bounded history of ``history_tokens`` slots and a staged chunk of
    ``chunk_tokens``: what :meth:`LayerKVCache.nbytes` reports once a bounded keeper has allocated.

    bf16 keeps history and chunk in one buffer of the model's dtype; a quantized cache keeps codes and scales
    (fp16, or fp32 under ``GENKV_KV_SCALES=fp32``) for history and chunk slots (the commit writes the chunk there
    first), the chunk itself in the model's dtype, and fp32 smoothing factors (genkv.kernels.quant_kv's format).

    Example:
        Wan2.1-1.3B shapes (12 heads of 128; 1560 tokens a frame): 18 history frames and a 3-frame chunk

        >>> shape = ModelShape(heads=12, head_dim=128)
        >>> int4, bf16 = (layer_cache_bytes(18 * 1560, 3 * 1560, kind, shape) for kind in ("int4", "bf16"))
        >>> round(int4 / bf16, 2)
        0.41
    """
    slots = history_tokens + chunk_tokens
    h, d, b = shape.heads, shape.head_dim, shape.batch
    full_precision = 2 * h * d * shape.dtype_bytes * b  # keys + values of one token
    if kv_dtype == "bf16":
        return slots * (full_precision + _RECORD_BYTES)
    slots = quantized_slots(slots)
    from genkv.kernels.quant_kv import SCALE_DTYPE

    scale = SCALE_DTYPE.itemsize
    per_token = h * b * ((d + 3 * scale) if kv_dtype == "int4" else (2 * d + 2 * scale))  # codes, scales (int4 zeros)
    return slots * (per_token + _RECORD_BYTES) + chunk_tokens * full_precision + b * h * d * 4


@dataclass
class ChunkInfo:
    """Where the chunk being generated sits in the video."""

    frame_start: int  # absolute latent frame index of the chunk's first frame
    num_frames: int
    tokens_per_frame: int
    position: int  # temporal RoPE position of the first frame (frame_start minus any re-basing)
    grid: tuple[int, int] | None = None  # (rows, cols) of tokens in a frame, when known

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame


@functools.lru_cache(maxsize=32)
def _staged_pattern(staged: int, tokens_per_frame: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame offset and spatial position of each staged token: the same every chunk, so made once."""
    idx = torch.arange(staged, device=device)
    return torch.div(idx, tokens_per_frame, rounding_mode="floor"), idx % tokens_per_frame


class QuantizedHistory:
    """The committed history of one layer as quantized codes, and the staged chunk in full precision.

    Used by :class:`LayerKVCache` when ``kv_dtype`` is ``"fp8"``, ``"int8"`` or ``"int4"`` (format:
    ``genkv.kernels.quant_kv``). Slots ``[0, capacity)`` hold codes and per-token scales; the chunk being
    denoised is staged into ``chunk_k`` / ``chunk_v`` (B, n, H, D) and quantized once, when it is committed
    (:meth:`write`). Readers get both and never a full-precision copy of the history.

    Example:
        >>> h = QuantizedHistory("int8")
        >>> h.reserve(torch.zeros(1, 4, 2, 16), capacity=8, length=0)
        >>> k = torch.randn(1, 4, 2, 16)
        >>> h.stage(k, k.clone())[0].shape
        torch.Size([1, 4, 2, 16])
        >>> h.write(torch.arange(4), 4)
        >>> from genkv.kernels import dequantize
        >>> bool((dequantize(h.prefix(4))[0] - k).abs().max() < 0.05)
        True
    """

    def __init__(self, kind: str) -> None:
        from genkv.kernels.quant_kv import KINDS

        if kind not in KINDS:
            raise ValueError(f"kv_dtype {kind!r} is not one of {', '.join(KV_DTYPES)}")
        self.kind = kind
        self.codes = None  # QuantizedKV of `capacity` slots
        self.chunk_k: torch.Tensor | None = None  # (B, n_max, H, D), the model's dtype
        self.chunk_v: torch.Tensor | None = None
        self.smoothing_set = False  # key smoothing factors are measured on the first committed keys

    @property
    def capacity(self) -> int:
        return 0 if self.codes is None else self.codes.length

    def reserve(self, like: torch.Tensor, capacity: int, length: int) -> None:
        """History slots for ``capacity`` tokens (the first ``length`` copied over) and a chunk buffer for
        ``like``'s tokens; a buffer is replaced only when it is too small (stable addresses for CUDA graphs)."""
        from genkv.kernels.quant_kv import QuantizedKV, code_fields

        b, n, h, d = like.shape
        if capacity > self.capacity:
            channel = (torch.ones(b, h, d, device=like.device) if self.codes is None
                       else self.codes.key_channel_scale)
            codes = QuantizedKV.empty(self.kind, b, capacity, h, channel)
            if self.codes is not None and length:
                for new, old in zip(code_fields(codes), code_fields(self.codes)):
                    new[:, :length] = old[:, :length]
            self.codes = codes
        if self.chunk_k is None or self.chunk_k.shape[1] < n or self.chunk_k.dtype != like.dtype:
            self.chunk_k = like.new_empty(b, n, h, d)
            self.chunk_v = like.new_empty(b, n, h, d)

    def adopt(self, codes, chunk_k: torch.Tensor, chunk_v: torch.Tensor) -> None:
        """Take buffers made for it (a :class:`LayerStack`'s slices), their contents already in place."""
        self.codes, self.chunk_k, self.chunk_v = codes, chunk_k, chunk_v

    def stage(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = key.shape[1]
        assert self.chunk_k is not None and self.chunk_v is not None
        self.chunk_k[:, :n] = key
        self.chunk_v[:, :n] = value
        return self.chunk_k[:, :n], self.chunk_v[:, :n]

    def prefix(self, length: int):
        """The first ``length`` slots (views), what the kernels read as ``history=``."""
        assert self.codes is not None
        return self.codes.prefix(length)

    def write(self, slots: torch.Tensor, staged: int) -> None:
        """Quantize the first ``staged`` chunk tokens into history ``slots`` (the commit; no host sync)."""
        from genkv.kernels.quant_kv import key_channel_scales, write_quantized

        assert self.codes is not None and self.chunk_k is not None and self.chunk_v is not None
        k, v = self.chunk_k[:, :staged], self.chunk_v[:, :staged]
        if not self.smoothing_set:  # the layer's smoothing factors, from its first clean keys
            self.codes.key_channel_scale.copy_(key_channel_scales(k))
            self.smoothing_set = True
        write_quantized(self.codes, slots, k, v)

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        from genkv.kernels.quant_kv import copy_slots

        assert self.codes is not None
        copy_slots(self.codes, src, dst)

    def rotate_keys(self, slots: torch.Tensor, rotate) -> None:
        """Re-base the keys at ``slots``: dequantize only them, ``rotate`` (in place, (B, n, H, D)), re-quantize.
        Values are kept as they are (their codes are copied back), so only the moved keys are re-quantized."""
        from genkv.kernels.quant_kv import code_fields, dequantize, select_slots, write_quantized

        assert self.codes is not None
        picked = select_slots(self.codes, slots)
        k, v = dequantize(picked)
        rotate(k)
        write_quantized(self.codes, slots, k, v)
        # write_quantized re-quantized the values too: put their codes back (key fields first, then value ones)
        for target, source in zip(code_fields(self.codes)[2:], code_fields(picked)[2:]):
            target.index_copy_(1, slots, source)

    def nbytes(self) -> int:
        """Codes, scales and smoothing factors of every slot, plus the staged chunk buffers."""
        chunk = sum(t.numel() * t.element_size() for t in (self.chunk_k, self.chunk_v) if t is not None)
        return chunk + (0 if self.codes is None else self.codes.nbytes)

    def bytes_per_token(self) -> float:
        return 0.0 if not self.capacity else (self.codes.nbytes / self.capacity)


class LayerKVCache:
    """K/V buffers of one attention layer for one CFG branch (see the module docstring for the layout)."""

    def __init__(self, max_tokens: int | None = None, fixed: bool = False, stack: "LayerStack | None" = None,
                 kv_dtype: str = "bf16") -> None:
        if fixed and max_tokens is None:
            raise ValueError("a fixed-layout cache needs max_tokens (its history region's size)")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}; got {kv_dtype!r}")
        self.kv_dtype = kv_dtype
        # kv_dtype != "bf16": history as codes + scales, the staged chunk in its own full-precision buffer; then
        # self.k / self.v stay None (bf16: history and chunk share self.k / self.v, exactly as before).
        self.quant = QuantizedHistory(kv_dtype) if kv_dtype != "bf16" else None
        # The layers of one branch whose buffers are slices of one allocation (fixed layout; see LayerStack)
        self.stack = stack
        self.max_tokens = max_tokens  # history bound from the keeper; None = grows without bound
        # Fixed layout (see CacheKeeper.fixed_layout): the history is always the region [0, max_tokens), live and
        # empty slots; an empty slot has count 0, so its key bias log(0) = -inf hides it from attention.
        self.fixed = fixed
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.frame_index: torch.Tensor | None = None
        self.token_pos: torch.Tensor | None = None
        self.token_count: torch.Tensor | None = None
        # keeper-reported statistics (merged groups, ...): numbers, or 0-d device tensors read only when asked
        self.info: dict[str, float | torch.Tensor] = {}
        # Host mirror of frame_index: keepers plan evictions on the host without a device sync.
        self.frame_host = np.empty(0, dtype=np.int64)
        self.length = max_tokens if fixed else 0  # committed tokens (fixed layout: the history region's size)
        self.staged = 0  # tokens of the current chunk written after them
        self.tokens_seen = 0  # tokens ever committed (before eviction or merging)

    # -- storage -------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        if self.quant is not None:
            return self.quant.capacity
        return 0 if self.k is None else self.k.shape[1]

    @property
    def allocated(self) -> bool:
        return self.frame_index is not None

    @property
    def device(self) -> torch.device:
        assert self.frame_index is not None
        return self.frame_index.device

    def buffer_address(self) -> int:
        """Address of the key storage (changes when the cache grows into new buffers)."""
        if self.quant is not None:
            return 0 if self.quant.codes is None else self.quant.codes.k_codes.data_ptr()
        return 0 if self.k is None else self.k.data_ptr()

    def _batch_heads(self) -> tuple[int, int]:
        if self.quant is not None:
            assert self.quant.codes is not None
            return self.quant.codes.k_codes.shape[0], self.quant.codes.k_codes.shape[2]
        assert self.k is not None
        return self.k.shape[0], self.k.shape[2]

    def _allocate(self, like: torch.Tensor, capacity: int) -> None:
        """Move to buffers of ``capacity`` tokens; atomic (an out-of-memory error leaves the cache as it was)."""
        if self.stack is not None:
            self.stack.allocate(like, capacity)  # every layer of the stack at once
            return
        if self.quant is not None:
            self._allocate_quantized(like, capacity)
            return
        b, _, h, d = like.shape
        k = like.new_empty(b, capacity, h, d)
        v = like.new_empty(b, capacity, h, d)
        frame_index = torch.empty(capacity, dtype=torch.int64, device=like.device)
        token_pos = torch.empty(capacity, dtype=torch.int64, device=like.device)
        token_count = torch.empty(capacity, dtype=torch.float32, device=like.device)
        self._adopt(k, v, frame_index, token_pos, token_count)

    def _allocate_quantized(self, like: torch.Tensor, capacity: int) -> None:
        """History codes for ``capacity`` slots (rounded by :func:`quantized_slots`; the committed ones copied over)
        and new per-token records."""
        assert self.quant is not None
        capacity = quantized_slots(capacity)
        self.quant.reserve(like, capacity, self.length)
        device = like.device
        records = (torch.empty(capacity, dtype=torch.int64, device=device),
                   torch.empty(capacity, dtype=torch.int64, device=device),
                   torch.empty(capacity, dtype=torch.float32, device=device))
        self._adopt_records(capacity, *records)

    def _adopt(self, k: torch.Tensor, v: torch.Tensor, frame_index: torch.Tensor, token_pos: torch.Tensor,
               token_count: torch.Tensor) -> None:
        """Take new (uninitialised) buffers: fill the empty state, copy the history over, switch to them."""
        n = self.length
        if self.fixed:  # zeros, not garbage: routing pools the keys of whole blocks, empty slots included
            k.zero_()
            v.zero_()
        if self.k is not None and n:
            k[:, :n] = self.k[:, :n]
            v[:, :n] = self.v[:, :n]
        self.k, self.v = k, v
        self._adopt_records(k.shape[1], frame_index, token_pos, token_count)

    def _fill_empty_records(self, frame_index: torch.Tensor, token_pos: torch.Tensor,
                            token_count: torch.Tensor) -> None:
        """Per-token records of empty slots (a fixed layout's count 0 hides them from attention)."""
        frame_index.fill_(EMPTY_FRAME if self.fixed else -1)
        token_pos.fill_(-1)
        token_count.fill_(0.0 if self.fixed else 1.0)

    def _adopt_records(self, capacity: int, frame_index: torch.Tensor, token_pos: torch.Tensor,
                       token_count: torch.Tensor) -> None:
        """Take new per-token records: fill the empty state, copy the history's over, switch to them."""
        n = self.length
        self._fill_empty_records(frame_index, token_pos, token_count)
        if self.frame_index is not None and n:
            frame_index[:n] = self.frame_index[:n]
            token_pos[:n] = self.token_pos[:n]
            token_count[:n] = self.token_count[:n]
        frame_host = np.full(capacity, -1, dtype=np.int64)
        kept = min(n, len(self.frame_host))  # a new fixed-layout cache has a history region but no mirror yet
        frame_host[:kept] = self.frame_host[:kept]
        self.frame_index, self.token_pos, self.frame_host = frame_index, token_pos, frame_host
        self.token_count = token_count

    def empty_in_place(self) -> None:
        """Empty a fixed-layout cache into its own buffers: every slot as a new allocation leaves it (zero K/V,
        empty records; a quantized layer measures its key smoothing factors again), the allocation and its
        capacity kept. A prompt
        switch's re-cache (``recache=True``) refills it: allocating anew there would hold a second copy of the
        cache while the old one is still referenced (by recorded graphs), and grow it again run by run."""
        if not self.fixed:
            raise RuntimeError("empty_in_place is for fixed-layout caches; a growing cache is reset")
        if self.frame_index is None:
            return
        if self.quant is not None:
            self.quant.codes.fill_empty()
            self.quant.smoothing_set = False  # measured again on the first keys committed, as a new cache's
        else:
            self.k.zero_()  # zeros, not stale keys: routing pools whole blocks, empty slots included
            self.v.zero_()
        self._fill_empty_records(self.frame_index, self.token_pos, self.token_count)
        self.frame_host[:] = -1
        self.staged = 0
        self.tokens_seen = 0
        self.info.clear()

    def _reserve(self, like: torch.Tensor, needed: int) -> None:
        held = self.k if self.quant is None else self.quant.chunk_k
        if held is not None and (held.shape[0] != like.shape[0] or held.shape[2:] != like.shape[2:]):
            raise ValueError(
                f"KV cache holds batch/heads/dim {tuple(held.shape[::2])} but got {tuple(like.shape[::2])}; "
                "reset the cache (a new video) before changing the batch size"
            )
        if needed <= self.capacity:
            if self.quant is not None and self.quant.chunk_k.shape[1] < like.shape[1]:  # a longer chunk
                if self.stack is not None:
                    self.stack.allocate(like, max(self.capacity, self.length + like.shape[1]))
                else:
                    self.quant.reserve(like, self.capacity, self.length)
            return
        if self.max_tokens is not None:
            # A bounded keeper: one allocation for the whole rollout (fixed shapes, CUDA-graph friendly).
            self._allocate(like, max(needed, self.max_tokens + like.shape[1]))
            return
        # Unbounded: grow by 1.5x (amortised copies); when memory is too tight for that, fit exactly.
        try:
            self._allocate(like, max(needed, int(self.capacity * 1.5) + like.shape[1]))
        except torch.OutOfMemoryError:
            if like.device.type == "cuda":
                torch.cuda.empty_cache()
            self._allocate(like, needed)

    def _bias_view(self, end: int) -> torch.Tensor:
        assert self.token_count is not None
        batch, heads = self._batch_heads()
        return self.token_count[:end].log().view(1, end, 1).expand(batch, end, heads)

    # -- the hot path --------------------------------------------------------------------------------
    def stage(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write the current chunk's K/V after the history and return views over history + chunk."""
        n = key.shape[1]
        self._reserve(key, self.length + n)
        end = self.length + n
        self.staged = n
        bias = None
        if self.fixed:
            self.token_count[self.length : end] = 1.0  # the staged tokens stand for themselves (a fill, no sync)
            bias = self._bias_view(end)
        if self.quant is not None:
            # Only the chunk: the history is read as codes (quantized_history()); the bias spans both.
            chunk_k, chunk_v = self.quant.stage(key, value)
            return chunk_k, chunk_v, bias
        assert self.k is not None and self.v is not None
        self.k[:, self.length : end] = key
        self.v[:, self.length : end] = value
        return self.k[:, :end], self.v[:, :end], bias

    def quantized_history(self):
        """The committed slots ``[0, length)`` as a ``QuantizedKV`` (views), or None for a bf16 cache (whose
        :meth:`stage` returns history and chunk together)."""
        return None if self.quant is None else self.quant.prefix(self.length)

    def write_staged(self) -> None:
        """Quantize the staged chunk into slots ``[length, length + staged)`` (a quantized cache's commit, before
        the keeper runs: keepers then see the chunk where a bf16 cache has it)."""
        assert self.quant is not None and self.frame_index is not None
        slots = torch.arange(self.length, self.length + self.staged, device=self.frame_index.device)
        self.quant.write(slots, self.staged)

    def history(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Views over the committed tokens only."""
        if self.quant is not None:
            raise RuntimeError("a quantized cache's history is codes: read it with quantized_history()")
        if self.k is None:
            raise RuntimeError("the cache is empty")
        n = self.length
        bias = self._bias_view(n) if self.fixed else None
        return self.k[:, :n], self.v[:, :n], bias

    def label_staged(self, chunk: ChunkInfo) -> None:
        """Record frame index and spatial position of the staged tokens (done once, at commit)."""
        assert self.frame_index is not None and self.token_pos is not None
        frame_offset, position = _staged_pattern(self.staged, chunk.tokens_per_frame, self.frame_index.device)
        sl = slice(self.length, self.length + self.staged)
        torch.add(frame_offset, chunk.frame_start, out=self.frame_index[sl])
        self.token_pos[sl] = position
        self.token_count[sl] = 1.0
        self.frame_host[sl] = chunk.frame_start + np.arange(self.staged) // chunk.tokens_per_frame

    def move_tokens(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy tokens at slots ``src`` into slots ``dst`` (1-D host index arrays of equal length)."""
        if len(src) == 0:
            return
        self.frame_host[dst] = self.frame_host[src]
        src, dst = to_device_index(src, self.device), to_device_index(dst, self.device)
        if self.quant is not None:
            self.quant.copy_slots(src, dst)  # codes and scales move as they are: no re-quantization
        else:
            assert self.k is not None and self.v is not None
            copy_rows_(self.k, 1, dst, select_rows(self.k, 1, src))
            copy_rows_(self.v, 1, dst, select_rows(self.v, 1, src))
        self.frame_index.index_copy_(0, dst, self.frame_index.index_select(0, src))
        self.token_pos.index_copy_(0, dst, self.token_pos.index_select(0, src))
        self.token_count.index_copy_(0, dst, self.token_count.index_select(0, src))

    # -- accounting ----------------------------------------------------------------------------------
    def live_tokens(self) -> int:
        """Tokens the history holds now (a fixed layout counts its live slots on the device: one sync)."""
        if not self.fixed:
            return self.length
        if self.token_count is None:
            return 0
        return int((self.token_count[: self.length] > 0).sum())

    def nbytes(self) -> int:
        """Bytes held by this layer's buffers (allocated capacity, not just the used part)."""
        tensors = (self.k, self.v, self.frame_index, self.token_pos, self.token_count)
        held = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return held + (0 if self.quant is None else self.quant.nbytes())

    def used_bytes(self) -> int:
        """Bytes of K/V for the committed tokens (a quantized cache: codes and scales)."""
        if self.quant is not None:
            return int(self.quant.bytes_per_token() * self.live_tokens())
        if self.k is None:
            return 0
        return 2 * self.k[:, :1].numel() * self.k.element_size() * self.live_tokens()


class LayerStack:
    """The buffers of every layer of one branch as slices of one allocation (fixed-layout caches).

    Keys and values live in ``(B, L, capacity, H, D)`` tensors, the per-token records in ``(L, capacity)`` ones;
    layer ``l``'s cache holds the views ``k[:, l]``, ``frame_index[l]``, ... (still ``(B, S, H, D)`` to every
    reader). A keeper can then work on all layers with one kernel per step instead of one per layer and step:
    TempCache's commit is ~200 small kernels a layer, which at 30 layers cost more than the work they do.
    Layers share the chunk bookkeeping (they commit the same chunks), so their lengths always agree.
    """

    def __init__(self, layers: "list[LayerKVCache]") -> None:
        self.layers = layers
        self.k: torch.Tensor | None = None  # (B, L, capacity, H, D)
        self.v: torch.Tensor | None = None
        self.frame_index: torch.Tensor | None = None  # (L, capacity)
        self.token_pos: torch.Tensor | None = None
        self.token_count: torch.Tensor | None = None
        # quantized layers (kv_dtype != "bf16"): see _allocate_quantized
        self.codes = None
        self.channel: torch.Tensor | None = None
        self.chunk_k: torch.Tensor | None = None
        self.chunk_v: torch.Tensor | None = None
        for layer in layers:
            layer.stack = self

    def allocate(self, like: torch.Tensor, capacity: int) -> None:
        """Give every layer buffers of ``capacity`` tokens (a layer's history is copied over)."""
        if self.layers[0].quant is not None:
            self._allocate_quantized(like, capacity)
            return
        b, _, h, d = like.shape
        count, device = len(self.layers), like.device
        k = like.new_empty(b, count, capacity, h, d)
        v = like.new_empty(b, count, capacity, h, d)
        frame_index = torch.empty(count, capacity, dtype=torch.int64, device=device)
        token_pos = torch.empty(count, capacity, dtype=torch.int64, device=device)
        token_count = torch.empty(count, capacity, dtype=torch.float32, device=device)
        for i, layer in enumerate(self.layers):
            layer._adopt(k[:, i], v[:, i], frame_index[i], token_pos[i], token_count[i])
        self.k, self.v, self.frame_index, self.token_pos, self.token_count = k, v, frame_index, token_pos, token_count

    def _allocate_quantized(self, like: torch.Tensor, capacity: int) -> None:
        """Quantized layers: the codes of every layer as one flat ``QuantizedKV`` over ``L * capacity`` slots
        (layer ``l``'s slot ``s`` at ``l * capacity + s``) whose smoothing factors are 1, the layers' own factors
        in ``channel`` (B, L, H, D), and the staged chunks in one (B, L, n, H, D) buffer pair. A keeper then
        writes every layer's slots with one ``write_quantized`` (keys divided by their layer's factors first:
        exact, they are powers of two). The capacity is rounded by :func:`quantized_slots` (each layer's scale rows
        then start aligned)."""
        from genkv.kernels.quant_kv import QuantizedKV, code_fields

        b, n, h, d = like.shape
        count, device = len(self.layers), like.device
        kind = self.layers[0].quant.kind
        capacity = quantized_slots(capacity)
        flat = QuantizedKV.empty(kind, b, count * capacity, h, torch.ones(b, h, d, device=device))
        flat.fill_empty()  # (int4: an empty slot's key decodes to 0, as a bf16 cache's zeros: routing pools it)
        channel = torch.ones(b, count, h, d, device=device)
        chunk_k, chunk_v = like.new_empty(b, count, n, h, d), like.new_empty(b, count, n, h, d)
        records = [torch.empty(count, capacity, dtype=dtype, device=device)
                   for dtype in (torch.int64, torch.int64, torch.float32)]
        for i, layer in enumerate(self.layers):
            cut = slice(i * capacity, (i + 1) * capacity)
            view = QuantizedKV(kind, flat.k_codes[:, cut], flat.v_codes[:, cut], flat.k_scale[:, cut],
                               flat.v_scale[:, cut], channel[:, i],
                               None if flat.v_zero is None else flat.v_zero[:, cut])
            old = layer.quant.codes
            if old is not None:  # a re-allocation: the history's codes and the layer's factors come along
                for new_field, old_field in zip(code_fields(view), code_fields(old)):
                    new_field[:, : layer.length] = old_field[:, : layer.length]
                channel[:, i] = old.key_channel_scale
            layer.quant.adopt(view, chunk_k[:, i], chunk_v[:, i])
            layer._adopt_records(capacity, *(r[i] for r in records))
        self.codes, self.channel, self.chunk_k, self.chunk_v = flat, channel, chunk_k, chunk_v
        self.frame_index, self.token_pos, self.token_count = records

    def covers(self, caches: "list[LayerKVCache]") -> bool:
        """Whether ``caches`` are exactly this stack's layers, in order, on its current buffers."""
        if len(caches) != len(self.layers) or not all(c is layer for c, layer in zip(caches, self.layers)):
            return False
        if self.codes is not None:
            step = self.codes.k_codes.shape[1] // len(self.layers)
            return all(c.buffer_address() == self.codes.k_codes[:, i * step].data_ptr() for i, c in enumerate(caches))
        return (self.k is not None
                and all(c.k is not None and c.k.data_ptr() == self.k[:, i].data_ptr() for i, c in enumerate(caches)))


class KVCacheStore:
    """All layer caches of one patched transformer, the chunk bookkeeping, and RoPE positions.

    The pipeline drives it; processors only call :meth:`layer` (and :meth:`cross_kv`)::

        store.reset()
        for chunk in chunks:
            store.begin_chunk(frame_start, num_frames, tokens_per_frame)   # sets the RoPE offset
            ...denoising forwards (each stages the chunk's K/V)...
            with store.committing():
                transformer(clean_chunk, t=0, ...)                          # the clean K/V pass
            store.commit()                                                  # keeper: append / evict / merge
    """

    def __init__(self, keeper: "CacheKeeper", num_layers: int, rope: "FrameOffsetRotaryPosEmbed | None",
                 kv_dtype: str = "bf16") -> None:
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}; got {kv_dtype!r}")
        self.kv_dtype = kv_dtype  # storage of committed history (see LayerKVCache)
        # self-attention shape, set by apply_genkv: a keeper given a budget in bytes turns it into frames with it
        self.model_shape: ModelShape | None = None
        self.fitted_budget: dict | None = None  # what budget_bytes became for the current video (cache_stats)
        self.keeper = keeper
        self.num_layers = num_layers
        # The layers this process runs (None: all). A block split (block_split.apply_block_split) runs only its
        # stage's blocks: the one allocation of a fixed-layout branch then holds only those layers' buffers.
        self.run_layers: range | None = None
        self.rope = rope
        self.active = False
        self.branch = "cond"
        self._committing = False
        self.caches: dict[str, list[LayerKVCache]] = {}
        self.cross: dict[tuple[str, int], tuple[int, torch.Tensor, torch.Tensor]] = {}
        self.prompt_version = 0
        self.chunk: ChunkInfo | None = None
        self.position_shift = 0  # frames subtracted from absolute frame indices to get RoPE positions
        self.frames_committed = 0
        self.step_index = 0  # denoising step of the current chunk (set by the pipeline; readers may use it)
        self.read_stats: dict[tuple, object] = {}  # readers' last attended density per layer (see stats())
        # Real (non-padding) prompt tokens per batch element, per CFG branch (Wan zero-pads prompts to 512);
        # host integers, so readers can decide without waiting on the GPU.
        self.prompt_lengths: dict[str, list[int]] = {}
        self.readers: tuple = ()  # the method's readers (set by apply_genkv), asked by graph_signature()
        self._commits_run: set = set()  # commit graph keys already run eagerly once this video (see commit())

    # -- lifecycle -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop every cached token: the start of a new video."""
        self._release_caches()
        self.read_stats.clear()
        self.cross.clear()
        self._commits_run.clear()
        self.chunk = None
        self.position_shift = 0
        self.frames_committed = 0
        self.prompt_version += 1
        self.active = True
        self.branch = "cond"
        self._set_rope_offset(0)

    def empty_caches(self) -> None:
        """Like :meth:`reset`, but fixed-layout caches are emptied in their own buffers (see
        :meth:`LayerKVCache.empty_in_place`) instead of dropped; growing caches are dropped as in :meth:`reset`."""
        kept = {branch: layers for branch, layers in self.caches.items() if layers and all(c.fixed for c in layers)}
        for branch in kept:  # not released by reset(): refilled in place
            del self.caches[branch]
        self.reset()
        for branch, layers in kept.items():
            for cache in layers:
                cache.empty_in_place()
            self.caches[branch] = layers

    def close(self) -> None:
        """Free the buffers and return the transformer to plain (cache-free) attention."""
        self._release_caches()
        self.cross.clear()
        self.chunk = None
        self.active = False
        self._set_rope_offset(0)

    def _release_caches(self) -> None:
        """Drop the layer caches now. A fixed layout's layers and their :class:`LayerStack` refer to each other:
        clearing the dict alone left a reference cycle that only a garbage-collector pass frees, so a whole cache
        (5.6 GiB at Wan2.1-1.3B shapes) stayed allocated into the next video, on top of that video's own."""
        for layers in self.caches.values():
            for cache in layers:
                if cache.stack is not None:
                    cache.stack.layers = []
                    cache.stack = None
        self.caches.clear()

    def new_prompt(self, prompt_lengths: dict[str, list[int]] | None = None) -> None:
        """Invalidate the per-prompt cross-attention K/V; record how many prompt tokens are real per branch."""
        self.cross.clear()
        self.prompt_version += 1
        self.prompt_lengths = {k: [int(n) for n in v] for k, v in (prompt_lengths or {}).items()}

    def _set_rope_offset(self, position: int) -> None:
        if self.rope is not None:
            self.rope.frame_offset = position

    def begin_chunk(
        self, frame_start: int, num_frames: int, tokens_per_frame: int, grid: tuple[int, int] | None = None
    ) -> ChunkInfo:
        """Announce the next chunk: validates it against the keeper and sets the chunk's RoPE position."""
        if not self.active:
            self.reset()
        budget_bytes = getattr(self.keeper, "budget_bytes", None)
        if budget_bytes is not None and not self.caches:  # a video's first chunk: the budget's frames, now known
            if self.model_shape is None:
                raise RuntimeError("budget_bytes needs the model's attention shape (set by apply_genkv)")
            cost = functools.partial(layer_cache_bytes, kv_dtype=self.kv_dtype, shape=self.model_shape)
            self.fitted_budget = self.keeper.fit_bytes(
                budget_bytes, lambda tokens, chunk_tokens: self.num_layers * cost(tokens, chunk_tokens),
                num_frames, tokens_per_frame)
        self.keeper.check_chunk(num_frames)
        position = frame_start - self.position_shift
        limit = self.keeper.rebase_limit(self)
        if limit is not None and position + num_frames > limit:
            delta = self.keeper.rebase_delta(self, frame_start, num_frames)
            if delta:
                self._shift_positions(delta)
                position = frame_start - self.position_shift
        self.chunk = ChunkInfo(frame_start, num_frames, tokens_per_frame, position, grid)
        self.step_index = 0
        self._set_rope_offset(position)
        if self.rope is not None and grid is not None and num_frames % self.rope.patch_size[0] == 0:
            # the chunk's rotary tables, in the buffers every forward of every chunk reads (CUDA graphs)
            self.rope.hold((num_frames // self.rope.patch_size[0], *grid), self.rope.freqs_cos.device)
        return self.chunk

    def _shift_positions(self, delta: int) -> None:
        """Move every re-basable cached key ``delta`` frames earlier (keeper chooses which tokens)."""
        if self.rope is None:
            raise RuntimeError("re-basing positions needs the frame-offset RoPE installed by apply_genkv")
        for layers in self.caches.values():
            for cache in layers:
                if cache.length == 0:
                    continue
                movable = self.keeper.rebasable_tokens(cache)
                if cache.quant is not None:
                    # Dequantize, rotate and re-quantize only the moved keys (values keep their codes).
                    slots = (torch.arange(cache.length, device=cache.device) if movable is None
                             else to_device_index(movable, cache.device))
                    cache.quant.rotate_keys(slots, lambda k: self.rope.shift_key_positions(k, -delta))
                    continue
                k = cache.k[:, : cache.length]
                if movable is None:
                    self.rope.shift_key_positions(k, -delta)
                else:
                    movable = to_device_index(movable, k.device)
                    sub = select_rows(k, 1, movable)
                    self.rope.shift_key_positions(sub, -delta)
                    copy_rows_(k, 1, movable, sub)
        self.position_shift += delta

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """Mark the forward inside as the chunk's clean pass (its staged K/V are the ones committed)."""
        self._committing = True
        try:
            yield
        finally:
            self._committing = False

    @contextlib.contextmanager
    def use_branch(self, name: str) -> Iterator[None]:
        """Route the forwards inside to the caches of CFG branch ``name`` (e.g. ``"uncond"``)."""
        previous, self.branch = self.branch, name
        try:
            yield
        finally:
            self.branch = previous

    def commit(self, graphs: "ChunkGraphs | None" = None) -> None:
        """Make the staged chunk history in every layer of every branch, through the keeper.

        With ``graphs`` (the rollout's :class:`~genkv.pipelines.self_forcing.step_graph.ChunkGraphs`) and a keeper
        whose commit launches the same kernels chunk after chunk (``commit_graph_key``), the commit is recorded
        as a CUDA graph the second time its key comes back (the first run is eager, so compiled pieces compile
        outside a capture) and replayed after that: a TempCache commit is ~200 small kernels a layer, which
        the host takes longer to launch than the GPU to run.
        """
        if self.chunk is None:
            raise RuntimeError("commit() without begin_chunk()")
        caches = [c for layers in self.caches.values() for c in layers if c.staged]
        for cache in caches:
            cache.label_staged(self.chunk)
            cache.tokens_seen += cache.staged
            if cache.quant is not None and not cache.fixed:
                cache.write_staged()  # quantized once, here; the keeper then moves codes (append / evict)
        key = None
        commit_graph_key = getattr(self.keeper, "commit_graph_key", None)
        if graphs is not None and caches and callable(commit_graph_key):
            key = (self.layout_signature(), "commit", commit_graph_key(self.chunk))
        if key is not None and key in self._commits_run:
            chunk, device = self.chunk, caches[0].device

            def recordable_commit(frame_start: torch.Tensor) -> torch.Tensor:
                self.keeper.commit_layers(caches, chunk, frame_start)
                return frame_start + 0  # ChunkGraphs records a function with a tensor result

            graphs.run(key, recordable_commit, torch.full((), chunk.frame_start, dtype=torch.int64, device=device))
        else:
            self.keeper.commit_layers(caches, self.chunk)
            if key is not None:
                self._commits_run.add(key)
        for cache in caches:
            cache.staged = 0
        self.frames_committed = self.chunk.frame_start + self.chunk.num_frames

    # -- CUDA graphs ---------------------------------------------------------------------------------
    def graph_blocker(self) -> str | None:
        """Why no forward of this method can be recorded as a CUDA graph, or None if some can."""
        for reader in self.readers:
            if not callable(getattr(reader, "graph_signature", None)):
                return (f"reader {type(reader).__name__} does not say which forwards a graph may replay "
                        "(give it a graph_signature(store) method)")
        return None

    def layout_signature(self) -> tuple:
        """The buffers forwards read and write, and the shapes they see: (branch, layer, history length,
        capacity, key buffer address) of every layer cache. Constant over a video for a fixed-layout keeper;
        for the others it changes with every chunk until their bound is reached."""
        return tuple(
            (branch, i, c.length, c.capacity, c.buffer_address())
            for branch, layers in sorted(self.caches.items())
            for i, c in enumerate(layers)
        )

    def graph_signature(self) -> tuple | None:
        """What the next forward does, as far as replaying a recorded one goes, or None if it must run eagerly.

        Two forwards with equal signatures launch the same kernels on the same buffers: the same cache layout
        (:meth:`layout_signature`, the first element), the same prompt, and the same path through every
        reader. The forward that allocates the caches or projects a prompt's K/V is never recorded; readers
        return None for a forward whose host work a graph cannot hold. A signature does not name the chunk:
        what differs between chunks lives in buffers (latents, timestep, rotary tables held by
        :meth:`begin_chunk`, the cache, routes), so with a fixed layout one graph serves every chunk.
        """
        if self.chunk is None or not self.caches:  # the video's first forward allocates the caches
            return None
        if any(c.length + self.chunk.num_tokens > c.capacity for layers in self.caches.values() for c in layers):
            return None  # this forward grows a cache: new buffers, with the history copied from the old ones
        parts = []
        for reader in self.readers:
            signature = getattr(reader, "graph_signature", None)  # none: see graph_blocker()
            part = signature(self) if callable(signature) else None
            if part is None:
                return None
            parts.append(part)
        return (self.layout_signature(), self.prompt_version, len(self.cross), self.chunk.num_tokens, *parts)

    def replayed(self) -> None:
        """A recorded forward was replayed: redo its host-side effect, the staged chunk in every layer cache."""
        if self.chunk is not None:
            for layers in self.caches.values():
                for cache in layers:
                    cache.staged = self.chunk.num_tokens

    # -- what processors call ------------------------------------------------------------------------
    def layer(self, index: int) -> LayerKVCache:
        layers = self.caches.get(self.branch)
        if layers is None:
            limit = self.keeper.max_history_tokens(self.chunk) if self.chunk is not None else None
            fixed = self.keeper.fixed_layout and limit is not None
            layers = [LayerKVCache(limit, fixed, kv_dtype=self.kv_dtype) for _ in range(self.num_layers)]
            if fixed:  # one allocation for the branch: keepers may then commit every layer at once
                LayerStack([layers[i] for i in (self.run_layers or range(self.num_layers))])
            self.caches[self.branch] = layers
        return layers[index]

    def cross_kv(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self.cross.get((self.branch, index))
        if entry is not None and entry[0] == self.prompt_version:
            return entry[1], entry[2]
        return None

    def store_cross_kv(self, index: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.cross[(self.branch, index)] = (self.prompt_version, key, value)

    # -- accounting ----------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes held by every layer cache (cheap, no device sync: for progress displays)."""
        return sum(c.nbytes() for layers in self.caches.values() for c in layers)

    def stats(self) -> dict:
        """Tokens and bytes held per layer and in total (see :func:`genkv.cache_stats`)."""
        per_layer = []
        total_bytes = total_used = total_tokens = total_seen = 0
        for branch, layers in sorted(self.caches.items()):
            for i, cache in enumerate(layers):
                row = {
                    "branch": branch,
                    "layer": i,
                    "tokens": cache.live_tokens(),
                    "tokens_seen": cache.tokens_seen,
                    "capacity": cache.capacity,
                    "bytes": cache.nbytes(),
                    "used_bytes": cache.used_bytes(),
                    **{k: int(v) if isinstance(v, torch.Tensor) else v for k, v in cache.info.items()},
                }
                per_layer.append(row)
                total_bytes += row["bytes"]
                total_used += row["used_bytes"]
                total_tokens += row["tokens"]
                total_seen += row["tokens_seen"]
        cross_bytes = sum(k.numel() * k.element_size() * 2 for _, k, _ in self.cross.values())
        densities = {}
        for (kind, _layer), value in self.read_stats.items():
            densities.setdefault(kind, []).append(_density(value, self))
        return {
            "method": self.keeper.method_name,
            "frames_committed": self.frames_committed,
            "position_shift": self.position_shift,
            "tokens": total_tokens,
            "tokens_seen": total_seen,
            "bytes": total_bytes,
            "used_bytes": total_used,
            "kv_dtype": self.kv_dtype,
            **({"budget": self.fitted_budget} if self.fitted_budget is not None else {}),
            "cross_bytes": cross_bytes,
            # Fraction of the keys (self) / prompt rows (cross) the last call of each layer attended, averaged.
            **{f"{kind}": sum(v) / len(v) for kind, v in densities.items()},
            "layers": per_layer,
        }


def _density(value: object, store: "KVCacheStore") -> float:
    """Fraction of the occupied keys a reader attended: a float as recorded, or for a block-sparse call
    ``(counts (B, H, nQ), key blocks, indices (B, H, nQ, W), empty (n_blocks,) bool or None)``: per query block,
    the listed blocks that hold a live key over the blocks that do (a fixed-layout cache's empty budget slots are
    neither read nor unread), averaged."""
    if not isinstance(value, tuple):
        return float(value)
    counts, n_blocks, indices, empty = (*value, None, None)[:4]
    if indices is None or empty is None:
        return min(1.0, float(counts.float().mean()) / max(1, n_blocks))
    occupied = ~empty.bool()
    listed = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None].long()
    read = (listed & occupied[indices.long().clamp(0, occupied.numel() - 1)]).sum(-1)
    return min(1.0, float(read.float().mean()) / max(1, int(occupied.sum())))
