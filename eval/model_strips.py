"""Strips of a sprite model's renders for the model card: every 6th frame of each prompt, one row per seed.

    python eval/model_strips.py --out docs/benchmarks/sprites_tiny_v2          # the shipped model, 8 prompts
    python eval/model_strips.py --model path/to/model --frames 96 --seeds 0 1 --out /tmp/strips

Writes ``<out>/<nn>-<prompt>.png`` per prompt and ``<out>/strips.json`` (model, prompts, seeds, frames, seconds).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = (
    "a red circle moving left",
    "a blue square moving down",
    "a green circle moving up",
    "a yellow triangle moving right",
    "a white square moving diagonally",
    "a magenta triangle moving left",
    "a red circle moving left and a blue square moving down",
    "a green square moving right and a yellow circle moving up",
)


def load(model: str):
    from genkv.pipelines import SelfForcingPipeline
    from genkv.zoo import SHIPPED, load_shipped

    if model == "tiny-random":  # random weights: a check of the script, not a model
        from genkv.testing import tiny_self_forcing_pipeline

        return tiny_self_forcing_pipeline(seed=0)
    if model in SHIPPED:
        return load_shipped(model)
    return SelfForcingPipeline.from_pretrained(model, torch_dtype=torch.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sprites-tiny", help="a bundled model, a model folder, or tiny-random")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--every", type=int, default=6, help="frames between strip frames")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import imageio.v3 as iio

    pipe = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    files = []
    for index, prompt in enumerate(args.prompts):
        rows = []
        for seed in args.seeds:
            video = pipe(prompt, num_frames=args.frames, output_type="uint8",
                         generator=torch.Generator().manual_seed(seed)).frames[0]
            rows.append(np.concatenate(list(video[:: args.every]), axis=1))
        name = f"{index:02d}-{re.sub(r'[^a-z0-9]+', '-', prompt.lower()).strip('-')}.png"
        iio.imwrite(args.out / name, np.concatenate(rows, axis=0))
        files.append({"prompt": prompt, "file": name})
        print(f"{name}", flush=True)
    (args.out / "strips.json").write_text(json.dumps({
        "model": args.model, "seeds": args.seeds, "frames": args.frames, "every": args.every,
        "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__, "strips": files}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
