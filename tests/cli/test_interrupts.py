"""What is on disk when a render stops early: SIGTERM is handled like Ctrl-C, a SIGKILL of the whole process group
(an out-of-memory kill, a container stop) still leaves every chunk the writer reported, nothing is claimed for a
video that was never started, and a log shows progress between model load and the end."""

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from genkv.cli.main import main
from genkv.video import Mp4Writer, count_frames, read_frames

FAST_MODEL = ["--model", "tiny-random"]
NAME = "000-a-red-circle-bouncing"
WRITTEN = re.compile(r"(\d+)/\d+ frames \((\d+) in the mp4\)")


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle bouncing\na blue square falling\n")
    return path


def _start(prompts, out, frames=100_000, **popen):
    argv = [sys.executable, "-m", "genkv.cli.main", "render", str(prompts), "--frames", str(frames), "--out",
            str(out), "--progress-every", "1", *FAST_MODEL]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), **popen)


def _wait_for_progress(proc, min_written: int, timeout: float = 240) -> tuple[int, list[str]]:
    """Read the render's progress lines until one says at least ``min_written`` frames are in the mp4."""
    seen: list[str] = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stderr:
            seen.append(line)
            match = WRITTEN.search(line)
            if match and int(match.group(2)) >= min_written:
                return int(match.group(2)), seen
    finally:
        timer.cancel()
    raise AssertionError(f"the render ended before writing {min_written} frames: {''.join(seen)}")


def test_sigterm_keeps_finished_chunks_writes_the_summary_and_exits_143(tmp_path, prompts):
    out = tmp_path / "o"
    proc = _start(prompts, out)
    _wait_for_progress(proc, 1)  # the first chunk is in the mp4
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated:" in err and "Traceback" not in err
    summary = json.loads((out / f"{NAME}.json").read_text())
    assert summary["interrupted"] and summary["terminated"] and 0 < summary["frames"] < 100_000
    assert count_frames(out / f"{NAME}.mp4") == summary["frames"]
    assert f"kept {summary['frames']} frames" in err
    assert not (out / "001-a-blue-square-falling.mp4").exists()  # the render stops at the signal


def _read_available(fd: int, wait: float) -> str:
    """What the pipe holds now (waiting up to ``wait`` seconds for the first bytes), read for at most ``wait`` + 1
    seconds: a render that prints faster than it is read would otherwise keep this loop going to its end."""
    data = b""
    end = time.time() + wait + 1.0
    while time.time() < end and select.select([fd], [], [], wait)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
        wait = 0.2
    return data.decode(errors="replace")


def _descendants(pid: int) -> list[int]:
    """Every process started (transitively) by ``pid``, from /proc."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as file:
                children = [int(c) for c in file.read().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def test_killing_the_whole_process_group_leaves_every_reported_chunk_decodable(tmp_path, prompts):
    out = tmp_path / "o"
    argv = [sys.executable, "-m", "genkv.cli.main", "render", str(prompts), "--frames", "100000", "--out", str(out),
            "--progress-every", "1", *FAST_MODEL]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)  # genkv + ffmpeg
    fd, log, deadline = proc.stderr.fileno(), "", time.time() + 240
    while time.time() < deadline and max(map(int, re.findall(r"\((\d+) in the mp4\)", log)), default=0) < 9 + 12:
        log += _read_available(fd, 1.0)  # until two chunks (9 frames, then 12 per chunk) are reported written
    os.killpg(proc.pid, signal.SIGSTOP)  # freeze genkv, then read what it reported
    for child in _descendants(proc.pid):  # imageio starts ffmpeg in a session of its own: a container stop or an
        os.kill(child, signal.SIGKILL)    # out-of-memory kill takes it too, so kill it with genkv
    log += _read_available(fd, 0.5)
    written = max(map(int, re.findall(r"\((\d+) in the mp4\)", log)), default=0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert written >= 21, log
    frames = read_frames(out / f"{NAME}.mp4")
    assert len(frames) >= written, (len(frames), written)
    assert (len(frames) - 9) % 12 == 0  # whole chunks only
    assert frames.std() > 0  # decoded pictures, not an empty shell


def test_the_writer_has_each_chunk_on_disk_once_it_counts_it(tmp_path):
    path = tmp_path / "v.mp4"
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 255, (n, 48, 64, 3), dtype=np.uint8) for n in (9, 12, 12)]
    writer = Mp4Writer(path, fps=16.0)
    assert not path.exists()
    done = 0
    for chunk in chunks:
        writer.append(chunk)
        done += len(chunk)
        deadline = time.time() + 60
        while writer.frames_written < done and time.time() < deadline:
            time.sleep(0.01)
        snapshot = tmp_path / f"copy-{done}.mp4"
        shutil.copy(path, snapshot)  # the file as it is now, the writer still open
        assert count_frames(snapshot) == done
    writer.close()
    whole = read_frames(path)
    assert whole.shape == (33, 48, 64, 3)
    # each chunk decodes as it was encoded on its own, and the chunks join in order
    start = 0
    for i, chunk in enumerate(chunks):
        alone = tmp_path / f"alone-{i}.mp4"
        with Mp4Writer(alone, fps=16.0) as w:
            w.append(chunk)
        assert (read_frames(alone) == whole[start:start + len(chunk)]).all()
        start += len(chunk)
    meta = next(__import__("imageio_ffmpeg").read_frames(str(path)))
    assert meta["fps"] == 16.0 and meta["duration"] == pytest.approx(33 / 16, abs=0.07)


def test_ctrl_c_before_the_first_chunk_claims_nothing_and_leaves_no_file(tmp_path, prompts, capsys, monkeypatch):
    from genkv.pipelines import SelfForcingPipeline

    def interrupted_rollout(self, *args, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(SelfForcingPipeline, "rollout", interrupted_rollout)
    out = tmp_path / "o"
    code = main(["render", str(prompts), "--frames", "30", "--out", str(out), *FAST_MODEL])
    err = capsys.readouterr().err
    assert code == 130
    assert "nothing was written" in err and "kept 0 frames" not in err and "Traceback" not in err
    assert list(out.iterdir()) == []


def test_a_log_gets_a_progress_line_every_n_chunks(tmp_path, prompts, capsys):
    out = tmp_path / "o"
    prompts.write_text("a red circle bouncing\n")
    # 69 frames = 6 chunks (9 + 5 x 12): lines after chunk 1 and every 2nd chunk
    code = main(["render", str(prompts), "--frames", "69", "--out", str(out), "--progress-every", "2", *FAST_MODEL])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = [line for line in err.splitlines() if WRITTEN.search(line)]
    assert [int(WRITTEN.search(line).group(1)) for line in lines] == [9, 21, 45, 69]
    assert all(re.search(r"[\d.]+ frames/s, KV [\d.]+ (B|KiB|MiB|GiB), \d+ s$", line) for line in lines), lines
    assert all(line.startswith(NAME[:32]) for line in lines)


def test_a_long_prompts_unknown_word_note_is_shortened(tmp_path, capsys):
    prompts = tmp_path / "long.txt"
    prompts.write_text("a red circle moving left " + "zorblax " * 12_000 + "\n")  # ~100 KB
    code = main(["render", str(prompts), "--model", "sprites-tiny", "--frames", "9", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    note = next(line for line in err.splitlines() if "does not know" in line)
    assert "'zorblax'" in note and "(96024 characters)" in note and len(note) < 300
