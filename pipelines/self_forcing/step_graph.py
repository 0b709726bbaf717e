"""CUDA graphs of the transformer forwards: launch a forward's kernels once, replay them for every later forward
that does the same thing, chunk after chunk.

A compiled Wan2.1-1.3B forward at 480x832 costs the host about as long to *launch* as the GPU takes to run it
(~60-80 ms on an H200: dynamo guards, the cache bookkeeping in Python, Triton launchers), so the GPU waits on
Python. Forwards that read and write the same buffers with the same shapes differ only in values (latents,
timestep, and what sits in the buffers), so each distinct forward is recorded once as a CUDA graph and
replayed after that, with the new latents and timestep copied into the graph's input buffers.

Whether two forwards may share a graph is decided by :meth:`genkv.cache.KVCacheStore.graph_signature`: the
cache layout plus what each reader will do. With a fixed-layout keeper (TempCache, ``fastar``) the layout never
changes, so a whole video runs on a few graphs (the chunk's routing forward, the routed ones) recorded in its
first two chunks. A growing or filling cache changes its layout every chunk: its graphs serve one chunk's
later forwards, and are released when the layout moves on. Nothing falls back silently: if the device cannot
take graphs, a reader does not say what it does, or a recording fails, a warning says why and every later
forward runs eagerly, which computes the same thing.
"""

from __future__ import annotations

import warnings
from typing import Callable, Hashable

import torch

Forward = Callable[..., torch.Tensor]


class _Recorded:
    """One recorded forward: the graph, its input buffers and its output buffer."""

    def __init__(self, graph: "torch.cuda.CUDAGraph", inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
        self.graph, self.inputs, self.output = graph, inputs, output


class ChunkGraphs:
    """Record each distinct forward once as a CUDA graph and replay it for every later forward with its key.

    ``run(key, fn, *inputs)`` returns ``fn(*inputs)``: eagerly when ``key`` is None or graphs are off, by
    replaying the graph recorded for ``key`` (and the inputs' shapes) when there is one, else by recording one.
    ``key[0]`` is the *layout* (the buffers ``fn`` reads and writes): recording a key with a new layout releases
    the graphs of the old ones, whose buffers may be gone. ``fn`` must read only ``inputs`` and state that stays
    put (same tensors) for as long as its key comes back. ``on_replay`` is called after each replay, to redo the
    host-side bookkeeping a replay skips.

    Example::

        graphs = ChunkGraphs(torch.device("cuda"), on_replay=store.replayed)
        for step, t in enumerate(timesteps):
            signature = store.graph_signature()
            flow = graphs.run(signature, forward, x, t)
    """

    def __init__(self, device: torch.device, on_replay: Callable[[], None] | None = None) -> None:
        self.device = device
        self.on_replay = on_replay
        self.reason: str | None = None  # why graphs are off, once known
        self.captures = 0
        self.replays = 0
        self._graphs: dict[Hashable, _Recorded] = {}
        self._shapes_run: set[tuple] = set()  # input shapes already run (eagerly or recorded)
        self._warmed = False
        if device.type != "cuda":
            self.disable(f"CUDA graphs need a CUDA device, not {device.type}")
            return
        self._pool = torch.cuda.graph_pool_handle()  # shared: graphs replay one at a time, never concurrently
        self._capture_stream = torch.cuda.Stream(device)

    @property
    def recorded(self) -> int:
        """Graphs held now."""
        return len(self._graphs)

    def disable(self, reason: str) -> None:
        """Turn graphs off for good, saying why (once)."""
        if self.reason is None:
            self.reason = reason
            warnings.warn(f"genkv: running without CUDA graphs: {reason}", RuntimeWarning, stacklevel=3)
        self.release()

    def release(self) -> None:
        """Free every recorded graph and its buffers."""
        for recorded in self._graphs.values():
            recorded.graph.reset()
        self._graphs.clear()

    def run(self, key: Hashable | None, fn: Forward, *inputs: torch.Tensor) -> torch.Tensor:
        if self.reason is not None:
            return fn(*inputs)
        shapes = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key is None or shapes not in self._shapes_run:
            # Input shapes never run before run eagerly once: autotuners (cuDNN's engine FIND for a new
            # convolution shape, e.g. a prompt switch's 1-frame re-cache block) cannot run inside a capture.
            self._shapes_run.add(shapes)
            return fn(*inputs)
        full_key = (key, shapes)
        with torch.cuda.device(self.device):  # the model's GPU, whichever one is current
            recorded = self._graphs.get(full_key)
            if recorded is not None:
                for buffer, value in zip(recorded.inputs, inputs):
                    buffer.copy_(value)
                recorded.graph.replay()
                self.replays += 1
                if self.on_replay is not None:
                    self.on_replay()
                return recorded.output.clone()  # the buffer is overwritten by the next replay
            return self._record(full_key, fn, inputs)

    def _record(self, full_key: Hashable, fn: Forward, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # Graphs of another layout are reset only once the new one is recorded into the shared pool: a pool
        # whose last graph is gone is released, and recording into it again trips the caching allocator.
        layout = full_key[0][0] if isinstance(full_key[0], tuple) and full_key[0] else None
        stale = [k for k in self._graphs if (k[0][0] if isinstance(k[0], tuple) and k[0] else None) != layout]
        try:
            return self._record_new(full_key, fn, inputs)
        finally:
            for k in stale:
                recorded = self._graphs.pop(k, None)
                if recorded is not None:
                    recorded.graph.reset()

    def _record_new(self, full_key: Hashable, fn: Forward, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
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
            self.disable(f"recording a forward failed ({what})")
            return result if result is not None else fn(*inputs)
        self._graphs[full_key] = _Recorded(graph, static, output)
        self.captures += 1
        if result is None:
            graph.replay()
            self.replays += 1
            result = output.clone()
        return result
