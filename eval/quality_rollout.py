"""Long-rollout quality of each method against the `full` cache, with measures that need no downloaded network.

    python eval/quality_rollout.py --model path/to/sprite-model --methods full rolling tempcache fastar \
        --frames 1000 --prompt "a red circle moving left and a blue square moving down" --out runs/quality.json

Renders one video per method from the same prompt and seed (the same initial noise), then per frame: PSNR and
SSIM against the `full` render, sprite persistence by colour (objects present, track breaks, colour drift; see
``genkv.metrics.persistence``) and temporal flicker. Prints a table, writes JSON and (with matplotlib) a plot of
each measure against frame index. ``--model tiny-random`` runs anywhere in seconds (its videos are noise, so
only the plumbing is checked); the measures mean something on a trained sprite model (``eval/train_tiny.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import parse_spec  # noqa: E402


def load_pipeline(model: str, device: torch.device):
    if model == "tiny-random":
        from genkv.testing import tiny_self_forcing_pipeline

        return tiny_self_forcing_pipeline(seed=0, device=device)
    from genkv.pipelines import SelfForcingPipeline

    return SelfForcingPipeline.from_pretrained(model, torch_dtype=torch.float32).to(device)


def render(pipe, spec: str, prompt: str, frames: int, seed: int, device: torch.device) -> np.ndarray:
    import genkv

    genkv.apply_genkv(pipe, parse_spec(spec))
    generator = torch.Generator(device=device).manual_seed(seed)
    video = pipe(prompt=prompt, num_frames=frames, output_type="np", generator=generator).frames[0]
    genkv.remove_genkv(pipe)
    return (np.asarray(video) * 255).round().clip(0, 255).astype(np.uint8)


def measure(video: np.ndarray, reference: np.ndarray | None, fps: float) -> dict:
    from genkv.metrics.fidelity import finite_mean, psnr_per_frame, ssim_per_frame
    from genkv.metrics.persistence import flicker_per_frame, object_persistence

    out = {"persistence": object_persistence(video, fps=fps), "flicker": flicker_per_frame(video).tolist()}
    if reference is not None:
        psnr = psnr_per_frame(reference, video)
        ssim = ssim_per_frame(reference, video)
        out.update(psnr=[float(x) for x in psnr], ssim=[float(x) for x in ssim],
                   psnr_mean=finite_mean(psnr), ssim_mean=finite_mean(ssim))
    return out


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.5))
    for spec, r in results.items():
        if "psnr" in r:
            axes[0].plot(np.minimum(r["psnr"], 60), label=spec)
            axes[1].plot(r["ssim"], label=spec)
        axes[2].plot(r["persistence"]["objects_per_frame"], label=spec)
        axes[3].plot(r["flicker"], label=spec)
    for ax, title in zip(axes, ("PSNR vs full (dB, capped 60)", "SSIM vs full", "sprites present", "flicker")):
        ax.set_title(title)
        ax.set_xlabel("frame")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random", help="a SelfForcingPipeline folder or tiny-random")
    parser.add_argument("--methods", nargs="+", default=["full", "rolling:window_frames=6", "tempcache:budget_frames=3",
                                                         "fastar:budget_frames=3,top_k=2,prompt_top_k=4"])
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--prompt", default="a red circle moving left and a blue square moving down")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("quality_rollout.json"))
    args = parser.parse_args(argv)
    if parse_spec(args.methods[0]).name != "full":
        parser.error("the first --methods entry must be full (the reference)")
    device = torch.device(args.device)
    pipe = load_pipeline(args.model, device)
    results, reference = {}, None
    for spec in args.methods:
        start = time.perf_counter()
        video = render(pipe, spec, args.prompt, args.frames, args.seed, device)
        results[spec] = measure(video, reference, args.fps) | {"seconds": time.perf_counter() - start}
        psnr = results[spec].get("psnr_mean")
        print(f"{spec}: {len(video)} frames in {results[spec]['seconds']:.0f} s"
              + (f", PSNR vs full {psnr:.2f} dB" if psnr is not None else " (the reference)"), flush=True)
        reference = video if reference is None else reference
    print(f"{'method':44s} {'PSNR':>7s} {'SSIM':>6s} {'kept':>5s} {'breaks':>6s} {'drift':>6s} {'flicker':>7s}")
    for spec, r in results.items():
        p = r["persistence"]
        psnr = f"{r['psnr_mean']:.2f}" if r.get("psnr_mean") is not None else "ref"
        ssim = f"{r['ssim_mean']:.3f}" if r.get("ssim_mean") is not None else "-"
        drift = f"{p['colour_drift_l1']:.1f}" if p["colour_drift_l1"] is not None else "-"
        print(f"{spec:44s} {psnr:>7s} {ssim:>6s} {p['objects_kept']:>2d}/{p['objects_first_second']:<2d} "
              f"{p['track_breaks']:>6d} {drift:>6s} {np.mean(r['flicker']):7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": args.model, "prompt": args.prompt, "frames": args.frames, "seed": args.seed,
               "device": str(device), "results": results}
    args.out.write_text(json.dumps(payload, indent=1))
    drawn = plot(results, args.out.with_suffix(".png"))
    print(f"json: {args.out}" + (f"; plot: {args.out.with_suffix('.png')}" if drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
