"""Streaming Wan VAE decode of one 3-latent-frame chunk at 480x832: variants timed in one run.

    python eval/bench_vae.py --out runs/bench_vae.json

Variants: cuDNN autotuning off/on, channels-last 3-D convolutions, one latent frame per decoder call (upstream)
or the whole chunk per call, the causal 3-D convolutions computed as per-tap 2-D ones (``vae_conv``), fused RMS norms
(``vae_norm``), the taps + bias + residual summed in one pass (``kernels/tap_sum.py``, ``vae_block``) and the
up-samplers as transposed convolutions (``vae_upsample``). Each decodes the same random latents
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


def profile_decode(decoder, latents, top: int = 30) -> list[dict]:
    """Device time of one steady-state chunk decode per op and input shape (which layers the time goes to)."""
    decoder.reset()
    with torch.no_grad():
        decoder.decode(latents[:, :, :3])
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA],
                                    record_shapes=True) as prof:
            decoder.decode(latents[:, :, 3:6])
            torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages(group_by_input_shape=True):
        if evt.device_type == torch.autograd.DeviceType.CPU and evt.key.startswith("aten::"):
            rows.append({"op": evt.key, "shapes": str(evt.input_shapes)[:120], "calls": evt.count,
                         "device_ms": getattr(evt, "device_time_total", 0) / 1e3})
    rows.sort(key=lambda r: -r["device_ms"])
    total = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages()
                if e.device_type != torch.autograd.DeviceType.CPU) / 1e3
    print(f"\nprofiled decode: {total:.1f} ms of device work; top ops (inclusive device ms) by input shape:")
    for r in rows[:top]:
        print(f"{r['device_ms']:8.2f} ms {r['calls']:4d}x {r['op']:32s} {r['shapes']}")
    return rows[:top]


def time_taehv(latents: torch.Tensor, repeats: int) -> list[dict]:
    """The TAEHV decoder's steady chunk decode (its MemBlock state carried), in a few layouts and dtypes."""
    from genkv.pipelines.self_forcing.taehv import StreamingTAEHVDecoder, TAEHVDecoder

    rows = []
    torch.backends.cudnn.benchmark = True
    for dtype, channels_last in ((torch.bfloat16, False), (torch.float16, False), (torch.float16, True)):
        torch.manual_seed(0)
        model = TAEHVDecoder().to(device=latents.device, dtype=dtype).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        decoder = StreamingTAEHVDecoder(model)
        with torch.no_grad():
            times = time_decode(decoder, latents.to(dtype), repeats)
        name = f"taehv {str(dtype)[6:]}" + (" channels_last" if channels_last else "")
        rows.append({"variant": name, "median_ms": statistics.median(times), "min_ms": min(times)})
        print(f"{name:54s} {statistics.median(times):8.1f} ms  (min {min(times):.1f})")
    return rows


def main(argv: list[str] | None = None) -> int:
    from diffusers import AutoencoderKLWan

    from genkv.pipelines import StreamingVAEDecoder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile", action="store_true",
                        help="also profile one decode of the fastest variant: device time per op and input shape")
    parser.add_argument("--only-best", action="store_true",
                        help="time only the last five variants (the fastest before 2026-12-05 and four candidates)")
    parser.add_argument("--taehv", action="store_true",
                        help="also time genkv's TAEHV tiny decoder (random weights at the taew2_1 shapes) on the same "
                        "latents: bf16 / fp16, channels-last")
    parser.add_argument("--out", type=Path, default=Path("bench_vae.json"))
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        latents = torch.randn(1, 16, 6, 60, 104)
    rows = []
    reference = None
    taps = {"conv2d_taps": True}
    fused = {**taps, "fused_norms": True}
    variants = (
        ("default (1 frame per call)", False, False, 1, {}),
        ("cudnn.benchmark", True, False, 1, {}),
        ("cudnn.benchmark + channels_last_3d", True, True, 1, {}),
        ("cudnn.benchmark + chunk per call", True, False, None, {}),
        ("cudnn.benchmark + channels_last_3d + chunk per call", True, True, None, {}),
        ("benchmark + channels_last + 2-D taps", True, True, 1, taps),
        ("benchmark + channels_last + 2-D taps + chunk per call", True, True, None, taps),
        ("benchmark + channels_last + 2-D taps + chunk per call + fused norms", True, True, None, fused),
        ("... + fused norms + fused tap sums", True, True, None, {**fused, "fused_tap_sum": True}),
        ("... + fused norms + transposed upsample", True, True, None, {**fused, "transposed_upsample": True}),
        ("... + fused norms + fused tap sums + transposed upsample", True, True, None,
         {**fused, "fused_tap_sum": True, "transposed_upsample": True}),
        ("... + fused tap sums + transposed upsample + fused blocks", True, True, None,
         {**fused, "fused_tap_sum": True, "transposed_upsample": True, "fused_blocks": True}),
    )
    # --only-best: the fastest path before 2026-12-05 (the reference of its rows' errors) and the candidates after it.
    for name, benchmark, channels_last, frames_per_call, options in variants[-5:] if args.only_best else variants:
        torch.backends.cudnn.benchmark = benchmark
        torch.manual_seed(0)
        vae = AutoencoderKLWan().to(device=device, dtype=torch.bfloat16).eval()
        decoder = StreamingVAEDecoder(vae, channels_last=channels_last, frames_per_call=frames_per_call, **options)
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
        if args.profile and name == variants[-1][0]:
            rows[-1]["profile"] = profile_decode(decoder, latents)
        del vae, decoder
        torch.cuda.empty_cache()
    if args.taehv:
        rows += time_taehv(latents, args.repeats)
    best = min((r for r in rows if "taehv" not in r["variant"]), key=lambda r: r["median_ms"])
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": rows,
              "best": best["variant"], "channels_last_best": "channels_last" in best["variant"]}
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
