"""A quantized KV history (issue 22): committed tokens stored as fp8 / int8 / int4 codes plus small scales.

The history of one layer is quantized once, when a chunk is committed; the chunk being denoised stays in full
precision. The attention kernels (``block_sparse.py``, ``gather.py``) and the routing summaries
(:func:`pool_quantized_blocks`) read the codes directly and dequantize tile by tile: no full-precision copy of
the history is ever made.

Format, per (batch, token, head), head_dim ``D``:

* ``fp8``: ``float8_e4m3fn`` codes, one fp16 scale (amax / 448) for the key and one for the value.
* ``int8``: symmetric int8 codes in [-127, 127], one fp16 scale (amax / 127) each.
* ``int4``: two 4-bit codes per uint8 byte, ``(B, S, H, D // 2)``; byte ``j`` holds channel ``j`` in its low
  nibble and channel ``D / 2 + j`` in its high nibble (so the kernel reads each half of a head, and of q, K, V
  and the output, as contiguous rows). Keys are symmetric, stored offset by 8 (nibble ``u`` means ``u - 8`` in
  [-7, 7]); values are asymmetric: nibble ``u`` means ``u * scale + zero`` with ``zero`` the token's minimum
  (fp16), the span ``max - zero`` at least ``|zero| * 15 / 1024`` (:data:`ZERO_STEPS`: binding only where a
  token's values sit far from 0 against their spread).

Keys are additionally divided, before the per-token scale, by a per-(batch, head, channel) smoothing factor
``key_channel_scale`` (B, H, D) fixed for the layer (computed from the first keys quantized): outlier channels
would otherwise set every token's scale and leave the other channels a few levels (KIVI / SmoothQuant). The
factors are powers of two (dividing and multiplying by them is exact) and equal within a RoPE pair.

Scales and zero points hold fp16 values, stored as fp16 (default) or, with ``GENKV_KV_SCALES=fp32``, in fp32 (see
:data:`SCALE_DTYPE`: the same values, 4-byte loads for the kernel). They are (B, S, H) tensors, stored with each
(batch, head)'s tokens contiguous (a transposed view, :data:`SCALE_LAYOUT` ``heads``, the default), which is what the
kernel reads a tile of at once, or, with ``GENKV_KV_SCALE_LAYOUT=tokens``, as plain (B, S, H) storage. Bytes per
(token, head) at D = 128, keys + values, scales included (bf16: 512): fp8 and int8: 2 * (128 + 2) = 260 (0.51x);
int4: (64 + 2) + (64 + 2 + 2) = 134 (0.26x); with fp32 storage 264 (0.52x) and 140 (0.27x).

Measured relative round-trip error ``|x - x̂| / |x|`` (4096 tokens, 4 heads, D = 128; keys: Gaussian with four
RoPE pairs per head scaled 10-30x, a per-channel offset, then RoPE; values: Gaussian):

============  =================  ===================================  ================================
kind          keys, per-token    keys, per-token + pair smoothing     values
============  =================  ===================================  ================================
fp8           0.0184             0.0184 (alpha 0.5), 0.0259 (1.0)     0.0257
int8          0.0182             0.0062 (alpha 0.5), 0.0072 (1.0)     0.0065
int4          0.2101             0.1115 (alpha 0.5), 0.1316 (1.0)     0.1173 sym, 0.0998 asym
============  =================  ===================================  ================================

So the smoothing factor is ``(pair amax / median pair amax) ** 0.5`` rounded to a power of two (alpha 0.5: it
halves the int4 key error and cuts int8's by 3x; fp8, a floating format, is indifferent and uses the same scheme
for one kernel path). Int4 values use a zero point: 15% lower error on centred Gaussians, 38% lower (0.090 ->
0.056) when tokens carry an offset; int8 and fp8 values are symmetric (their error is already small). The
attention logits of int4 keys move by 0.113 relative (0.211 without smoothing), of int8 keys by 0.0063 (0.018).
Asymmetric int4 keys would reach 0.076 on the same keys (the per-channel offset rotates with position); left for
later: it costs a rank-1 logit term per tile.

Example:
    >>> import torch
    >>> k, v = torch.randn(1, 40, 2, 64), torch.randn(1, 40, 2, 64)
    >>> hist = quantize_kv(k, v, "int4")
    >>> tuple(hist.k_codes.shape), hist.k_codes.dtype, hist.nbytes / (2 * k.numel() * 2) < 0.3
    ((1, 40, 2, 32), torch.uint8, True)
    >>> k_hat, v_hat = dequantize(hist)
    >>> bool((k_hat - k).norm() < 0.2 * k.norm())
    True
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from genkv.cache import copy_rows_, select_rows

KINDS = ("fp8", "int8", "int4")
#: Each kind's id in the Triton kernels' constexpr arguments (block_sparse, quant_write, quant_pool).
KIND_IDS = {"fp8": 1, "int8": 2, "int4": 3}
_QMAX = {"fp8": 448.0, "int8": 127.0, "int4": 7.0}
_FP16_MAX = 65504.0
_SMOOTHING_ALPHA = 0.5
_SMOOTHING_RANGE = 6  # factors in [2^-6, 2^6]: fp8 codes (<= 448) times 2^6 stay inside fp16 in the kernel


def _scale_storage(value: str) -> torch.dtype:
    if value not in ("fp16", "fp32"):
        raise ValueError(f"GENKV_KV_SCALES={value!r}: use fp16 (the default) or fp32")
    return torch.float32 if value == "fp32" else torch.float16


#: What the per-token scales and int4 zero points are stored in (env ``GENKV_KV_SCALES``, read at import): ``fp16``
#: (default) or ``fp32``. Their values are fp16 either way (rounded to fp16, so codes, dequantized keys and values
#: and attention are bit-identical); fp32 storage costs 2 bytes more per scale (int4: 140 bytes per token and head
#: instead of 134, 0.273x bf16; int8 / fp8: 264, 0.516x) but lets the kernel read a tile's scale columns with 4-byte
#: asynchronous copies: 2-byte elements at a stride of H cannot be, and sm_90 code of the kernel's whole-history
#: loops issues them as scalar global loads in the loop, 96 a thread per 128-key int4 block, 64 int8
#: (``eval/kernel_resources.py --scales fp16 fp32``, 2026-12-06). Timed on an H100 all the same (``bench_quant_kv.py
#: --scales fp16 fp32``, Wan shapes, split read), fp32 storage is slower for int4 (fastar's lists 1.097 ms vs 1.001)
#: and within 3% either way for int8, so fp16 stays the default.
SCALE_DTYPE: torch.dtype = _scale_storage(os.environ.get("GENKV_KV_SCALES", "fp16"))

SCALE_LAYOUTS = ("tokens", "heads")


def _scale_layout(value: str) -> str:
    if value not in SCALE_LAYOUTS:
        raise ValueError(f"GENKV_KV_SCALE_LAYOUT={value!r}: use heads (the default) or tokens")
    return value


#: How the per-token scales and int4 zero points lie in memory (env ``GENKV_KV_SCALE_LAYOUT``, read at import). Their
#: shape is (B, S, H) either way, and every reader takes strides, so the values and the attention are the same bit for
#: bit. ``tokens``: plain (B, S, H) storage, a kernel tile's scales H elements apart, which sm_90 code loads
#: as scalar, synchronous 2-byte loads inside the whole-history loop (36 a block for int4's launch, 64 for int8's).
#: ``heads`` (default since 2026-12-08): each (batch, head)'s scales contiguous over tokens, (B, H, S) storage seen through a transposed view,
#: slots padded to a multiple of :data:`SCALE_ALIGN`; a tile's scale columns are then one contiguous run that the
#: kernel's software pipeline copies asynchronously a tile ahead, and the int4 whole-history loop shrinks from 1298 to
#: 1177 SASS instructions, with 4 synchronous loads instead of 36 (int8: 1387 -> 1273, 64 -> 0;
#: ``eval/kernel_resources.py --scale-layout``, 2026-12-08). Timed on an H100 (``bench_quant_kv.py --scale-layouts
#: heads tokens``, same process, Wan shapes): the int8 read 8-11% faster, int4's within 1.5% either way; ``fastar
#: --compile`` over 480 frames, int8 1.020x and int4 1.046x the chunk time of bf16 on the Triton kernel (int4 ``tokens``
#: 1.051x). A quantized
#: cache then rounds its capacity to SCALE_ALIGN slots (``genkv.cache.quantized_slots``).
SCALE_LAYOUT: str = _scale_layout(os.environ.get("GENKV_KV_SCALE_LAYOUT", "heads"))
#: Slots of a ``heads`` scale buffer are padded to a multiple of this (so each (batch, head) row starts 16-byte
#: aligned, what the kernel's vector copies need; at most 15 unused slots a row, not counted in ``nbytes``).
SCALE_ALIGN = 16


def aligned_slots(slots: int) -> int:
    """``slots`` rounded up to a multiple of :data:`SCALE_ALIGN` (a ``heads`` scale row's length, so the next row
    starts aligned).

    Example:
        >>> aligned_slots(40), aligned_slots(48)
        (48, 48)
    """
    return -(-slots // SCALE_ALIGN) * SCALE_ALIGN


def scale_buffer(batch: int, slots: int, heads: int, *, fill: float = 1.0, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, layout: str | None = None) -> torch.Tensor:
    """A (B, ``slots``, H) tensor for per-token scales or zero points, filled with ``fill``, in ``layout`` (default
    :data:`SCALE_LAYOUT`) and ``dtype`` (default :data:`SCALE_DTYPE`).

    Example:
        >>> t = scale_buffer(1, 40, 3, layout="heads")
        >>> tuple(t.shape), t.stride()
        ((1, 40, 3), (144, 1, 48))
        >>> scale_buffer(1, 40, 3, layout="tokens").stride()
        (120, 3, 1)
    """
    layout = _scale_layout(layout or SCALE_LAYOUT)
    dtype = dtype or SCALE_DTYPE
    if layout == "tokens":
        return torch.full((batch, slots, heads), fill, dtype=dtype, device=device)
    return torch.full((batch, heads, aligned_slots(slots)), fill, dtype=dtype, device=device)[:, :, :slots].transpose(1, 2)


def scale_layout_of(t: torch.Tensor) -> str:
    """``heads`` where a (B, S, H) scale tensor's tokens are contiguous (slot stride 1, more than one slot), else
    ``tokens``. A tensor with one head or one slot can be either: it reads as ``tokens`` unless its slot stride is 1.

    Example:
        >>> scale_layout_of(scale_buffer(1, 40, 3, layout="heads")), scale_layout_of(torch.ones(1, 40, 3))
        ('heads', 'tokens')
    """
    return "heads" if t.stride(1) == 1 and t.shape[1] > 1 else "tokens"


def _is_laid_out(t: torch.Tensor, layout: str) -> bool:
    """Whether ``t`` (B, S, H) is stored as :func:`scale_buffer` lays out ``layout``: ``tokens`` contiguous;
    ``heads`` slot stride 1, each (batch, head) row a whole number of :data:`SCALE_ALIGN` slots from the last
    and starting on an aligned address."""
    if layout == "tokens":
        return t.is_contiguous()
    b, s, h = t.shape
    row = t.stride(2)
    return (t.stride(1) == 1 and row >= s and row % SCALE_ALIGN == 0 and t.stride(0) == h * row
            and t.data_ptr() % (SCALE_ALIGN * t.element_size()) == 0)


def _laid_out(t: torch.Tensor | None, layout: str | None = None, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> torch.Tensor | None:
    """Scale tensor ``t`` (B, S, H) in ``layout`` / ``dtype`` / on ``device`` (defaults: :data:`SCALE_LAYOUT`,
    ``t``'s dtype and device): ``t`` itself where it already is, else a copy. One copy at most (a move to
    another device and a change of layout or dtype happen together)."""
    if t is None:
        return None
    layout = _scale_layout(layout or SCALE_LAYOUT)
    dtype = dtype or t.dtype
    device = t.device if device is None else torch.device(device)
    if dtype == t.dtype and device == t.device and _is_laid_out(t, layout):
        return t
    out = scale_buffer(t.shape[0], t.shape[1], t.shape[2], dtype=dtype, device=device, layout=layout)
    return out.copy_(t)


@dataclass
class QuantizedKV:
    """A quantized history of ``length`` tokens for one layer (see the module docstring for the format).

    ``k_codes`` / ``v_codes``: (B, S_h, H, D) fp8 / int8, or (B, S_h, H, D // 2) uint8 for int4;
    ``k_scale`` / ``v_scale``: (B, S_h, H) fp16 values (stored as :data:`SCALE_DTYPE`); ``v_zero``: likewise for
    int4 values, else None;
    ``key_channel_scale``: (B, H, D) fp32 smoothing factors (powers of two, equal within a RoPE pair).
    Views (``prefix``) are fine everywhere: readers take strides.
    """

    kind: str
    k_codes: torch.Tensor
    v_codes: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    key_channel_scale: torch.Tensor
    v_zero: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.k_codes.shape[1]

    @property
    def head_dim(self) -> int:
        return self.key_channel_scale.shape[-1]

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales, zero points and the smoothing factors."""
        parts = (self.k_codes, self.v_codes, self.k_scale, self.v_scale, self.key_channel_scale, self.v_zero)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def prefix(self, length: int) -> "QuantizedKV":
        """The first ``length`` slots, as views (what a cache with spare capacity hands the kernels)."""
        cut = {name: getattr(self, name)[:, :length] for name in ("k_codes", "v_codes", "k_scale", "v_scale")}
        return replace(self, v_zero=None if self.v_zero is None else self.v_zero[:, :length], **cut)

    def to(self, device: torch.device | str) -> "QuantizedKV":
        """The same history on ``device`` (every tensor moved; the kind kept).

        Example:
            >>> k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
            >>> quantize_kv(k, v, "int8").to("cpu").k_codes.dtype
            torch.int8
        """
        scales = ("k_scale", "v_scale", "v_zero")  # kept in their layout (.to would make them contiguous)
        moved = {name: (_laid_out(value, scale_layout_of(value), device=device) if name in scales
                        else value.to(device))
                 for name, value in vars(self).items() if isinstance(value, torch.Tensor)}
        return replace(self, **moved)

    def fill_empty(self) -> None:
        """Every slot as an empty one of a layer stack: keys decoding to 0 (int4: nibble 8; routing pools empty
        slots like a bf16 cache's zeros), value codes and int4 zero points 0, scales 1."""
        self.k_codes.view(torch.uint8).fill_(0x88 if self.kind == "int4" else 0)
        self.v_codes.view(torch.uint8).zero_()
        self.k_scale.fill_(1.0)
        self.v_scale.fill_(1.0)
        if self.v_zero is not None:
            self.v_zero.zero_()

    @classmethod
    def empty(cls, kind: str, batch: int, capacity: int, heads: int, key_channel_scale: torch.Tensor) -> "QuantizedKV":
        """A zeroed history of ``capacity`` slots (on ``key_channel_scale``'s device) to fill with
        :func:`write_quantized`."""
        _check_kind(kind)
        dim = key_channel_scale.shape[-1]
        device = key_channel_scale.device
        code_shape = (batch, capacity, heads, dim // 2 if kind == "int4" else dim)
        code_dtype = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.uint8}[kind]
        codes = [torch.zeros(code_shape, dtype=code_dtype, device=device) for _ in range(2)]
        scales = [scale_buffer(batch, capacity, heads, device=device) for _ in range(2)]
        zero = scale_buffer(batch, capacity, heads, fill=0.0, device=device) if kind == "int4" else None
        channel = key_channel_scale.float().expand(batch, heads, dim).contiguous()
        return cls(kind, codes[0], codes[1], scales[0], scales[1], channel, zero)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kv kind {kind!r} is not one of {', '.join(KINDS)}")


def key_channel_scales(k: torch.Tensor) -> torch.Tensor:
    """Smoothing factors (B, H, D) fp32 for keys (B, S, H, D) after RoPE: a power of two per RoPE pair.

    RoPE rotates channel pairs (2i, 2i+1) by a position-dependent angle. Both channels of a pair get the same
    factor, computed from the pair's norm (which the rotation preserves), so the smoothing commutes with any
    later rotation of stored keys.

    Example:
        >>> k = torch.ones(1, 64, 1, 8)
        >>> k[..., 2:4] *= 50  # an outlier pair: sqrt(50) rounds to 8
        >>> key_channel_scales(k)[0, 0].tolist()
        [1.0, 1.0, 8.0, 8.0, 1.0, 1.0, 1.0, 1.0]
    """
    if k.shape[1] == 0:  # no keys to measure: no smoothing
        return k.new_ones(k.shape[0], k.shape[2], k.shape[3], dtype=torch.float32)
    pair = k.float().unflatten(-1, (-1, 2)).norm(dim=-1).amax(1)  # (B, H, D/2)
    median = pair.median(-1, keepdim=True).values.clamp_min(1e-30)
    exponent = (_SMOOTHING_ALPHA * torch.log2(pair.clamp_min(1e-30) / median)).round()
    factor = torch.exp2(exponent.clamp(-_SMOOTHING_RANGE, _SMOOTHING_RANGE))
    return factor.repeat_interleave(2, dim=-1)


def _scale_for(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Scale ``amax / qmax`` rounded to fp16 (stored as :data:`SCALE_DTYPE`); 1 where it would be 0 (all-zero or
    underflowing rows: every code is 0)."""
    scale = (amax / qmax).clamp(max=_FP16_MAX).to(torch.float16)
    return torch.where(scale == 0, torch.ones_like(scale), scale).to(SCALE_DTYPE)


def _pack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """(..., D) uint8 in [0, 15] -> (..., D // 2): channel j in the low nibble, D / 2 + j in the high one."""
    low, high = nibbles.chunk(2, dim=-1)
    return low | (high << 4)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_int4`: (..., D // 2) uint8 -> (..., D) uint8 nibbles."""
    return torch.cat((packed & 15, packed >> 4), dim=-1)


def _quantize_symmetric(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) symmetric codes and fp16 scales of fp32 ``x``."""
    scale = _scale_for(x.abs().amax(-1), _QMAX[kind])
    scaled = x / scale.float()[..., None]
    if kind == "fp8":
        return scaled.clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale
    codes = scaled.round().clamp(-_QMAX[kind], _QMAX[kind])
    if kind == "int8":
        return codes.to(torch.int8), scale
    return _pack_int4((codes + 8).to(torch.uint8)), scale


#: An int4 value row's span is at least ``|zero| * 15 / ZERO_STEPS``: its zero point lies at most ~ZERO_STEPS steps
#: from 0, so ``zero / scale`` is an fp16 number of unit spacing or finer and the kernel can add it to the codes in
#: fp16 (``int4_zero_in_v``). Only rows whose values sit far from 0 against their spread (none in attention values
#: of real models, whose channels straddle 0) get coarser steps, at most ``|zero| / 2048`` of error, 0.05%.
ZERO_STEPS = 1024.0


def _quantize_int4_asymmetric(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row asymmetric int4: nibble ``u`` means ``u * scale + zero``, ``zero`` the row minimum in fp16, the
    span ``max - zero`` floored at ``|zero| * 15 / ZERO_STEPS``."""
    zero = x.amin(-1).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).to(SCALE_DTYPE)
    low = zero.float()
    scale = _scale_for(torch.maximum(x.amax(-1) - low, low.abs() * (15.0 / ZERO_STEPS)), 15.0)
    codes = ((x - low[..., None]) / scale.float()[..., None]).round().clamp(0, 15)
    return _pack_int4(codes.to(torch.uint8)), scale, zero


def _quantize_tokens(hist_kind: str, channel: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Codes and scales of (B, n, H, D) tokens: (k_codes, k_scale, v_codes, v_scale, v_zero or None)."""
    return _quantize_smoothed(hist_kind, k.float() / channel[:, None], v)  # exact: powers of two


def _quantize_smoothed(hist_kind: str, k: torch.Tensor, v: torch.Tensor):
    """:func:`_quantize_tokens` of keys already divided by their smoothing factors."""
    k_codes, k_scale = _quantize_symmetric(k, hist_kind)
    if hist_kind == "int4":
        v_codes, v_scale, v_zero = _quantize_int4_asymmetric(v.float())
    else:
        (v_codes, v_scale), v_zero = _quantize_symmetric(v.float(), hist_kind), None
    return k_codes, k_scale, v_codes, v_scale, v_zero


def quantize_kv(k: torch.Tensor, v: torch.Tensor, kind: str,
                key_channel_scale: torch.Tensor | None = None) -> QuantizedKV:
    """Quantize keys (after RoPE) and values (B, S, H, D) into a new :class:`QuantizedKV`.

    ``key_channel_scale`` (B, H, D): the layer's smoothing factors; by default computed from these keys
    (:func:`key_channel_scales`). Later tokens of the layer go in with :func:`write_quantized`, which reuses them.

    Example:
        >>> k, v = torch.randn(2, 10, 3, 16), torch.randn(2, 10, 3, 16)
        >>> hist = quantize_kv(k, v, "int8")
        >>> hist.length, hist.k_codes.dtype, tuple(hist.k_scale.shape)
        (10, torch.int8, (2, 10, 3))
    """
    _check_kind(kind)
    if k.shape != v.shape or k.dim() != 4 or k.shape[-1] % 2:
        raise ValueError(f"k and v must be (B, S, H, D) with even D; got {tuple(k.shape)}, {tuple(v.shape)}")
    channel = key_channel_scales(k) if key_channel_scale is None else key_channel_scale.float()
    channel = channel.expand(k.shape[0], k.shape[2], k.shape[3]).contiguous()
    k_codes, k_scale, v_codes, v_scale, v_zero = _quantize_tokens(kind, channel, k, v)
    return QuantizedKV(kind, k_codes, v_codes, _laid_out(k_scale), _laid_out(v_scale), channel, _laid_out(v_zero))


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 codes seen as uint8 (index_copy_ has no float8 kernels); other tensors unchanged."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _fields(hist: QuantizedKV) -> list[torch.Tensor]:
    return [t for t in (hist.k_codes, hist.k_scale, hist.v_codes, hist.v_scale, hist.v_zero) if t is not None]


def code_fields(hist: QuantizedKV) -> list[torch.Tensor]:
    """Every per-slot tensor of ``hist`` (codes, scales, zero points; slots on dim 1) as raw views (fp8 as
    uint8), in a fixed order: what copies between two histories of one kind zip over.

    Example:
        >>> hist = quantize_kv(torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16), "fp8")
        >>> [t.dtype for t in code_fields(hist)][:2]
        [torch.uint8, torch.float16]
    """
    return [_as_bytes(t) for t in _fields(hist)]


def with_scale_storage(hist: QuantizedKV, dtype: torch.dtype) -> QuantizedKV:
    """``hist`` with its scales and zero points stored as ``dtype`` (fp16 / fp32; codes shared, and scales already so
    stored too): the same fp16 values either way (see :data:`SCALE_DTYPE`), so an A/B of the two storages in one
    process attends bit for bit alike.

    Example:
        >>> hist = quantize_kv(torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16), "int4")
        >>> wide = with_scale_storage(hist, torch.float32)
        >>> wide.v_zero.dtype, torch.equal(wide.k_scale.half(), hist.k_scale), wide.k_codes is hist.k_codes
        (torch.float32, True, True)
    """
    def stored(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else _laid_out(t, scale_layout_of(t), dtype=dtype)

    return replace(hist, k_scale=stored(hist.k_scale), v_scale=stored(hist.v_scale), v_zero=stored(hist.v_zero))


def with_scale_layout(hist: QuantizedKV, layout: str) -> QuantizedKV:
    """``hist`` with its scales and zero points copied into ``layout`` (``heads`` / ``tokens``, see
    :data:`SCALE_LAYOUT`; codes shared, and scales already so laid out too): the same values, so an A/B of the two
    layouts in one process attends bit for bit alike.

    Example:
        >>> hist = quantize_kv(torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16), "int4")
        >>> flat = with_scale_layout(hist, "tokens")
        >>> flat.k_scale.stride(), torch.equal(flat.v_zero, hist.v_zero), flat.k_codes is hist.k_codes
        ((8, 2, 1), True, True)
    """
    return replace(hist, k_scale=_laid_out(hist.k_scale, layout), v_scale=_laid_out(hist.v_scale, layout),
                   v_zero=_laid_out(hist.v_zero, layout))


def select_slots(hist: QuantizedKV, slots: torch.Tensor) -> QuantizedKV:
    """The slots ``slots`` (1-D int64) of ``hist`` as a new ``QuantizedKV`` (codes and scales gathered, nothing
    decoded; the smoothing factors shared), e.g. to dequantize a few slots only.

    Example:
        >>> hist = quantize_kv(torch.randn(1, 6, 1, 16), torch.randn(1, 6, 1, 16), "int4")
        >>> picked = select_slots(hist, torch.tensor([4, 1]))
        >>> torch.equal(dequantize(picked)[1][:, 0], dequantize(hist)[1][:, 4])
        True
    """
    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else select_rows(_as_bytes(t), 1, slots).view(t.dtype)

    return replace(hist, k_codes=rows(hist.k_codes), v_codes=rows(hist.v_codes), k_scale=rows(hist.k_scale),
                   v_scale=rows(hist.v_scale), v_zero=rows(hist.v_zero))


def write_quantized(hist: QuantizedKV, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Quantize tokens (B, n, H, D) into ``slots`` (1-D int64, n entries) of ``hist``, in place: a commit.

    No host sync, shapes fixed by ``n``, so it can be captured in a CUDA graph (one Triton kernel on CUDA:
    :func:`genkv.kernels.quant_write.write_rows`). Uses the history's smoothing factors; equals
    :func:`quantize_kv` of the same tokens with those factors.

    Example:
        >>> k, v = torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16)
        >>> hist = QuantizedKV.empty("fp8", 1, 8, 2, key_channel_scales(k))
        >>> write_quantized(hist, torch.tensor([5, 1, 2, 3, 4, 0]), k, v)
        >>> bool((dequantize(hist)[0][:, 5] - k[:, 0]).abs().max() < 0.1)
        True
    """
    from .quant_write import write_rows  # one Triton pass on CUDA, torch ops elsewhere (same codes)

    write_rows(hist, slots, k[:, None], v[:, None], hist.key_channel_scale[:, None])


def copy_slots(hist: QuantizedKV, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Move tokens from slots ``src`` to slots ``dst`` (1-D int64) without re-quantizing (codes and scales).

    The source rows are gathered first, so overlapping ``src`` / ``dst`` (a compaction) read the old rows.

    Example:
        >>> hist = quantize_kv(torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16), "int4")
        >>> copy_slots(hist, torch.tensor([3]), torch.tensor([0]))
        >>> torch.equal(hist.k_codes[:, 0], hist.k_codes[:, 3])
        True
    """
    for field in _fields(hist):
        raw = _as_bytes(field)
        copy_rows_(raw, 1, dst, select_rows(raw, 1, src))


def _dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, kind: str,
                      signed_int4: bool) -> torch.Tensor:
    """fp32 values of codes (B, n, H, D or D/2) with per-row scales (and int4 zero points)."""
    if kind == "int4":
        values = _unpack_int4(codes).float() - (8.0 if signed_int4 else 0.0)
    else:
        values = codes.float()
    values = values * scale.float()[..., None]
    return values if zero is None else values + zero.float()[..., None]


def dequantize_keys(hist: QuantizedKV, start: int = 0, end: int | None = None) -> torch.Tensor:
    """fp32 keys (B, end - start, H, D) of slots [start, end), smoothing undone (no values: routing's read).

    Example:
        >>> k = torch.randn(1, 8, 1, 16)
        >>> bool((dequantize_keys(quantize_kv(k, k, "fp8"), 0, 4) - k[:, :4]).abs().max() < 0.1 * k.abs().max())
        True
    """
    end = hist.length if end is None else end
    keys = _dequantize_codes(hist.k_codes[:, start:end], hist.k_scale[:, start:end], None, hist.kind, True)
    return keys * hist.key_channel_scale[:, None]


def dequantize(hist: QuantizedKV, start: int = 0, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (keys, values) (B, end - start, H, D) of slots [start, end): for references, tests and the CPU
    path's gathered blocks. Keep ranges small on large histories: this is a full-precision copy of them.

    Example:
        >>> k, v = torch.randn(1, 8, 1, 16), torch.randn(1, 8, 1, 16)
        >>> k_hat, v_hat = dequantize(quantize_kv(k, v, "int8"), 2, 5)
        >>> tuple(k_hat.shape), bool((v_hat - v[:, 2:5]).abs().max() < 0.05)
        ((1, 3, 1, 16), True)
    """
    return dequantize_keys(hist, start, end), dequantize_values(hist, start, end)


def dequantize_values(hist: QuantizedKV, start: int = 0, end: int | None = None) -> torch.Tensor:
    """fp32 values (B, end - start, H, D) of slots [start, end) (no keys: TempCache's merges read only these).

    Example:
        >>> v = torch.randn(1, 8, 1, 16)
        >>> bool((dequantize_values(quantize_kv(v, v, "int8"), 0, 4) - v[:, :4]).abs().max() < 0.05)
        True
    """
    end = hist.length if end is None else end
    zero = None if hist.v_zero is None else hist.v_zero[:, start:end]
    return _dequantize_codes(hist.v_codes[:, start:end], hist.v_scale[:, start:end], zero, hist.kind, False)


def pool_quantized_blocks(hist: QuantizedKV, block_n: int, *, current_keys: torch.Tensor | None = None,
                          history_summary: torch.Tensor | None = None, chunk_tokens: int = 8192) -> torch.Tensor:
    """Block means (B, H, n_blocks, D) fp32 of the keys [history, current_keys] (what ``pool_blocks`` gives for
    the full-precision sequence), for ``route_blocks(..., key_summary=...)``.

    Whole blocks are pooled from the codes (:func:`genkv.kernels.quant_pool.pool_code_blocks`: one Triton pass on
    CUDA; elsewhere keys dequantized ``chunk_tokens`` at a time, never all at once). The block that
    straddles the end of the history averages its history tail and the first current keys together; a ragged
    last block averages only its real keys. ``current_keys`` (B, S_cur, H, D) may be None: the history alone.
    ``history_summary``: this function's result for the history alone, kept from the commit (history keys do not
    change while a chunk is denoised): its whole blocks are reused, so a denoising step pools only the
    straddling block's history tail and the current chunk.

    Example:
        >>> k, v, cur = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16), torch.randn(1, 30, 2, 16)
        >>> hist = quantize_kv(k, v, "int8")
        >>> pooled = pool_quantized_blocks(hist, 16, current_keys=cur)
        >>> tuple(pooled.shape)
        (1, 2, 5, 16)
        >>> bool((pooled[:, :, 3] - cur[:, 8:24].mean(1)).abs().max() < 1e-6)
        True
        >>> at_commit = pool_quantized_blocks(hist, 16)
        >>> torch.equal(pool_quantized_blocks(hist, 16, current_keys=cur, history_summary=at_commit), pooled)
        True
    """
    n_full, tail = divmod(hist.length, block_n)
    parts = []
    if history_summary is not None:
        parts.append(history_summary[:, :, :n_full].permute(0, 2, 1, 3))
    elif n_full:  # one Triton pass over the codes on CUDA (quant_pool), slabs of dequantized keys elsewhere
        from .quant_pool import pool_code_blocks

        parts.append(pool_code_blocks(hist, n_full, block_n, chunk_tokens))  # (B, nb, H, D)
    s_cur = 0 if current_keys is None else current_keys.shape[1]
    head = min(block_n - tail, s_cur) if tail else 0
    if tail:  # the straddling block: history tail and current head together
        total = dequantize_keys(hist, n_full * block_n).sum(1)
        if head:
            total = total + current_keys[:, :head].sum(1, dtype=torch.float32)
        parts.append((total / (tail + head))[:, None])
    if s_cur > head:
        from .routing import pool_blocks

        parts.append(pool_blocks(current_keys[:, head:], block_n).permute(0, 2, 1, 3))
    if not parts:
        b, _, h, d = hist.k_codes.shape
        return hist.key_channel_scale.new_zeros(b, h, 0, hist.head_dim)
    return torch.cat(parts, 1).permute(0, 2, 1, 3)


def gather_history_rows(hist: QuantizedKV, position: torch.Tensor, which: str) -> torch.Tensor:
    """Dequantized keys or values (``which``) at ``position`` (B, H, ...) int64 -> (B, H, ..., D) fp32; positions
    at or past the history read its last row (the caller selects or masks them). Only these rows are dequantized
    (the gather path's listed blocks)."""
    b, s_h, h, _ = hist.k_codes.shape
    shape = position.shape
    if s_h == 0:
        return hist.key_channel_scale.new_zeros(*shape, hist.head_dim)
    rows = position.reshape(b, h, -1).clamp(0, s_h - 1)
    b_idx = torch.arange(b, device=rows.device).view(b, 1, 1)
    h_idx = torch.arange(h, device=rows.device).view(1, h, 1)
    keys = which == "keys"
    codes, scale, zero = (hist.k_codes, hist.k_scale, None) if keys else (hist.v_codes, hist.v_scale, hist.v_zero)
    pick = lambda t: t[b_idx, rows, h_idx]  # noqa: E731  (B, H, n, ...)
    out = _dequantize_codes(pick(codes), pick(scale), None if zero is None else pick(zero), hist.kind, keys)
    if keys:
        out = out * hist.key_channel_scale[:, :, None]
    return out.view(*shape, hist.head_dim)


__all__ = [
    "KINDS",
    "QuantizedKV",
    "copy_slots",
    "dequantize",
    "dequantize_keys",
    "dequantize_values",
    "key_channel_scales",
    "pool_quantized_blocks",
    "quantize_kv",
    "scale_buffer",
    "with_scale_layout",
    "write_quantized",
]
