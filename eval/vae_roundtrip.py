"""How much a sprite model's VAE alone loses: encode training-like clips, decode them, measure (issue 24).

    python eval/vae_roundtrip.py --out runs/vae_roundtrip.json                          # the shipped sprites-tiny
    python eval/vae_roundtrip.py --model runs/m --model genkv/assets/sprites-tiny --clips 48 --out F   # side by side

Every render of a sprite model passes through its VAE decoder, so the decoder's round trip bounds what any
transformer can reach: a decoder that blurs edges caps sharpness (edge energy), one that misplaces colour channels
shows colours the prompt did not ask for. The clips are ``genkv.data.make_video`` seeds 0, 1, ... drawn like the
training clips (up to two sprites, plain backgrounds, ``train_tiny``'s radius); each is encoded to its posterior
mean (the latents the transformer was trained on) and decoded whole. Reported per model: PSNR against the clip,
edge energy against the clip's, and the prompt-following measures of the decoded clip against its own prompt
(``genkv.metrics.prompt_following``), so a decoder's stray colour reads on the scale of the 32 x 2 protocol.
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
from train_tiny import TRAINING_BACKGROUNDS, TRAINING_RADIUS, to_video_tensor  # noqa: E402


@torch.no_grad()
def round_trip(vae, frames: np.ndarray) -> np.ndarray:
    """One clip (T, H, W, 3) uint8 through ``vae``: posterior mean, decoded whole, back to uint8."""
    from genkv.pipelines.self_forcing.vae_stream import to_uint8_frames

    x = to_video_tensor(frames[None], next(vae.parameters()).device)
    z = vae.encode(x).latent_dist.mean
    return to_uint8_frames(vae.decode(z).sample)[0].cpu().numpy()


def measure(model: str, clips: list, device: torch.device) -> dict:
    """The round trip of every clip through ``model``'s VAE, summarised."""
    from genkv.metrics.fidelity import psnr_per_frame
    from genkv.metrics.prompt_following import edge_energy, prompt_following, summarize

    vae = load_pipeline(model, device).vae.to(torch.float32).eval()
    psnr, edges, reports = [], [], []
    for video in clips:
        out = round_trip(vae, video.frames)
        psnr.append(float(np.mean(psnr_per_frame(video.frames, out))))
        edges.append(edge_energy(out))
        reports.append(prompt_following(out, video.prompt))
    summary = summarize(reports)
    return {"model": model, "psnr_db": float(np.mean(psnr)), "edge_energy": float(np.mean(edges)),
            "colour_shown_unasked": summary["colour_shown_unasked"], "colour_present": summary["colour_present"],
            "psnr_per_clip": psnr}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None,
                        help="a bundled model or a model folder; repeat to compare (default sprites-tiny)")
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--frames", type=int, default=21, help="frames per clip (4k + 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.clips < 1 or (args.frames - 1) % 4:
        parser.error(f"--clips {args.clips} --frames {args.frames}: at least one clip of 4k + 1 frames")
    models = args.model or ["sprites-tiny"]

    from genkv.data import make_video
    from genkv.metrics.prompt_following import edge_energy

    clips = [make_video(seed=s, num_frames=args.frames, max_objects=2, backgrounds=tuple(TRAINING_BACKGROUNDS),
                        radius=tuple(TRAINING_RADIUS)) for s in range(args.clips)]
    result = {"clips": args.clips, "frames": args.frames,
              "data_edge_energy": float(np.mean([edge_energy(v.frames) for v in clips])), "models": []}
    start = time.perf_counter()
    for model in models:
        result["models"].append(measure(model, clips, torch.device(args.device)))
        print(f"{model}: {time.perf_counter() - start:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    colours = sorted({c for m in result["models"] for c in m["colour_shown_unasked"]})
    print(f"\n{'model':40s} {'PSNR dB':>8s} {'edges':>7s} " + " ".join(f"{c[:7]:>7s}" for c in colours)
          + "   (edges: data " + f"{result['data_edge_energy']:.0f}; colours: shown where not asked)")
    for m in result["models"]:
        print(f"{m['model'][-40:]:40s} {m['psnr_db']:8.2f} {m['edge_energy']:7.1f} "
              + " ".join(f"{m['colour_shown_unasked'].get(c, float('nan')):7.3f}" for c in colours))
    print(f"json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
