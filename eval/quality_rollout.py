"""Long-rollout quality of each method against the `full` cache, with measures that need no downloaded network.

    python eval/quality_rollout.py --methods full rolling tempcache fastar --teacher-forced \
        --frames 1000 --prompt "a red circle moving left and a blue square moving down" --out runs/quality.json

Renders one video per method from the same prompt and seed (the same initial noise), then per frame: PSNR and
SSIM against the `full` render, sprite persistence by colour (objects present, track breaks, colour drift; see
``genkv.metrics.persistence``) and temporal flicker. Prints a table, writes JSON and (with matplotlib) a plot of
each measure against frame index. The default model is the bundled, trained ``sprites-tiny``; ``--model
tiny-random`` runs in seconds (its videos are noise, so only the plumbing is checked).
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
from bench_rollout import check_specs, parse_spec  # noqa: E402


def load_pipeline(model: str, device: torch.device):
    from genkv.zoo import SHIPPED, load_shipped

    if model in SHIPPED and not Path(model).exists():
        return load_shipped(model, device=str(device), dtype=torch.float32)
    if model == "tiny-random":
        from genkv.testing import tiny_self_forcing_pipeline

        return tiny_self_forcing_pipeline(seed=0, device=device)
    from genkv.pipelines import SelfForcingPipeline

    return SelfForcingPipeline.from_pretrained(model, torch_dtype=torch.float32).to(device)


def decode_chunks(pipe, chunks: list[torch.Tensor], frames: int) -> np.ndarray:
    """uint8 (T, H, W, 3) frames of a rollout's chunk latents, streamed through the VAE as ``pipe.stream`` does."""
    from genkv.pipelines import StreamingVAEDecoder
    from genkv.pipelines.self_forcing.vae_stream import to_uint8_frames

    decoder = StreamingVAEDecoder(pipe.vae, frames_per_call=pipe.decode_frames_per_call)
    with torch.no_grad():
        video = np.concatenate([to_uint8_frames(decoder.decode(c))[0].cpu().numpy() for c in chunks])
    return video[:frames]


