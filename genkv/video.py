"""Append-as-you-go mp4 writing that never loses a finished chunk.

Frames go to ffmpeg (through imageio-ffmpeg) from a background thread, so encoding overlaps generation. Each
chunk handed to :meth:`Mp4Writer.append` is encoded on its own (it starts with a keyframe) and appended to the
file as fragments of a *fragmented* mp4 the moment ffmpeg finishes it: once :attr:`Mp4Writer.frames_written`
counts a frame, it is in the file and decodes, even if the process group is killed next (out of memory, a
container stop). A single long ffmpeg run cannot promise that: its mp4 muxer writes a frame only when the next
one arrives, and buffers 32 KB before that. A clean close (also on Ctrl-C or an exception: use it as a context
manager) writes every frame handed to :meth:`Mp4Writer.append`.
"""

from __future__ import annotations

import queue
import struct
import subprocess
import threading
from pathlib import Path
from types import TracebackType

import numpy as np

_STOP = object()
_FRAGMENTED = "frag_keyframe+empty_moov+default_base_moof"


class Mp4Writer:
    """Write uint8 frames ``[T, H, W, 3]`` to an H.264 mp4 as they arrive; each appended chunk is on disk (whole,
    decodable) as soon as it is encoded. No file is created before the first frame is written.

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
        self.frames_written = 0  # frames in the file on disk
        self.frames_queued = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending_chunks)  # bounded: flat host memory
        self._thread: threading.Thread | None = None
        self._stop_queued = False
        self._error: BaseException | None = None
        self._size: tuple[int, int] | None = None
        self._file = None
        self._sequence = 1  # next fragment number (mfhd)
        self._decode_time = 0  # where the next fragment starts, in the track's timescale (tfdt)

    def _start(self, height: int, width: int) -> None:
        self._size = (height, width)
        self._thread = threading.Thread(target=self._work, name="genkv-mp4-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                chunks, stop = [item], False
                while not stop:  # fallen behind: encode what is waiting as one segment
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    stop = more is _STOP
                    if not stop:
                        chunks.append(more)
                self._write_segment(np.concatenate(chunks) if len(chunks) > 1 else chunks[0])
                if stop:
                    return
        except BaseException as err:  # surfaced to the caller on the next append/close
            self._error = err
            while self._queue.get() is not _STOP:  # keep draining so the producer never blocks forever
                pass

    def _write_segment(self, frames: np.ndarray) -> None:
        """Encode ``frames`` as a fragmented mp4 of their own and append its fragments to the file."""
        data = _encode(frames, self.fps, self.quality)
        if self._file is None:
            self._file = open(self.path, "wb")
            self._file.write(b"".join(data[i : i + s] for kind, i, _, s in _boxes(data) if kind in ("ftyp", "moov")))
        body, self._sequence, duration = _renumber_fragments(data, self._sequence, self._decode_time)
        self._file.write(body)
        self._file.flush()  # in the OS's hands: survives a kill of this process
        self._decode_time += duration
        self.frames_written += len(frames)

    def append(self, frames: np.ndarray) -> None:
        """Queue frames ``[T, H, W, 3]`` (uint8) for writing; blocks only if encoding falls 4 chunks behind."""
        if self._error is not None:
            raise RuntimeError(f"writing {self.path} failed: {self._error}") from self._error
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        if len(frames) == 0:
            return
        if self._thread is None:
            self._start(frames.shape[1], frames.shape[2])
        elif frames.shape[1:3] != self._size:
            raise ValueError(f"frame size changed from {self._size} to {frames.shape[1:3]}")
        self._queue.put(frames)
        self.frames_queued += len(frames)

    def close(self) -> None:
        """Write every queued frame and close the file."""
        if self._thread is not None:
            if not self._stop_queued:  # a close interrupted after queueing the stop must not queue another
                self._queue.put(_STOP)
                self._stop_queued = True
            self._thread.join()
            self._thread = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._error is not None:
            raise RuntimeError(f"writing {self.path} failed: {self._error}") from self._error

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _encode(frames: np.ndarray, fps: float, quality: float) -> bytes:
    """The bytes of a fragmented H.264 mp4 holding ``frames`` (one ffmpeg run, to completion: nothing buffered).

    ffmpeg is started here, not through ``imageio_ffmpeg.write_frames``: that one passes ``preexec_fn`` to
    ``subprocess``, which can deadlock a fork from this thread while torch's threads hold locks; a new session
    (done by ``subprocess`` in C) keeps Ctrl-C from killing a segment half-written, as imageio's does.
    """
    from fractions import Fraction

    import imageio_ffmpeg

    height, width = frames.shape[1:3]
    crf = int((1 - quality / 10.0) * 51)  # imageio-ffmpeg's mapping of quality (0-10) to libx264's CRF
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}",
        "-pix_fmt", "rgb24", "-r", str(Fraction(fps).limit_denominator()), "-i", "-", "-an",
        # -bf 0: no B-frames, so no segment's frames are shown later than they are decoded. With them a segment of
        # 1-2 frames (an image-to-video first block, a short last chunk) has no reordering delay while the others
        # do, and the joined file gets a gap that players and readers fill with repeated frames.
        "-vcodec", "libx264", "-bf", "0", "-pix_fmt", "yuv420p", "-crf", str(crf), "-v", "error",
        "-movflags", _FRAGMENTED, "-f", "mp4", "pipe:1",
    ]
    done = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True,
                          start_new_session=True, check=False)
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"ffmpeg exited with {done.returncode}: {reason[-1] if reason else 'no message'}")
    return done.stdout


def _boxes(data: bytes | bytearray, start: int = 0, end: int | None = None):
    """``(type, offset, header size, size)`` of each ISO-BMFF box in ``data[start:end]``."""
    end = len(data) if end is None else end
    while start + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, start)
        head = 8
        if size == 1:
            size, head = struct.unpack_from(">Q", data, start + 8)[0], 16
        elif size == 0:
            size = end - start
        if size < head:
            raise ValueError(f"corrupt mp4 box {kind!r} at byte {start}")
        yield kind.decode("latin-1"), start, head, size
        start += size


def _child(data: bytearray, kind: str, parent: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """The first box of ``kind`` inside ``parent`` ((offset, header, size)), as (offset, header, size)."""
    offset, head, size = parent
    return next(((i, h, s) for k, i, h, s in _boxes(data, offset + head, offset + size) if k == kind), None)


def _default_duration(data: bytearray) -> int:
    """The ``trex`` default sample duration (used by fragments that name none)."""
    for kind, i, h, s in _boxes(data):
        if kind == "moov":
            mvex = _child(data, "mvex", (i, h, s))
            trex = mvex and _child(data, "trex", mvex)
            if trex:
                return struct.unpack_from(">I", data, trex[0] + trex[1] + 12)[0]
    return 0


def _traf_duration(data: bytearray, traf: tuple[int, int, int], default: int) -> int:
    """Sum of the sample durations of one track fragment (``trun`` entries, else ``tfhd``/``trex`` defaults)."""
    tfhd, trun = _child(data, "tfhd", traf), _child(data, "trun", traf)
    flags = struct.unpack_from(">I", data, tfhd[0] + tfhd[1])[0] & 0xFFFFFF
    at = tfhd[0] + tfhd[1] + 8 + (8 if flags & 0x1 else 0) + (4 if flags & 0x2 else 0)
    if flags & 0x8:
        default = struct.unpack_from(">I", data, at)[0]
    run_flags = struct.unpack_from(">I", data, trun[0] + trun[1])[0] & 0xFFFFFF
    count = struct.unpack_from(">I", data, trun[0] + trun[1] + 4)[0]
    if not run_flags & 0x100:
        return count * default
    at = trun[0] + trun[1] + 8 + (4 if run_flags & 0x1 else 0) + (4 if run_flags & 0x4 else 0)
    step = 4 * bin(run_flags & 0xF00).count("1")
    return sum(struct.unpack_from(">I", data, at + n * step)[0] for n in range(count))


def _renumber_fragments(data: bytes, sequence: int, decode_time: int) -> tuple[bytes, int, int]:
    """The ``moof``/``mdat`` boxes of a standalone fragmented mp4, numbered from ``sequence`` and shifted to start
    at ``decode_time``, so they continue another file; returns (bytes, next sequence number, their duration)."""
    data = bytearray(data)
    default = _default_duration(data)
    parts, duration = [], 0
    for kind, i, h, s in list(_boxes(data)):
        if kind == "moof":
            mfhd = _child(data, "mfhd", (i, h, s))
            struct.pack_into(">I", data, mfhd[0] + mfhd[1] + 4, sequence)
            sequence += 1
            for kind2, j, h2, s2 in _boxes(data, i + h, i + s):
                if kind2 != "traf":
                    continue
                tfdt = _child(data, "tfdt", (j, h2, s2))
                form = ">Q" if data[tfdt[0] + tfdt[1]] == 1 else ">I"
                at = tfdt[0] + tfdt[1] + 4
                struct.pack_into(form, data, at, struct.unpack_from(form, data, at)[0] + decode_time)
                duration += _traf_duration(data, (j, h2, s2), default)
            parts.append(bytes(data[i : i + s]))
        elif kind == "mdat":
            parts.append(bytes(data[i : i + s]))
    return b"".join(parts), sequence, duration


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
