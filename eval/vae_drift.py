"""Does a causal video VAE stay faithful over a long stream? Round-trip error against the frame index.

    python eval/vae_drift.py --out runs/vae_drift.json                       # sprites-tiny, 8 clips x 193 frames
    python eval/vae_drift.py --model tiny-random --clips 1 --frames 17 --out /tmp/drift.json
    python eval/vae_drift.py --model runs/vae.tar --frames 45 --out runs/vae45.json  # train_tiny --stop-after-vae

A causal VAE (Wan's) encodes and decodes with a temporal cache that runs warm for the whole video, so a VAE
trained on short clips can be exact over the first seconds and drift later, where the rollouts of
``eval/quality_rollout.py`` and ``eval/prompt_following.py`` spend most of their frames. This script encodes data
clips (``genkv.data``, the training data's settings by default) whole, as the training encodes its pool, decodes
the latents chunk by chunk with the pipeline's own ``StreamingVAEDecoder`` (what ``SelfForcingPipeline.stream``
does with the transformer's latents) and reports, per span of frames:

- **PSNR** of the round trip against the clip;
- **sprite colour error**: mean |dR| + |dG| + |dB| (0-255 levels) over the sprites' pixels;
- **latent magnitude**: mean |z| of the encoder's posterior mean per latent frame, in the units the transformer
  sees (normalised by the VAE config's ``latents_mean`` / ``latents_std``): a stationary encoder gives the same
  magnitude for every latent frame of a steady scene; a drifting one does not;
- **prompt following of the round trip** (``genkv.metrics.prompt_following`` over each whole clip, against the
  data's own): what a transformer that reproduced the encoder's latents exactly would score through this VAE
  (``eval/prompt_following.py``'s renders can score otherwise: a transformer's latents need not follow the
  encoder's drift over a long clip).

Prints a table and writes the per-frame series to JSON.
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
from quality_rollout import load_pipeline  # noqa: E402
from train_tiny import TRAINING_BACKGROUNDS, TRAINING_RADIUS, load_vae, sprite_pixels  # noqa: E402


def load_vae_under_test(model: str, device: torch.device, size: int | None) -> tuple:
    """(VAE, frame size) of ``model``: a bundled model, a model folder or ``tiny-random`` (its pipeline's VAE and
    default height), or a VAE alone, as ``train_tiny.py --stop-after-vae`` saves it (a folder holding ``vae/``
    without ``model_index.json``, the VAE folder itself, or a tar of either; frame size ``size``, default 64)."""
    path = Path(model)
    vae_alone = path.exists() and (path.suffix == ".tar" or not (path / "model_index.json").is_file())
    if vae_alone:
        return load_vae(path).to(device), size or 64
    pipe = load_pipeline(model, device)
    return pipe.vae, size or pipe.config.default_height

# The training clips' 45 frames in four parts (the first chunk's 9 frames, then 12 a chunk), then longer spans.
SPANS = ((0, 9), (9, 21), (21, 33), (33, 45), (45, 97), (97, 193), (193, None))


def round_trip_errors(frames: np.ndarray, decoded: np.ndarray) -> dict[str, np.ndarray]:
    """Per frame: ``psnr`` (dB, 255 peak) and ``sprite_rgb_error`` (mean |dR|+|dG|+|dB| over the sprites' pixels,
    NaN where a frame has none) of ``decoded`` against ``frames``, both (T, H, W, 3) uint8.

    Example:
        >>> a = np.zeros((2, 4, 4, 3), np.uint8); a[:, 1, 1] = 200
        >>> b = a.copy(); b[1, 1, 1] = (190, 200, 200)
        >>> err = round_trip_errors(a, b)
        >>> err["sprite_rgb_error"].tolist(), bool(np.isinf(err["psnr"][0]))
        ([0.0, 10.0], True)
    """
    diff = decoded.astype(np.float64) - frames.astype(np.float64)
    mse = (diff**2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        psnr = 10 * np.log10(255.0**2 / mse)
    video = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0  # (1, 3, T, H, W)
    mask = sprite_pixels(video)[0].numpy()  # (T, H, W)
    per_pixel = np.abs(diff).sum(-1)
    counts = mask.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        sprite = np.where(counts > 0, (per_pixel * mask).sum(axis=(1, 2)) / counts, np.nan)
    return {"psnr": psnr, "sprite_rgb_error": sprite}


@torch.no_grad()
def round_trip(vae, frames: np.ndarray, chunk: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``frames`` (T, H, W, 3) uint8 whole (posterior mean), decode the latents ``chunk`` latent frames at
    a time with the pipeline's streaming decoder; returns the decoded frames (uint8, same shape) and the mean
    |normalised latent| per latent frame."""
    from genkv.pipelines import StreamingVAEDecoder
    from genkv.pipelines.self_forcing.vae_stream import to_uint8_frames

    x = torch.from_numpy(frames).to(vae.device, vae.dtype).permute(3, 0, 1, 2)[None] / 127.5 - 1.0
    z = vae.encode(x).latent_dist.mode()
    decoder = StreamingVAEDecoder(vae)
    parts = [decoder.decode(z[:, :, i : i + chunk], normalized=False) for i in range(0, z.shape[2], chunk)]
    decoded = to_uint8_frames(torch.cat(parts, dim=2))[0].cpu().numpy()
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
    magnitude = ((z.float().cpu() - mean) / std).abs().mean(dim=(0, 1, 3, 4)).numpy()
    return decoded, magnitude


