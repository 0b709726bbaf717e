"""CUDA graphs of a chunk's transformer forwards: launch the chunk's kernels once, replay them for its later steps.

A compiled Wan2.1-1.3B forward at 480x832 costs the host about as long to *launch* as the GPU takes to run it
(~60-80 ms on an H200: dynamo guards, the cache bookkeeping in Python, Triton launchers), so
the GPU waits on Python. Within a chunk every forward after the first has the same shapes and touches the same
buffers: the cache stages the chunk at fixed slots, routes and prompt constants are made by the chunk's first
forward, and the inputs differ only in values (latents, timestep). So the second forward is recorded as a CUDA
graph and the chunk's later forwards (the remaining denoising steps and the clean K/V pass) replay it, with the
new latents and timestep copied into the graph's input buffers.

Whether two forwards may share a graph is decided by :meth:`genkv.cache.KVCacheStore.graph_signature`: the
chunk plus what each reader will do (``None``: this forward does host work that a graph cannot hold, such as
computing routes, and runs eagerly). Nothing falls back silently: if the device cannot take graphs, a reader
does not say what it does, or a capture fails, a warning says why and every later forward runs eagerly, which
computes the same thing.
"""

from __future__ import annotations

import warnings
from typing import Callable, Hashable

import torch

Forward = Callable[..., torch.Tensor]


class ChunkGraphs:
    """Record one forward per chunk as a CUDA graph and replay it for the chunk's later forwards.

    ``run(key, fn, *inputs)`` returns ``fn(*inputs)``: eagerly when ``key`` is None or graphs are off, by
    replaying the graph recorded for ``key`` when there is one, else by recording a new graph into the same
    memory pool (the previous one is released once the new one is recorded; only the newest is replayed). ``fn`` must read only ``inputs`` and
    state that stays put until the key changes.

    Example::

        graphs = ChunkGraphs(torch.device("cuda"))
        for step, t in enumerate(timesteps):
            key = None if step == 0 else (chunk_index, store.graph_signature())
            flow = graphs.run(key, forward, x, t)
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reason: str | None = None  # why graphs are off, once known
        self.captures = 0
        self.replays = 0
        self._key: Hashable | None = None
        self._graph = None
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._output: torch.Tensor | None = None
        self._warmed = False
        if device.type != "cuda":
            self.disable(f"CUDA graphs need a CUDA device, not {device.type}")
            return
        self._pool = torch.cuda.graph_pool_handle()
        self._capture_stream = torch.cuda.Stream(device)

    def disable(self, reason: str) -> None:
        """Turn graphs off for good, saying why (once)."""
        if self.reason is None:
            self.reason = reason
            warnings.warn(f"genkv: running without CUDA graphs: {reason}", RuntimeWarning, stacklevel=3)
        self.release()

    def release(self) -> None:
        """Free the recorded graph and its buffers (a later recording starts a new pool)."""
        if self._graph is not None:
            self._graph.reset()
            if self.reason is None:
                self._pool = torch.cuda.graph_pool_handle()
        self._graph, self._key, self._inputs, self._output = None, None, (), None

    def run(self, key: Hashable | None, fn: Forward, *inputs: torch.Tensor) -> torch.Tensor:
        if self.reason is not None or key is None:
            return fn(*inputs)
        with torch.cuda.device(self.device):  # the model's GPU, whichever one is current
            if key == self._key and self._graph is not None:
                for buffer, value in zip(self._inputs, inputs):
                    buffer.copy_(value)
                self._graph.replay()
                self.replays += 1
                return self._output.clone()  # the buffer is overwritten by the next replay
            return self._record(key, fn, inputs)

    def _record(self, key: Hashable, fn: Forward, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # The last chunk's graph is reset only once the new one is recorded into the shared pool: a pool whose
        # last graph is gone is released, and recording into it again trips the caching allocator. Sharing is
        # safe because only the newest graph is ever replayed.
        previous = self._graph
        self._graph, self._key, self._inputs, self._output = None, None, (), None
        try:
            return self._record_new(key, fn, inputs)
        finally:
            if previous is not None:
                previous.reset()

    def _record_new(self, key: Hashable, fn: Forward, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        main = torch.cuda.current_stream(self.device)
        static = tuple(x.clone() for x in inputs)
        side = self._capture_stream
        side.wait_stream(main)  # before the capture begins: a capture may not wait on outside work
        result = None
        if not self._warmed:
            # Libraries set up per-stream state (cuBLAS workspaces, ...) on first use, which a capture may not
            # do: the first recorded forward runs once for real on the capture stream first, and its result
            # is this step's output.
            with torch.cuda.stream(side):
                result = fn(*static)
            main.wait_stream(side)
            result.record_stream(main)  # made on the capture stream, read on this one
            side.wait_stream(main)
            self._warmed = True
        graph = torch.cuda.CUDAGraph()
        error: Exception | None = None
        output = None
        with torch.cuda.stream(side):
            try:
                # thread_local: the mp4 writer thread and the VAE decode may go on while this thread records.
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    output = fn(*static)
                except Exception as failure:  # noqa: BLE001 - reported below; the eager forward computes the same
                    error = failure
                graph.capture_end()
            except Exception as failure:  # noqa: BLE001 - the first failure is the one worth reporting
                error = error or failure
        main.wait_stream(side)
        if error is not None or not isinstance(output, torch.Tensor):
            what = f"{type(error).__name__}: {str(error)[:300]}" if error is not None else "no tensor came out"
            self.disable(f"recording the chunk's forward failed ({what})")
            return result if result is not None else fn(*inputs)
        self._graph, self._key, self._inputs, self._output = graph, key, static, output
        self.captures += 1
        if result is None:
            graph.replay()
            self.replays += 1
            result = output.clone()
        return result
