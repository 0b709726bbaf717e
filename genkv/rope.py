"""Rotary position embedding with a temporal frame offset.

diffusers' ``WanRotaryPosEmbed`` always numbers a forward's latent frames from 0. A causal rollout needs the
chunk's absolute (or re-based) frame position instead, and a rolling cache needs to move cached keys to new
positions without recomputing them. Both are here:

* :class:`FrameOffsetRotaryPosEmbed` is a drop-in subclass whose ``frame_offset`` attribute shifts the
  temporal index. Positions inside the precomputed table are sliced from it (bit-identical to diffusers at
  offset 0); positions past the table are computed on the fly in float64, so a long rollout never indexes out
  of the table.
* :meth:`FrameOffsetRotaryPosEmbed.shift_key_positions` rotates post-RoPE keys by ``delta`` frames. RoPE is a
  rotation, so ``R(p + delta) = R(delta) R(p)``: shifting every key of a window by the same delta keeps all
  relative positions, which is all attention sees.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed


def apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved-pair rotary embedding on ``(..., D)`` with ``(..., D)`` tables (diffusers' arithmetic).

    Example:
        >>> x = torch.randn(1, 4, 2, 6)
        >>> torch.equal(apply_rotary_emb(x, torch.ones(6), torch.zeros(6)), x)
        True
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class FrameOffsetRotaryPosEmbed(WanRotaryPosEmbed):
    """``WanRotaryPosEmbed`` whose temporal positions start at ``frame_offset``.

    Example:
        >>> from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
        >>> rope = FrameOffsetRotaryPosEmbed.from_module(WanRotaryPosEmbed(12, (1, 2, 2), 32))
        >>> rope.frame_offset = 40          # past the 32-frame table: computed, not indexed
        >>> cos, sin = rope(torch.zeros(1, 16, 3, 4, 4))
        >>> tuple(cos.shape)
        (1, 12, 1, 12)
    """

    theta: float = 10000.0
    frame_offset: int = 0

    @classmethod
    def from_module(cls, rope: WanRotaryPosEmbed) -> "FrameOffsetRotaryPosEmbed":
        """Turn an existing rope module into this class in place (same buffers, same device)."""
        rope.__class__ = cls
        rope.frame_offset = 0
        return rope  # type: ignore[return-value]

    def to_plain(self) -> WanRotaryPosEmbed:
        """Undo :meth:`from_module`."""
        self.__dict__.pop("frame_offset", None)
        self.__dict__.pop("_held", None)
        self.__class__ = WanRotaryPosEmbed
        return self

    def _temporal_table(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos_t = self.freqs_cos[:, : self.t_dim]
        sin_t = self.freqs_sin[:, : self.t_dim]
        if 0 <= start and start + count <= cos_t.shape[0]:
            return cos_t[start : start + count], sin_t[start : start + count]
        positions = torch.arange(start, start + count, dtype=torch.float64, device=cos_t.device)
        cos, sin = get_1d_rotary_pos_embed(
            self.t_dim, positions, self.theta, use_real=True, repeat_interleave_real=True, freqs_dtype=torch.float64
        )
        return cos.to(cos_t.dtype), sin.to(sin_t.dtype)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        grid = (num_frames // p_t, height // p_h, width // p_w)
        held = self.__dict__.get("_held")
        if held is not None and held[0] == (grid, int(self.frame_offset), hidden_states.device):
            return held[1]
        if hidden_states.is_cuda and torch.cuda.is_current_stream_capturing():
            # Tables computed inside a CUDA graph would be baked in at this offset; hold() them before recording.
            raise RuntimeError(f"rotary tables for frame offset {self.frame_offset} were not held before a CUDA "
                               "graph recording (call hold() when the chunk begins)")
        return self._tables(grid, hidden_states.device)

    def hold(self, grid: tuple[int, int, int], device: torch.device) -> None:
        """Compute the tables of a ``(frames, rows, cols)`` token grid at the current ``frame_offset`` into
        buffers that every later forward at that grid and offset returns as they are. The buffers are the same
        tensors chunk after chunk (refilled in place), so a CUDA graph recorded over one chunk's forward reads
        the next chunk's positions when replayed: call this at the start of each chunk, outside the graph."""
        device = torch.device(device)
        cos, sin = self._tables(grid, device)
        held = self.__dict__.get("_held")
        if held is not None and held[0][0] == grid and held[0][2] == device:
            held[1][0].copy_(cos)
            held[1][1].copy_(sin)
            buffers = held[1]
        else:
            buffers = (cos, sin)
        self._held = ((grid, int(self.frame_offset), device), buffers)

    def _tables(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ppf, pph, ppw = grid
        cos_f, sin_f = self._temporal_table(int(self.frame_offset), ppf)
        hw = (self.t_dim, self.t_dim + self.h_dim)

        def expand(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
            f = t.view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1)
            h = table[:pph, hw[0] : hw[1]].view(1, pph, 1, -1).expand(ppf, pph, ppw, -1)
            w = table[:ppw, hw[1] :].view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1)
            return torch.cat([f, h, w], dim=-1).reshape(1, ppf * pph * ppw, 1, -1)

        return expand(cos_f, self.freqs_cos), expand(sin_f, self.freqs_sin)

    def relative_rotation(
        self, dt: torch.Tensor, dh: torch.Tensor, dw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` tables, shape ``(*dt.shape, D)``, of the rotation that moves a post-RoPE key by
        ``(dt, dh, dw)`` positions (integer tensors of one shape): ``R(p + d) = R(d) R(p)``, so two keys at
        positions ``p`` and ``p + d`` compare *as content* (as before RoPE) once the first is moved by ``d``.

        Taken from the module's own tables (a negative offset is the transposed rotation), so a model whose
        tables were edited gets the rotation it really applies.

        Example:
            >>> rope = FrameOffsetRotaryPosEmbed.from_module(WanRotaryPosEmbed(12, (1, 2, 2), 32))
            >>> zero = torch.zeros(1, dtype=torch.long)
            >>> cos, sin = rope.relative_rotation(zero, zero, zero)   # no move: the identity
            >>> bool((cos == 1).all() and (sin == 0).all())
            True
        """
        cols = [(dt, 0, self.t_dim), (dh, self.t_dim, self.t_dim + self.h_dim),
                (dw, self.t_dim + self.h_dim, self.t_dim + self.h_dim + self.w_dim)]
        cos_parts, sin_parts = [], []
        for offset, lo, hi in cols:
            step = offset.abs().to(self.freqs_cos.device)
            sign = offset.sign().to(self.freqs_sin.device, self.freqs_sin.dtype).unsqueeze(-1)
            cos_parts.append(self.freqs_cos[step, lo:hi])
            sin_parts.append(self.freqs_sin[step, lo:hi] * sign)
        return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)

    def shift_key_positions(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Rotate post-RoPE ``keys`` (..., H, D) in place so their temporal positions move by ``delta`` frames.

        Computed in float32 and cast back once, so a key re-based a handful of times over a long rollout
        carries a handful of roundings, not one per chunk.
        """
        if delta == 0 or keys.numel() == 0:
            return keys
        half = self.t_dim // 2
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.t_dim, 2, dtype=torch.float64) / self.t_dim))
        angle = (float(delta) * inv_freq).to(keys.device)
        cos, sin = angle.cos().float(), angle.sin().float()
        pairs = keys[..., : self.t_dim].unflatten(-1, (half, 2))
        x1, x2 = pairs[..., 0].float(), pairs[..., 1].float()
        rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        keys[..., : self.t_dim] = rotated.to(keys.dtype)
        return keys
