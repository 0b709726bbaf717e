"""What FP8 linears (``enable_fp8``, issue 20) cost in a real render: PSNR against the bf16 render of the shipped
``sprites-tiny`` model, same prompt, seed and method, over ``--frames`` frames.

Three renders: float32 (for scale), bf16, and bf16 with the transformer's block linears in FP8 e4m3. Prints the
per-frame PSNR of bf16 vs float32 and FP8 vs bf16 (mean, minimum, and over the first and last quarter: drift in a
long rollout shows up as a falling PSNR), and writes JSON. Runs on a CPU (FP8 GEMMs run there, slowly; the model
is tiny) or on a GPU with FP8 (compute capability 8.9+).

    python eval/fp8_fidelity.py --frames 240 --out runs/fp8_fidelity.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_json import write_result  # noqa: E402

PROMPTS = ("a red circle moving left", "a blue square moving right")


def render(dtype: torch.dtype, fp8: bool, prompt: str, frames: int, seed: int, method: str,
           device: torch.device) -> tuple[np.ndarray, float]:
    """One render of the shipped model as uint8 frames (T, H, W, 3), and its wall time in seconds."""
    import genkv
    from genkv.zoo import load_shipped

    pipe = load_shipped("sprites-tiny", device=str(device), dtype=dtype)
    pipe = genkv.apply_genkv(pipe, method)
    if fp8:
        pipe.enable_fp8(keep_originals=None)
    start = time.perf_counter()
    video = pipe(prompt, num_frames=frames, output_type="uint8",
                 generator=torch.Generator(device=device).manual_seed(seed)).frames[0]
    return np.asarray(video), time.perf_counter() - start


def summary(psnr: np.ndarray) -> dict:
    """Mean and minimum PSNR (dB; identical frames count as 100 dB), and the means of the first and last quarter."""
    capped = np.minimum(psnr, 100.0)
    quarter = max(1, len(capped) // 4)
    return {"mean_db": float(capped.mean()), "min_db": float(capped.min()),
            "first_quarter_db": float(capped[:quarter].mean()), "last_quarter_db": float(capped[-quarter:].mean())}


def main(argv: list[str] | None = None) -> int:
    from genkv.fp8 import fp8_supported
    from genkv.metrics.fidelity import psnr_per_frame

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", default="rolling", help="genkv method of all three renders")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    parser.add_argument("--out", type=Path, default=Path("fp8_fidelity.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    ok, reason = fp8_supported(device)
    if not ok:
        print(f"fp8_fidelity: {reason}", file=sys.stderr)
        return 2
    rows = []
    print(f"{'prompt':32s} {'bf16 vs fp32 mean/min dB':>26s} {'fp8 vs bf16 mean/min dB':>25s} "
          f"{'fp8 first/last quarter':>23s}")
    for prompt in args.prompts:
        fp32, _ = render(torch.float32, False, prompt, args.frames, args.seed, args.method, device)
        bf16, t_bf16 = render(torch.bfloat16, False, prompt, args.frames, args.seed, args.method, device)
        fp8, t_fp8 = render(torch.bfloat16, True, prompt, args.frames, args.seed, args.method, device)
        row = {"prompt": prompt, "frames": len(bf16), "bf16_vs_fp32": summary(psnr_per_frame(fp32, bf16)),
               "fp8_vs_bf16": summary(psnr_per_frame(bf16, fp8)), "seconds_bf16": t_bf16, "seconds_fp8": t_fp8}
        rows.append(row)
        a, b = row["bf16_vs_fp32"], row["fp8_vs_bf16"]
        print(f"{prompt[:32]:32s} {a['mean_db']:12.2f} / {a['min_db']:6.2f}     {b['mean_db']:12.2f} / "
              f"{b['min_db']:6.2f}   {b['first_quarter_db']:9.2f} / {b['last_quarter_db']:6.2f}")
    write_result(args.out, device, model="sprites-tiny", method=args.method, frames=args.frames, seed=args.seed,
                 fp8=reason, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