def teacher_forced_latents(pipe, spec: str, prompt: str, frames: int, seed: int, device: torch.device,
                           history: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Each chunk's clean latents under ``spec``, the cache fed ``history`` (the full cache's chunks) instead of
    its own output; ``history=None`` feeds it its own output (how the full reference itself is made)."""
    import genkv

    genkv.apply_genkv(pipe, parse_spec(spec))
    guidance = getattr(pipe.config, "default_guidance_scale", 1.0)
    embeds, negative = pipe._prepare_embeds(prompt, None, None, None, guidance)
    fed = None if history is None else torch.cat(history, dim=2)
    commit = None if fed is None else (lambda start, x0: fed[:, :, start : start + x0.shape[2]])
    out = list(pipe.rollout(embeds, pipe.latent_frames_for(frames), pipe.config.default_height,
                            pipe.config.default_width, negative_embeds=negative, guidance_scale=guidance,
                            generator=torch.Generator(device=device).manual_seed(seed), commit_latents=commit))
    genkv.remove_genkv(pipe)
    return out


def psnr_of_mean_error(psnr: list[float]) -> float:
    """PSNR of the mean squared error over frames (identical frames count as error 0; ``inf`` if all are)."""
    mse = np.mean([0.0 if not np.isfinite(p) else 255.0**2 / 10 ** (p / 10) for p in psnr])
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def teacher_forced_psnr(pipe, history: list[torch.Tensor], chunks: list[torch.Tensor]) -> list[float]:
    """Per-frame PSNR of each chunk decoded after the full video's previous chunks (the VAE's causal cache is the
    full video's) against the full video's own chunk: the error a method adds in one chunk, not compounded."""
    import copy

    from genkv.metrics.fidelity import psnr_per_frame
    from genkv.pipelines import StreamingVAEDecoder
    from genkv.pipelines.self_forcing.vae_stream import to_uint8_frames

    decoder = StreamingVAEDecoder(pipe.vae, frames_per_call=pipe.decode_frames_per_call)
    psnr: list[float] = []
    with torch.no_grad():
        for reference, candidate in zip(history, chunks):
            fork = copy.copy(decoder)  # the cache entries are replaced, not written into: a list copy forks it
            fork._feat_map = list(decoder._feat_map)
            got = to_uint8_frames(fork.decode(candidate))[0].cpu().numpy()
            want = to_uint8_frames(decoder.decode(reference))[0].cpu().numpy()
            psnr.extend(float(x) for x in psnr_per_frame(want, got))
    return psnr


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
    # One colour per method in every panel: the reference has no PSNR / SSIM curve, so the default colour cycle
    # would give a method one colour in the first two panels and another in the last two.
    for i, (spec, r) in enumerate(results.items()):
        colour = f"C{i}"
        if "psnr" in r:
            axes[0].plot(np.minimum(r["psnr"], 60), label=spec, color=colour)
            axes[1].plot(r["ssim"], label=spec, color=colour)
        axes[2].plot(r["persistence"]["objects_per_frame"], label=spec, color=colour)
        axes[3].plot(r["flicker"], label=spec, color=colour)
    for ax, title in zip(axes, ("PSNR vs full (dB, capped 60)", "SSIM vs full", "sprites present", "flicker")):
        ax.set_title(title)
        ax.set_xlabel("frame")
    axes[3].legend(fontsize=7)  # the last panel has every method, the reference too
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sprites-tiny",
                        help="a bundled model (sprites-tiny), a SelfForcingPipeline folder, or tiny-random (plumbing)")
    parser.add_argument("--methods", nargs="+", default=["full", "rolling:window_frames=6", "tempcache:budget_frames=3",
                                                         "fastar:budget_frames=3,top_k=2,prompt_top_k=4"])
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--prompt", default="a red circle moving left and a blue square moving down")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("quality_rollout.json"))
    parser.add_argument("--teacher-forced", action="store_true",
                        help="also: each method's chunks with the full render's history in its cache, PSNR vs full "
                             "per chunk (one chunk's error, not compounded by diverging trajectories)")
    args = parser.parse_args(argv)
    check_specs(parser, args.methods)
    if parse_spec(args.methods[0]).name != "full":
        parser.error("the first --methods entry must be full (the reference)")
    device = torch.device(args.device)
    pipe = load_pipeline(args.model, device)
    results, reference, history = {}, None, None
    payload = {"model": args.model, "prompt": args.prompt, "frames": args.frames, "seed": args.seed,
               "device": str(device), "complete": False, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        # After every method, so a run stopped by a later method (an error, a time limit) keeps what it measured;
        # "complete" turns true only at the end.
        args.out.write_text(json.dumps(payload, indent=1))

    save()  # at once: an older file at --out must not outlive a run that stops at its first method
    for spec in args.methods:
        # Each method's free-running render as chunk latents (the same rollout `pipe(...)` runs, same seed and
        # noise), decoded as the pipeline streams them; full's latents are also the teacher-forced history, so
        # the longest render is done once.
        start = time.perf_counter()
        chunks = teacher_forced_latents(pipe, spec, args.prompt, args.frames, args.seed, device, None)
        video = decode_chunks(pipe, chunks, args.frames)
        results[spec] = measure(video, reference, args.fps) | {"seconds": time.perf_counter() - start}
        psnr = results[spec].get("psnr_mean")
        print(f"{spec}: {len(video)} frames in {results[spec]['seconds']:.0f} s"
              + (f", PSNR vs full {psnr:.2f} dB" if psnr is not None else " (the reference)"), flush=True)
        if reference is None:
            reference, history = video, chunks
        save()
    if args.teacher_forced:
        for spec in args.methods[1:]:
            start = time.perf_counter()
            chunks = teacher_forced_latents(pipe, spec, args.prompt, args.frames, args.seed, device, history)
            psnr = teacher_forced_psnr(pipe, history, chunks)[: args.frames]
            results[spec]["teacher_forced_psnr"] = psnr
            results[spec]["teacher_forced_psnr_mean"] = psnr_of_mean_error(psnr)
            print(f"{spec}: teacher-forced PSNR vs full {results[spec]['teacher_forced_psnr_mean']:.2f} dB "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            save()
    print(f"{'method':44s} {'PSNR':>7s} {'SSIM':>6s} {'kept':>5s} {'breaks':>6s} {'drift':>6s} {'flicker':>7s}"
          + (f" {'TF PSNR':>8s}" if args.teacher_forced else ""))
    for spec, r in results.items():
        p = r["persistence"]
        psnr = f"{r['psnr_mean']:.2f}" if r.get("psnr_mean") is not None else "ref"
        ssim = f"{r['ssim_mean']:.3f}" if r.get("ssim_mean") is not None else "-"
        drift = f"{p['colour_drift_l1']:.1f}" if p["colour_drift_l1"] is not None else "-"
        print(f"{spec:44s} {psnr:>7s} {ssim:>6s} {p['objects_kept']:>2d}/{p['objects_first_second']:<2d} "
              f"{p['track_breaks']:>6d} {drift:>6s} {np.mean(r['flicker']):7.2f}"
              + (f" {r['teacher_forced_psnr_mean']:8.2f}" if r.get("teacher_forced_psnr_mean") is not None else ""))
    payload["complete"] = True
    save()
    drawn = plot(results, args.out.with_suffix(".png"))
    print(f"json: {args.out}" + (f"; plot: {args.out.with_suffix('.png')}" if drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
