"""Append-as-you-go mp4 writing that never loses what was produced.

Frames go to ffmpeg (through imageio-ffmpeg) from a background thread, so encoding overlaps generation, and
the file is a *fragmented* mp4: it is playable after every fragment, even if the process is killed, not only
after a clean close. A clean close (also on Ctrl-C or an exception: use it as a context manager) flushes every
frame handed to :meth:`Mp4Writer.append`.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from types import TracebackType

import numpy as np

_STOP = object()


class Mp4Writer:
    """Write uint8 frames ``[T, H, W, 3]`` to an H.264 mp4 as they arrive.

    Example:
        >>> import numpy as np, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "clip.mp4")
        >>> with Mp4Writer(path, fps=16) as w:
        ...     w.append(np.zeros((5, 32, 32, 3), np.uint8))
        >>> w.frames_written
        5
    """

    def __init__(self, path: str | Path, fps: float = 16.0, quality: float = 8.0, max_pending_chunks: int = 4):
        self.path = Path(path)
        self.fps = fps
        self.quality = quality
        self.frames_written = 0  # frames ffmpeg has accepted
        self.frames_queued = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending_chunks)  # bounded: flat host memory
        self._thread: threading.Thread | None = None
        self._stop_queued = False
        self._error: BaseException | None = None
        self._size: tuple[int, int] | None = None

    def _start(self, height: int, width: int) -> None:
        import imageio_ffmpeg

        self._size = (height, width)
        self._gen = imageio_ffmpeg.write_frames(
            str(self.path),
            size=(width, height),
            fps=self.fps,
            codec="libx264",
            quality=self.quality,
            macro_block_size=1,
            ffmpeg_log_level="error",
            # Fragmented mp4: every fragment is self-contained, so a killed render still leaves a playable file.
            output_params=["-movflags", "frag_keyframe+empty_moov+default_base_moof", "-g", str(max(1, int(self.fps)))],
        )
        self._gen.send(None)
        self._thread = threading.Thread(target=self._work, name="genkv-mp4-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                for frame in item:
                    self._gen.send(np.ascontiguousarray(frame))
                    self.frames_written += 1
        except BaseException as err:  # surfaced to the caller on the next append/close
            self._error = err
            while self._queue.get() is not _STOP:  # keep draining so the producer never blocks forever
                pass

    def append(self, frames: np.ndarray) -> None:
        """Queue frames ``[T, H, W, 3]`` (uint8) for writing; blocks only if encoding falls 4 chunks behind."""
        if self._error is not None:
            raise RuntimeError(f"writing {self.path} failed: {self._error}") from self._error
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        if self._thread is None:
            self._start(frames.shape[1], frames.shape[2])
        elif frames.shape[1:3] != self._size:
            raise ValueError(f"frame size changed from {self._size} to {frames.shape[1:3]}")
        self._queue.put(frames)
        self.frames_queued += len(frames)

    def close(self) -> None:
        """Write every queued frame and finalise the file."""
        if self._thread is None:
            return
        if not self._stop_queued:  # a close interrupted after queueing the stop must not queue another
            self._queue.put(_STOP)
            self._stop_queued = True
        self._thread.join()
        self._thread = None
        self._gen.close()
        if self._error is not None:
            raise RuntimeError(f"writing {self.path} failed: {self._error}") from self._error

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def count_frames(path: str | Path) -> int:
    """Decode an mp4 and count its frames (exact, unlike the container's metadata)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    next(reader)  # metadata
    return sum(1 for _ in reader)


def read_frames(path: str | Path) -> np.ndarray:
    """All frames of an mp4 as uint8 ``[T, H, W, 3]``."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(height, width, 3) for f in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)
