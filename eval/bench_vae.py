"""Streaming Wan VAE decode of one 3-latent-frame chunk at 480x832: variants timed in one run.

    python eval/bench_vae.py --out runs/bench_vae.json

Variants: cuDNN autotuning off/on, channels-last 3-D convolutions, one latent frame per decoder call (upstream)
or the whole chunk per call, and the causal 3-D convolutions computed as per-tap 2-D ones (``vae_conv``). Each decodes the same random latents
(random weights: timings do not depend on learned values) through ``StreamingVAEDecoder`` with its causal
cache carried (the steady state of a long render), and is checked against the default variant's output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch


def time_decode(decoder, latents, repeats: int) -> list[float]:
    times = []
    decoder.reset()
    decoder.decode(latents[:, :, :3])  # first chunk (warm-up, first-frame path)
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        decoder.decode(latents[:, :, 3:6])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main(argv: list[str] | None = None) -> int:
    from diffusers import AutoencoderKLWan

    from genkv.pipelines import StreamingVAEDecoder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench_vae.json"))
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        latents = torch.randn(1, 16, 6, 60, 104)
    rows = []
    reference = None
    for name, benchmark, channels_last, frames_per_call, taps in (
        ("default (1 frame per call)", False, False, 1, False),
        ("cudnn.benchmark", True, False, 1, False),
        ("cudnn.benchmark + channels_last_3d", True, True, 1, False),
        ("cudnn.benchmark + chunk per call", True, False, None, False),
        ("cudnn.benchmark + channels_last_3d + chunk per call", True, True, None, False),
        ("benchmark + channels_last + 2-D taps", True, True, 1, True),
        ("benchmark + channels_last + 2-D taps + chunk per call", True, True, None, True),
    ):
        torch.backends.cudnn.benchmark = benchmark
        torch.manual_seed(0)
        vae = AutoencoderKLWan().to(device=device, dtype=torch.bfloat16).eval()
        decoder = StreamingVAEDecoder(vae, channels_last=channels_last, frames_per_call=frames_per_call,
                                      conv2d_taps=taps)
        with torch.no_grad():
            times = time_decode(decoder, latents, args.repeats)
            decoder.reset()
            decoder.decode(latents[:, :, :3])
            out = decoder.decode(latents[:, :, 3:6]).float()
        if reference is None:
            reference = out
        err = ((out - reference).norm() / reference.norm()).item()
        rows.append({"variant": name, "median_ms": statistics.median(times), "min_ms": min(times), "rel_err": err})
        print(f"{name:54s} {statistics.median(times):8.1f} ms  (min {min(times):.1f})  rel err vs default {err:.2e}")
        del vae, decoder
        torch.cuda.empty_cache()
    best = min(rows, key=lambda r: r["median_ms"])
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": rows,
              "best": best["variant"], "channels_last_best": "channels_last" in best["variant"]}
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
