"""``rolling``: sink frames kept forever plus a sliding window of recent frames; dense attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..keep.rolling import SinkWindow
from ..registry import register_method
from .base import GenKVMethod


@register_method
@dataclass
class Rolling(GenKVMethod):
    """Rolling KV with sink frames (Self-Forcing local attention, LongLive frame sink).

    Args:
        sink_frames: first latent frames of the video kept for the whole rollout.
        window_frames: most recent latent frames a chunk attends to, counting its own frames
            (upstream ``local_attn_size`` = ``sink_frames + window_frames``). Must hold at least one chunk.
        rebase_positions: re-base RoPE positions of the window when they would pass ``max_position``, so a
            rollout of any length stays inside the positions the model was trained with.
        max_position: RoPE frame positions allowed before re-basing; ``None`` = the model's RoPE table
            (1024 latent frames for Wan2.1).

    Example:
        >>> import genkv
        >>> genkv.get_method("rolling", sink_frames=3, window_frames=9)
        Rolling(sink_frames=3, window_frames=9, rebase_positions=True, max_position=None)
    """

    name: ClassVar[str] = "rolling"
    budget_field: ClassVar[str | None] = "window_frames"  # what budget_bytes sets
    sink_frames: int = 0
    window_frames: int = 21
    rebase_positions: bool = True
    max_position: int | None = None

    def validate(self) -> None:
        self.require_int("sink_frames", minimum=0)
        self.require_int("window_frames", minimum=1)
        if not isinstance(self.rebase_positions, bool):
            self._fail("rebase_positions", "true or false")
        if self.max_position is not None:
            self.require_int("max_position", minimum=self.sink_frames + self.window_frames)

    def build_keeper(self) -> SinkWindow:
        return SinkWindow(self.sink_frames, self.window_frames, self.max_position, self.rebase_positions)
