"""Where a chunk's time goes: named phases timed with CUDA events (GPU time) and the host clock.

The GPU runs asynchronously, so the host clock alone says when work was *launched*; events recorded on the
stream between phases say how long the GPU spent on each. A phase whose host time is close to its GPU time is
launch-bound (the CPU cannot queue kernels fast enough); one whose GPU time dominates is compute-bound.
"""

from __future__ import annotations

import time

import torch


class ChunkTimer:
    """Record phase boundaries with :meth:`mark`; :meth:`finish` synchronises once and returns milliseconds.

    Example:
        >>> timer = ChunkTimer(torch.device("cpu"))
        >>> timer.mark("denoise"); timer.mark("decode")
        >>> sorted(timer.finish())
        ['decode_gpu_ms', 'decode_host_ms', 'denoise_gpu_ms', 'denoise_host_ms']
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.names: list[str] = []
        self.host = [time.perf_counter()]
        self.events = [self._event()] if self.cuda else []

    def _event(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, name: str) -> None:
        """End the phase called ``name`` here."""
        self.names.append(name)
        self.host.append(time.perf_counter())
        if self.cuda:
            self.events.append(self._event())

    def finish(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.cuda:
            self.events[-1].synchronize()
        for i, name in enumerate(self.names):
            out[f"{name}_host_ms"] = out.get(f"{name}_host_ms", 0.0) + 1000 * (self.host[i + 1] - self.host[i])
            gpu = self.events[i].elapsed_time(self.events[i + 1]) if self.cuda else 1000 * (self.host[i + 1] - self.host[i])
            out[f"{name}_gpu_ms"] = out.get(f"{name}_gpu_ms", 0.0) + gpu
        return out