def span_means(series: np.ndarray, spans=SPANS) -> list[float | None]:
    """Mean of a per-frame series over each span that the series reaches (NaN frames ignored)."""
    out = []
    for lo, hi in spans:
        part = series[lo:hi]
        finite = part[np.isfinite(part)]
        out.append(float(finite.mean()) if lo < len(series) and len(finite) else None)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sprites-tiny",
                        help="a bundled model, a model folder, tiny-random, or a VAE alone (train_tiny.py "
                        "--stop-after-vae: its folder or tar)")
    parser.add_argument("--size", type=int, default=None,
                        help="frame size of the clips (default: the model's; 64 for a VAE alone)")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--frames", type=int, default=193, help="frames per clip (4k + 1 keeps every latent whole)")
    parser.add_argument("--max-objects", type=int, default=2)
    parser.add_argument("--backgrounds", nargs="+", default=list(TRAINING_BACKGROUNDS))
    parser.add_argument("--radius", type=float, nargs=2, default=list(TRAINING_RADIUS), metavar=("LOW", "HIGH"),
                        help="sprite radius range (fractions of the frame): the training data's by default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.frames < 1 or args.clips < 1:
        parser.error("--frames and --clips must be positive")

    from genkv.data import make_video
    from genkv.metrics.prompt_following import prompt_following, summarize

    vae, size = load_vae_under_test(args.model, torch.device(args.device), args.size)
    vae = vae.eval()
    series = {"psnr": [], "sprite_rgb_error": [], "latent_magnitude": []}
    # The prompt-following measures of the round-tripped clips, next to the data's: what a transformer that
    # reproduced the encoder's latents exactly would score through this VAE.
    following = {"round_trip": [], "data": []}
    start = time.perf_counter()
    for seed in range(args.clips):
        video = make_video(seed=seed, num_frames=args.frames, size=size, max_objects=args.max_objects,
                           backgrounds=tuple(args.backgrounds), radius=tuple(args.radius))
        decoded, magnitude = round_trip(vae, video.frames)
        errors = round_trip_errors(video.frames, decoded)
        for key in ("psnr", "sprite_rgb_error"):
            series[key].append(errors[key])
        series["latent_magnitude"].append(magnitude)
        following["round_trip"].append(prompt_following(decoded, video.prompt))
        following["data"].append(prompt_following(video.frames, video.prompt))
        print(f"clip {seed + 1}/{args.clips}: {time.perf_counter() - start:.0f} s", flush=True)
    mean = {key: np.nanmean(np.stack(v), axis=0) for key, v in series.items()}
    spans = [(lo, hi if hi is not None else args.frames) for lo, hi in SPANS if lo < args.frames]
    latent_of = lambda frame: (frame + 3) // 4  # noqa: E731  (Wan: frame 0 alone, then 4 frames a latent)
    latent_spans = [(latent_of(lo), latent_of(hi - 1) + 1) for lo, hi in spans]
    table = {
        "frames": [f"{lo}-{min(hi, args.frames) - 1}" for lo, hi in spans],
        "psnr": span_means(mean["psnr"], spans),
        "sprite_rgb_error": span_means(mean["sprite_rgb_error"], spans),
        "latent_magnitude": span_means(mean["latent_magnitude"], latent_spans),
    }
    result = {"model": args.model, "clips": args.clips, "frames": args.frames, "max_objects": args.max_objects,
              "backgrounds": args.backgrounds, "radius": args.radius, "spans": table,
              "prompt_following": {key: summarize(reports) for key, reports in following.items()},
              "per_frame": {key: [None if not np.isfinite(v) else float(v) for v in values]
                            for key, values in mean.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\n{'frames':>10s} {'PSNR dB':>8s} {'sprite |dRGB|':>14s} {'mean |z|':>9s}")
    for i, label in enumerate(table["frames"]):
        cells = [table[k][i] for k in ("psnr", "sprite_rgb_error", "latent_magnitude")]
        print(f"{label:>10s} " + " ".join(f"{c:{w}.2f}" if c is not None else f"{'-':>{w}s}"
                                          for c, w in zip(cells, (8, 14, 9))))
    trip, data = result["prompt_following"]["round_trip"], result["prompt_following"]["data"]
    print(f"\nprompt following of the round trip (the data): "
          + ", ".join(f"{c} {trip['colour_present'][c]:.2f} ({data['colour_present'][c]:.2f})"
                      for c in data["colour_present"]) + " present where asked")
    for key in ("two_sprites_both_present", "axis_matches_quarter", "edge_energy"):
        if data[key] is not None:
            print(f"  {key}: {trip[key]:.2f} ({data[key]:.2f})")
    print(f"json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
