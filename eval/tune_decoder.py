"""Repair a causal video VAE's decoder for long streams, on a CPU: truncated backprop through the streamed decode.

    python eval/tune_decoder.py --model genkv/assets/sprites-tiny --out runs/sprites-tiny-dec --minutes 60
    python eval/vae_drift.py --model runs/sprites-tiny-dec --out runs/vae_drift_dec.json        # then measure it
    python eval/tune_decoder.py --model tiny-random --out /tmp/dec --clips 2 --max-steps 2   # seconds (check)

Why: ``eval/vae_drift.py`` shows sprites-tiny v2's VAE faithful only while its temporal cache is cold (21 dB
over frames 0-8, 14 dB from frame 45, yellow read back as magenta): it trained on 45-frame clips, and a stream
of hundreds of frames runs warm from the ninth latent frame on. ``train_tiny.py --decoder-minutes`` repairs a
decoder on whole clips, but a whole 105-frame clip costs 8-20 s forward and backward on two CPU cores.
This script trains the decoder the way the pipeline runs it: chunk by chunk, its causal cache carried across
chunks (:class:`~genkv.pipelines.StreamingVAEDecoder` itself, its gradients kept for the window). For each clip
it picks a window of ``--window`` chunks at a random position, decodes the chunks before it without gradients
(they only warm the cache) and the window with them, and takes the loss on the window's frames only. A window
at the start trains the cold regime, one late in the clip the warm regime; gradients do not flow back into the
warm-up (truncated backprop, as in recurrent nets), so a step costs a forward pass over the warm-up plus a short
backward pass.

The encoder is frozen (the transformer was trained on its latents, whose meaning must not change), so the
clips are encoded once up front, whole, as ``train_tiny`` encodes its pool; each step samples from the stored
posterior (the slack for generated latents ``train_tiny``'s decoder phase also gives). The loss is
``train_tiny.reconstruction_loss`` with the sprites' pixels weighted ``--sprite-weight`` times.

Writes a copy of the model folder with the tuned VAE (fp16, as ``train_tiny`` saves) and, with ``--log``, the
training log as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny import (CHUNK, TRAINING_BACKGROUNDS, TRAINING_RADIUS, make_pool, reconstruction_loss,  # noqa: E402
                        sprite_rgb_error, to_video_tensor)

from genkv.pipelines import StreamingVAEDecoder  # noqa: E402


def pixel_span(first: int, stop: int) -> tuple[int, int]:
    """Pixel frames decoded from latent frames ``first``..``stop - 1`` (Wan: latent 0 gives 1 frame, later ones 4).

    Example:
        >>> pixel_span(0, 3), pixel_span(3, 6), pixel_span(6, 9)
        ((0, 9), (9, 21), (21, 33))
    """
    def end(n: int) -> int:
        return 0 if n == 0 else 1 + 4 * (n - 1)

    return end(first), end(stop)


def decode_window(vae, z: torch.Tensor, window_start: int, window_stop: int) -> torch.Tensor:
    """Pixels of latent frames ``window_start``..``window_stop - 1`` of the video ``z`` (B, C, T, h, w; raw, not
    normalised), decoded as a stream from frame 0 by :class:`~genkv.pipelines.StreamingVAEDecoder`, one call a
    chunk as the pipeline calls it: the chunks before the window warm the cache without gradients, the window's
    own chunks keep theirs. ``window_start`` is a chunk boundary.

    Example:
        >>> import torch
        >>> from genkv.testing import tiny_wan_vae
        >>> decode_window(tiny_wan_vae(), torch.randn(1, 16, 9, 2, 2), 3, 6).shape   # frames 9-20 of 33
        torch.Size([1, 3, 12, 16, 16])
    """
    if window_start % CHUNK:
        raise ValueError(f"window_start {window_start} must be a multiple of the chunk ({CHUNK} latent frames)")
    stream = StreamingVAEDecoder(vae)
    for start in range(0, window_start, CHUNK):
        stream.decode(z[:, :, start : start + CHUNK], normalized=False)
    parts = [stream.decode(z[:, :, start : min(window_stop, start + CHUNK)], normalized=False, differentiable=True)
             for start in range(window_start, window_stop, CHUNK)]
    return torch.cat(parts, dim=2)


def window_loss(recon: torch.Tensor, x: torch.Tensor, first_latent: int, sprite_weight: float,
                first_frame_weight: float = 1.0, edge_weight: float = 0.0) -> torch.Tensor:
    """``train_tiny.reconstruction_loss`` over a window's frames, the video's frame 0 (in a window at the start)
    weighted ``first_frame_weight`` times the others.

    Why: frame 0 is decoded alone from a cold cache (the one latent frame that holds one pixel frame), and it is
    the frame image-to-video shows first and a single-image round trip reproduces. A window of one chunk holds 9
    frames at the start and windows start there a quarter of the time (45-frame clips), so frame 0 is 1/36 of the
    signal: m3d (m3 with its decoder tuned that way) round-tripped a single image (a red circle) at 19.7 dB, v2
    at 26.3. Weighting it 9 times gives it about as much as the other 8 frames of its chunk together.

    The frame weight is exact at ``sprite_weight`` 1; above it each of the two terms normalises its own sprite
    weights (``reconstruction_loss``), so frame 0's share also moves with how much of it is sprite.

    Example:
        >>> import torch
        >>> recon, x = torch.zeros(1, 3, 9, 4, 4), torch.zeros(1, 3, 9, 4, 4)
        >>> x[:, :, 0] = 0.5                                       # only frame 0 is wrong
        >>> round(window_loss(recon, x, 0, 1.0).item(), 4), round(window_loss(recon, x, 0, 1.0, 9.0).item(), 4)
        (0.0833, 0.3971)
        >>> round(window_loss(recon, x, 3, 1.0, 9.0).item(), 4)   # a later window has no frame 0
        0.0833
    """
    loss = reconstruction_loss(recon, x, sprite_weight, edge_weight)
    if first_latent != 0 or first_frame_weight == 1.0:
        return loss
    frames = recon.shape[2]
    first = reconstruction_loss(recon[:, :, :1], x[:, :, :1], sprite_weight, edge_weight)
    return (loss * frames + (first_frame_weight - 1.0) * first) / (frames + first_frame_weight - 1.0)


@torch.no_grad()
def encode_clips(vae, clips: np.ndarray, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation of each clip, encoded whole (float32, on the VAE's device)."""
    means, stds = [], []
    for i in range(0, len(clips), batch):
        posterior = vae.encode(to_video_tensor(clips[i : i + batch], vae.device)).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


