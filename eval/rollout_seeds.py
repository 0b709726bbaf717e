"""Long-rollout motion and persistence of each method over several seeds, no reference render needed.

    python eval/rollout_seeds.py --frames 1000 --seeds 1 2 3 4 5 6 --methods tempcache:budget_frames=3 \
        tempcache:budget_frames=3,max_count=3 --out runs/seeds.json

``eval/quality_rollout.py`` compares methods on one seed against a `full` render. What a long rollout does to a
method (does the render keep moving? keep its sprites?) needs several seeds, and those measures need no
reference: per (method, seed) this renders the video (``quality_rollout``'s render, decode and measures) and keeps
the median sprite step in pixels per frame, colour regions per frame (all, frames 500-800, the last 100; None for a
span the video does not reach), track breaks, sprites kept to the end and flicker. Prints the mean over seeds per
method and writes JSON after every video; a rerun with the same ``--out`` (and settings) skips the (method, seed)
pairs already there, so a run cut short resumes. `full` is a method like any other here (slow on the CPU: its cache
grows with the video).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import check_specs  # noqa: E402
from quality_rollout import decode_chunks, load_pipeline, measure, teacher_forced_latents  # noqa: E402

#: The per-video figures averaged over seeds in the printed table (and kept per video in the JSON).
SUMMARY = ("median_step_px", "regions_mean", "regions_500_800", "regions_last100", "track_breaks", "objects_kept",
           "flicker")
#: What a file's rows were measured under: a rerun with other settings must not add to them.
SETTINGS = ("model", "prompt", "frames", "fps", "device")


def video_row(video: np.ndarray, fps: float) -> dict:
    """The reference-free figures of one video (uint8 (T, H, W, 3))."""
    measured = measure(video, None, fps)
    persistence = measured["persistence"]
    regions = np.asarray(persistence["objects_per_frame"], dtype=np.float64)
    return {
        "median_step_px": persistence["median_step_px"],
        "regions_mean": float(regions.mean()),
        "regions_500_800": float(regions[500:800].mean()) if len(regions) >= 800 else None,
        "regions_last100": float(regions[-100:].mean()) if len(regions) >= 100 else None,
        "track_breaks": persistence["track_breaks"],
        "objects_first_second": persistence["objects_first_second"],
        "objects_kept": persistence["objects_kept"],
        "flicker": float(np.mean(measured["flicker"])) if len(measured["flicker"]) else None,
        "objects_per_frame": persistence["objects_per_frame"],
    }


def summarize(rows: dict, specs: list[str]) -> dict:
    """Per method: the seeds measured and the mean over them of each :data:`SUMMARY` figure (None where a
    figure is missing, e.g. frames 500-800 of a shorter video)."""
    out = {}
    for spec in specs:
        mine = {int(key.rsplit("@", 1)[1]): row for key, row in rows.items() if key.rsplit("@", 1)[0] == spec}
        if not mine:
            continue
        out[spec] = {"seeds": sorted(mine)}
        for name in SUMMARY:
            values = [row[name] for row in mine.values() if row[name] is not None]
            out[spec][name] = float(np.mean(values)) if len(values) == len(mine) else None
    return out


def _save(path: Path, payload: dict) -> None:
    """Write through a temporary file: a run killed mid-write leaves the previous JSON, which a rerun resumes."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=1))
    os.replace(partial, path)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    """Measure every (method, seed) pair not yet in ``--out``, then print the means over seeds."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sprites-tiny",
                        help="a bundled model (sprites-tiny), a SelfForcingPipeline folder, or tiny-random (plumbing)")
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--prompt", default="a red circle moving left and a blue square moving down")
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("rollout_seeds.json"))
    args = parser.parse_args(argv)
    check_specs(parser, args.methods)
    device = torch.device(args.device)
    payload = {"model": args.model, "prompt": args.prompt, "frames": args.frames, "fps": args.fps,
               "device": str(device), "rows": {}}
    if args.out.exists():  # resume: the pairs already measured under the same settings are kept
        previous = json.loads(args.out.read_text())
        differ = [name for name in SETTINGS if previous.get(name) != payload[name]]
        if differ:
            parser.error(f"{args.out} holds a run with other {', '.join(differ)}: pick another --out")
        payload["rows"] = previous.get("rows", {})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model, device)
    rows = payload["rows"]
    for seed in args.seeds:
        for spec in args.methods:
            key = f"{spec}@{seed}"
            if key in rows:
                continue
            start = time.perf_counter()
            chunks = teacher_forced_latents(pipe, spec, args.prompt, args.frames, seed, device, None)
            rows[key] = video_row(decode_chunks(pipe, chunks, args.frames), args.fps)
            rows[key]["seconds"] = time.perf_counter() - start
            print(f"{key}: {rows[key]['seconds']:.0f} s, median step {_cell(rows[key]['median_step_px'])} px, "
                  f"regions {_cell(rows[key]['regions_mean'])}", flush=True)
            payload["summary"] = summarize(rows, args.methods)
            _save(args.out, payload)
    payload["summary"] = summarize(rows, args.methods)
    _save(args.out, payload)
    print(f"{'method':44s} {'seeds':>5s} " + " ".join(f"{name:>15s}" for name in SUMMARY))
    for spec, summary in payload["summary"].items():
        cells = " ".join(f"{_cell(summary[name]):>15s}" for name in SUMMARY)
        print(f"{spec:44s} {len(summary['seeds']):5d} {cells}")
    print(f"json: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
