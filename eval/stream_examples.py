"""Example renders for docs/STREAMS.md: a long video with prompt switches and an image-to-video clip.

Uses the shipped ``sprites-tiny`` model (64x64, CPU in minutes) with ``genkv render``'s default cache method
(``genkv.cli.render.DEFAULT_METHOD`` / ``DEFAULT_SETTINGS``: rolling, sink 1, window 21 latent frames), and writes
under ``--out`` (default ``docs/streams/``):

- ``switch.mp4`` + ``switch_strip.png``: 480 frames, prompt switches at frames 165 and 321 (chunk boundaries:
  the first chunk is 9 frames, every later one 12, so a switch lands exactly where asked), ``recache=True``;
- ``i2v.mp4`` + ``i2v_strip.png`` (+ ``i2v_input.png``, 2x): 96 frames from an image drawn here with numpy (a
  red circle on a dark plain background, as the training data draws sprites), with the PSNR of the first output
  frame against the image and against the VAE's own round trip of it;
- ``streams.json``: settings, seeds, timings and PSNRs.

    python eval/stream_examples.py                      # both renders into docs/streams/
    python eval/stream_examples.py --out /tmp/s --frames 120 --i2v-frames 48   # a quick look
    python eval/stream_examples.py --threads 1          # on a shared CPU (what docs/streams/ was made with)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

FIRST_PROMPT = "a red circle moving left"
# (frame, prompt): frames 12k - 3 begin a chunk (9 frames, then 12 per chunk), so no switch is moved
SWITCHES: list[tuple[int, str]] = [(165, "a blue square moving down"), (321, "a red triangle moving right")]
I2V_PROMPT = "a red circle moving left"
INPUT_CIRCLE = (44.0, 32.0, 10.0)  # centre x, centre y, radius (px) of the drawn input image's sprite
INPUT_BACKGROUND = (40, 45, 55)  # dark, low saturation: in the range genkv.data draws plain backgrounds from
# strip bar colours per prompt segment (the asked colour, so a glance says which prompt was active)
BAR_COLOURS = {"red": (230, 40, 40), "blue": (50, 90, 240), "green": (40, 200, 60), "yellow": (240, 220, 40)}


def default_method():
    """``genkv render``'s default cache method and settings, so the examples show what the CLI renders."""
    import genkv
    from genkv.cli.render import DEFAULT_METHOD, DEFAULT_SETTINGS

    return genkv.get_method(DEFAULT_METHOD, **DEFAULT_SETTINGS), {"method": DEFAULT_METHOD, **DEFAULT_SETTINGS}


def render(pipe, prompt: str, frames: int, seed: int, mp4: Path, fps: float, **kwargs) -> tuple[np.ndarray, dict]:
    """Stream one video into ``mp4``; return its uint8 frames (T, H, W, 3) and its timings: wall seconds, and the
    process's CPU seconds (a shared CPU slows the wall clock; the CPU time says what the render itself cost)."""
    from genkv.video import Mp4Writer

    generator = torch.Generator().manual_seed(seed)
    parts = []
    start, cpu = time.perf_counter(), time.process_time()
    with Mp4Writer(mp4, fps=fps) as writer:
        for chunk in pipe.stream(prompt, num_frames=frames, generator=generator, **kwargs):
            writer.append(chunk)
            parts.append(chunk)
    seconds = time.perf_counter() - start
    video = np.concatenate(parts)
    return video, {"seconds": seconds, "cpu_seconds": time.process_time() - cpu, "frames_per_s": len(video) / seconds}


def strip_indices(frames: int, marks: list[int], total: int = 12) -> list[int]:
    """About ``total`` frame indices: evenly spread, plus the frame before and at each mark (a switch)."""
    around = sorted({f for m in marks for f in (m - 1, m)})
    even = np.linspace(0, frames - 1, max(2, total - len(around))).round().astype(int).tolist()
    return sorted(set(even) | set(around))


def bar_colour(prompt: str) -> tuple[int, int, int]:
    """The colour word of a prompt as RGB (grey when it names none)."""
    return next((rgb for word, rgb in BAR_COLOURS.items() if word in prompt.split()), (160, 160, 160))