def load_model(name: str, out: Path):
    """The model's VAE in float32 and the folder it came from (``tiny-random``: a tiny random VAE, no folder)."""
    from diffusers import AutoencoderKLWan

    if name == "tiny-random":
        from genkv.testing import tiny_wan_vae

        vae = tiny_wan_vae(seed=0)
        vae.register_to_config(latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
        return vae, None
    folder = Path(name)
    if not (folder / "vae" / "config.json").is_file():
        raise SystemExit(f"--model {name}: no vae/config.json there; pass a pipeline folder (or tiny-random)")
    if folder.resolve() == out.resolve():
        raise SystemExit(f"--out {out}: the same folder as --model; pass a new folder")
    return AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32), folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="genkv/assets/sprites-tiny", help="pipeline folder, or tiny-random")
    parser.add_argument("--out", type=Path, required=True, help="new pipeline folder (the model's, VAE tuned)")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--clips", type=int, default=192, help="data clips, generated and encoded up front")
    parser.add_argument("--clip-frames", type=int, default=105, help="frames a clip (105: 27 latent frames)")
    parser.add_argument("--window", type=int, default=2, help="chunks a step trains on (after a warm-up)")
    parser.add_argument("--batch", type=int, default=4, help="clips a step (all at the same window)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--lr-final", type=float, default=0.1, help="learning rate at the end, as a share of --lr")
    parser.add_argument("--sprite-weight", type=float, default=10.0)
    parser.add_argument("--latent-noise", type=float, default=1.0,
                        help="posterior noise in the training latents, as a share of its std (1: samples, 0: means)")
    parser.add_argument("--first-frame-weight", type=float, default=1.0,
                        help="the video's frame 0 weighted this many times the others (window_loss; 9: as the rest "
                             "of its chunk)")
    parser.add_argument("--edge-weight", type=float, default=0.0,
                        help="weight of train_tiny.edge_loss (pixel steps), for sharper edges")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--log", type=Path, default=None, help="write the training log here (JSON)")
    args = parser.parse_args(argv)
    if (args.clip_frames - 1) % 4 or args.clip_frames < 1 + 4 * CHUNK * args.window - 3:
        parser.error(f"--clip-frames {args.clip_frames}: must be 1 + 4k frames and hold --window {args.window} "
                     f"chunks")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    vae, folder = load_model(args.model, args.out)
    size = 16 if folder is None else 64
    if folder is None:  # the tiny random VAE: small frames, so the check runs in seconds
        from genkv.data import make_video

        clips = np.stack([make_video(args.seed * 1_000_003 + i, args.clip_frames, size=size, max_objects=2).frames
                          for i in range(args.clips)])
    else:
        clips, _ = make_pool(args.clips, args.clip_frames, args.seed, workers=2, max_objects=2,
                             backgrounds=TRAINING_BACKGROUNDS, radius=TRAINING_RADIUS)  # the model's data
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    mean, std = encode_clips(vae, clips)
    print(f"{len(clips)} clips of {args.clip_frames} frames encoded to {tuple(mean.shape)} in {time.time() - t0:.0f} s",
          flush=True)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed + 2)
    latent_frames = mean.shape[2]
    positions = (latent_frames - args.window * CHUNK) // CHUNK + 1  # window starts on chunk boundaries
    start_time, deadline = time.time(), time.time() + args.minutes * 60
    log: list = []
    step = 0
    vae.train()
    while time.time() < deadline and (args.max_steps is None or step < args.max_steps):
        share = min(1.0, (time.time() - start_time) / max(args.minutes * 60, 1e-9))
        for group in opt.param_groups:  # linear decay to --lr-final
            group["lr"] = args.lr * (1.0 - (1.0 - args.lr_final) * share)
        idx = rng.integers(0, len(clips), args.batch)
        first = int(rng.integers(0, positions)) * CHUNK
        stop = first + args.window * CHUNK
        z = mean[idx] + args.latent_noise * std[idx] * torch.randn_like(mean[idx])
        recon = decode_window(vae, z, first, stop)
        a, b = pixel_span(first, stop)
        x = to_video_tensor(clips[idx, a:b], vae.device)
        loss = window_loss(recon, x, first, args.sprite_weight, args.first_frame_weight, args.edge_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            psnr = 10 * math.log10(4.0 / max(torch.mean((recon - x) ** 2).item(), 1e-12))
            sprite_err = sprite_rgb_error(recon, x)
            sprite_err = float("nan") if sprite_err is None else sprite_err
        log.append({"step": step, "seconds": round(time.time() - start_time, 1), "first_latent": first,
                    "loss": loss.item(), "psnr": psnr, "sprite_rgb_error": sprite_err})
        if step % 10 == 0:
            print(f"step {step:5d} {log[-1]['seconds']:7.0f} s  latents {first:2d}-{stop - 1:2d}"
                  f"  loss {loss.item():.4f}  PSNR {psnr:5.2f} dB  sprite |dR|+|dG|+|dB| {sprite_err:6.1f}", flush=True)
        step += 1
    vae.eval()
    if folder is not None:
        shutil.copytree(folder, args.out, dirs_exist_ok=True)
    vae.to(torch.float16 if folder is not None else torch.float32).save_pretrained(args.out / "vae",
                                                                                   safe_serialization=True)
    summary = {"model": args.model, "steps": step, "seconds": round(time.time() - t0, 1), "torch": torch.__version__,
               "args": {k: str(v) for k, v in vars(args).items()}, "log": log}
    if args.log is not None:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        args.log.write_text(json.dumps(summary, indent=1))
    print(f"{step} steps in {time.time() - t0:.0f} s; tuned VAE in {args.out / 'vae'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