def save_strip(video: np.ndarray, indices: list[int], segments: list[tuple[int, str]], path: Path,
               scale: int = 2) -> None:
    """One row of frames (upscaled ``scale`` x, nearest) with the frame number above each and a bar below in the
    colour of the prompt active at that frame; a white tick over the frames where a prompt begins."""
    from PIL import Image, ImageDraw

    h, w = video.shape[1] * scale, video.shape[2] * scale
    gap, label, bar = 4, 12, 6
    canvas = Image.new("RGB", (len(indices) * (w + gap) - gap, label + h + bar), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    starts = {s for s, _ in segments[1:]}
    for i, f in enumerate(indices):
        x = i * (w + gap)
        prompt = [p for s, p in segments if s <= f][-1]
        tile = Image.fromarray(video[f]).resize((w, h), Image.NEAREST)
        canvas.paste(tile, (x, label))
        draw.rectangle([x, label + h, x + w - 1, label + h + bar - 1], fill=bar_colour(prompt))
        text = f"{f}" + (" switch" if f in starts else "")
        draw.text((x + 2, 0), text, fill=(200, 0, 0) if f in starts else (0, 0, 0))
    canvas.save(path)


def colour_shares(video: np.ndarray, every: int = 12) -> list[dict]:
    """Share of red and of blue pixels in every ``every``-th frame: a number for when a switch shows. Saturated
    only (a channel > 120 and 60 above the others; blue 40 above green, as the sprite blue is (50, 90, 240)), so
    magenta and the dark backgrounds count as neither."""
    out = []
    for f in range(0, len(video), every):
        r, g, b = (video[f, ..., c].astype(int) for c in range(3))
        red = (r > 120) & (r > g + 60) & (r > b + 60)
        blue = (b > 120) & (b > r + 60) & (b > g + 40)
        out.append({"frame": f, "red": round(float(red.mean()), 4), "blue": round(float(blue.mean()), 4)})
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float | str:
    """PSNR (dB) of two uint8 images; the string "inf" when identical (JSON has no infinity)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return "inf" if mse == 0 else 10 * math.log10(255.0**2 / mse)


def db(value: float | str) -> str:
    """A PSNR for printing."""
    return f"{value} dB" if isinstance(value, str) else f"{value:.2f} dB"


def draw_input_image(size: int = 64) -> np.ndarray:
    """A red circle (radius 10 px) right of centre on a dark plain background, drawn as genkv.data draws sprites
    (red: the colour sprites-tiny follows best; on the right: room to move left, as the prompt asks)."""
    from genkv.data.sprites import COLORS

    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = INPUT_BACKGROUND
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    cx, cy, r = INPUT_CIRCLE
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = COLORS["red"]
    return img


def vae_round_trip(pipe, image: np.ndarray) -> np.ndarray:
    """The image through the VAE encoder (as image-to-video encodes it) and the streaming decoder: the best frame 0
    of an image-to-video render can be."""
    from genkv.pipelines.self_forcing.vae_stream import StreamingVAEDecoder, to_uint8_frames

    latents = pipe.encode_frames(image[None])
    return to_uint8_frames(StreamingVAEDecoder(pipe.vae).decode(latents))[0, 0].cpu().numpy()


def switch_example(pipe, out: Path, frames: int, seed: int, fps: float) -> dict:
    """The prompt-switch render, its strip and its record."""
    switches = [(f, p) for f, p in SWITCHES if f < frames]
    video, timing = render(pipe, FIRST_PROMPT, frames, seed, out / "switch.mp4", fps,
                           prompt_switches=switches, recache=True)
    segments = [(0, FIRST_PROMPT), *switches]
    indices = strip_indices(len(video), [f for f, _ in switches])
    save_strip(video, indices, segments, out / "switch_strip.png")
    return {"prompt": FIRST_PROMPT, "switches": switches, "recache": True, "frames": len(video), "seed": seed,
            **timing, "strip_frames": indices,
            "recached_latent_frames_last_switch": pipe.last_recached_frames,
            "colour_share_every_12_frames": colour_shares(video)}


def i2v_example(pipe, out: Path, frames: int, seed: int, fps: float) -> dict:
    """The image-to-video render, its strip, and frame 0 against the input and the VAE round trip."""
    from PIL import Image

    image = draw_input_image(pipe.config.default_height)
    Image.fromarray(image).resize((128, 128), Image.NEAREST).save(out / "i2v_input.png")
    video, timing = render(pipe, I2V_PROMPT, frames, seed, out / "i2v.mp4", fps, image=image)
    indices = strip_indices(len(video), [])
    save_strip(video, indices, [(0, I2V_PROMPT)], out / "i2v_strip.png")
    trip = vae_round_trip(pipe, image)
    return {"prompt": I2V_PROMPT, "image": f"drawn with numpy (draw_input_image): red circle (x, y, radius) "
            f"{INPUT_CIRCLE} px, background {INPUT_BACKGROUND}", "frames": len(video), "seed": seed, **timing,
            "strip_frames": indices,
            "psnr_frame0_vs_input_db": psnr(video[0], image),
            "psnr_frame0_vs_vae_round_trip_db": psnr(video[0], trip),
            "psnr_vae_round_trip_vs_input_db": psnr(trip, image),
            "colour_share_every_12_frames": colour_shares(video)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/streams"))
    parser.add_argument("--frames", type=int, default=480, help="frames of the prompt-switch render")
    parser.add_argument("--i2v-frames", type=int, default=96, help="frames of the image-to-video render")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); on a shared, loaded CPU 1 avoids OpenMP threads "
                        "waiting on each other (a 96-frame render took 9 min with 2 threads at load 10)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import genkv
    from genkv.zoo import load_shipped

    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = load_shipped("sprites-tiny", device="cpu")
    load_seconds = time.perf_counter() - start
    method, settings = default_method()
    genkv.apply_genkv(pipe, method)
    record = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "eval/stream_examples.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": "sprites-tiny", "device": "cpu", "dtype": "float32", "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "method": settings, "guidance_scale": getattr(pipe.config, "default_guidance_scale", 1.0), "fps": args.fps,
        "load_seconds": load_seconds,
    }
    record["switch"] = switch_example(pipe, args.out, args.frames, args.seed, args.fps)
    print(f"switch: {record['switch']['frames']} frames in {record['switch']['seconds']:.1f} s "
          f"({record['switch']['cpu_seconds']:.1f} CPU s)")
    record["i2v"] = i2v_example(pipe, args.out, args.i2v_frames, args.seed, args.fps)
    i2v = record["i2v"]
    print(f"i2v: {i2v['frames']} frames in {i2v['seconds']:.1f} s ({i2v['cpu_seconds']:.1f} CPU s); frame 0 PSNR "
          f"vs the input image {db(i2v['psnr_frame0_vs_input_db'])}, "
          f"vs the VAE round trip {db(i2v['psnr_frame0_vs_vae_round_trip_db'])} "
          f"(round trip vs input {db(i2v['psnr_vae_round_trip_vs_input_db'])})")
    (args.out / "streams.json").write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out}/: switch.mp4, switch_strip.png, i2v.mp4, i2v_strip.png, i2v_input.png, streams.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
