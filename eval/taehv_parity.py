"""genkv's TAEHV decoder against TAEHV's own code, same weights, same latents, float32.

    python eval/taehv_parity.py --taehv /path/to/taehv-checkout --out runs/taehv_parity.json
    python eval/taehv_parity.py --taehv DIR --weights DIR/taew2_1.pth     # the published weights too

``--taehv`` is a checkout of https://github.com/madebyollin/taehv: its ``taehv.py`` is imported from there at run
time (nothing of it is copied into genkv). Both decoders get one state dict: TAEHV's own module at random weights
(He-scaled, the last conv rescaled so most pixels fall inside TAEHV's output clamp) with its encoder part, written to a
.pth and read back through ``TAEHVDecoder.from_file`` as a user's file would be. Compared, on the same random
latents: TAEHV's parallel ``decode_video`` against genkv's whole-clip decode, and TAEHV's sequential
``decode_video`` and frame-by-frame ``StreamingTAEHV`` against genkv decoding Self-Forcing chunks (3 latent
frames) with its state carried. TAEHV's [0, 1] pixels are mapped to genkv's [-1, 1] (x 2 - 1) before comparing.
Exits non-zero when a max abs difference exceeds ``--atol`` (1e-4) or a frame count differs from the Wan VAE's.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_json import write_result  # noqa: E402

from genkv.pipelines.self_forcing.taehv import TAEHVDecoder  # noqa: E402


def import_taehv(checkout: Path):
    """TAEHV's own module from a checkout (its folder put first on sys.path for this process only)."""
    if not (checkout / "taehv.py").is_file():
        raise SystemExit(f"no taehv.py in {checkout}: pass a checkout of https://github.com/madebyollin/taehv")
    sys.path.insert(0, str(checkout.resolve()))
    import taehv

    return taehv


def randomize(module: torch.nn.Module, seed: int) -> None:
    """He-normal convolutions, small biases; a MemBlock's last conv scaled down so 9 residual blocks stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 4:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                scale = 0.3 if name.endswith("conv.4.weight") else 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * scale * math.sqrt(2.0 / fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def calibrate_output(taehv_module, model, latents_ntchw: torch.Tensor) -> None:
    """Rescale the last conv so TAEHV's raw output has mean 0.5, std 0.25: most pixels inside the [0, 1] clamp."""
    with torch.no_grad():
        raw = taehv_module.apply_model_with_memblocks(model.decoder, latents_ntchw, True, False)
        last = model.decoder[-1]
        k = 0.25 / raw.std().item()
        last.weight.mul_(k)
        last.bias.copy_((last.bias - raw.mean()) * k + 0.5)


def their_streaming(taehv_module, model, latents_ntchw: torch.Tensor) -> torch.Tensor:
    """TAEHV's StreamingTAEHV fed one latent frame at a time, every frame it gives collected (N, T, C, H, W)."""
    streaming = taehv_module.StreamingTAEHV(model)
    frames = []
    for t in range(latents_ntchw.shape[1]):
        frame = streaming.decode(latents_ntchw[:, t:t + 1])
        while frame is not None:
            frames.append(frame)
            frame = streaming.decode()
    return torch.cat(frames, dim=1)


def ours_streamed(decoder: TAEHVDecoder, latents: torch.Tensor, chunk: int) -> tuple[torch.Tensor, list[int]]:
    state, parts = None, []
    for start in range(0, latents.shape[2], chunk):
        pixels, state = decoder.decode_chunk(latents[:, :, start:start + chunk], state)
        parts.append(pixels)
    return torch.cat(parts, dim=2), [p.shape[2] for p in parts]


def to_genkv(theirs_ntchw: torch.Tensor) -> torch.Tensor:
    """TAEHV's (N, T, 3, H, W) in [0, 1] → genkv's (N, 3, T, H, W) in [-1, 1]."""
    return theirs_ntchw.mul(2).sub(1).transpose(1, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taehv", type=Path, required=True, help="a checkout of madebyollin/taehv")
    parser.add_argument("--weights", type=Path, default=None, help="optional published taew2_1 .pth/.safetensors")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--latent-frames", type=int, default=7)
    parser.add_argument("--size", type=int, nargs=2, default=(8, 12), metavar=("H", "W"), help="latent h w")
    parser.add_argument("--chunk", type=int, default=3, help="latent frames per streamed chunk (Self-Forcing: 3)")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("taehv_parity.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = False  # float32 means float32 on a GPU too
    torch.backends.cuda.matmul.allow_tf32 = False
    taehv_module = import_taehv(args.taehv)
    theirs = taehv_module.TAEHV(checkpoint_path=None)
    randomize(theirs, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    latents = torch.randn(1, 16, args.latent_frames, *args.size, generator=gen).to(device)
    calibrate_output(taehv_module, theirs, latents.cpu().transpose(1, 2))
    sources = {"random": theirs.state_dict()}
    if args.weights is not None:
        from genkv.pipelines.self_forcing.taehv import read_state_dict

        sources["published"] = read_state_dict(args.weights)

    expected_counts = [min(args.chunk, args.latent_frames - s) * 4 - (3 if s == 0 else 0)
                       for s in range(0, args.latent_frames, args.chunk)]  # the Wan VAE's, chunk by chunk
    rows, ok = [], True
    for label, state_dict in sources.items():
        theirs.load_state_dict(theirs.patch_tgrow_layers(dict(state_dict)))
        theirs.to(device).eval()
        with tempfile.TemporaryDirectory() as tmp:  # through the file loader, encoder part included
            path = Path(tmp) / "taew2_1.pth"
            torch.save({k: v.clone() for k, v in state_dict.items()}, path)
            ours = TAEHVDecoder.from_file(path, device=device, dtype=torch.float32)
        theirs.float()
        ntchw = latents.transpose(1, 2)  # TAEHV's layout
        with torch.no_grad():
            ref_parallel = to_genkv(theirs.decode_video(ntchw, parallel=True, show_progress_bar=False))
            ref_sequential = to_genkv(theirs.decode_video(ntchw, parallel=False, show_progress_bar=False))
            ref_streaming = to_genkv(their_streaming(taehv_module, theirs, ntchw))
        whole = ours.decode_video(latents)
        streamed, counts = ours_streamed(ours, latents, args.chunk)
        diffs = {
            "whole_vs_their_parallel": (whole - ref_parallel).abs().max().item(),
            "streamed_vs_their_sequential": (streamed - ref_sequential).abs().max().item(),
            "streamed_vs_their_streaming": (streamed - ref_streaming).abs().max().item(),
            "streamed_vs_whole": (streamed - whole).abs().max().item(),
        }
        shapes_match = whole.shape == ref_parallel.shape == streamed.shape == ref_streaming.shape
        unclamped = (ref_parallel.abs() < 0.999).float().mean().item()  # a comparison of clamped values says little
        row = {"weights": label, "max_abs_diff": diffs, "pixel_shape": list(whole.shape),
               "chunk_frames": counts, "wan_chunk_frames": expected_counts, "unclamped_fraction": unclamped}
        rows.append(row)
        worst = max(diffs.values())
        ok &= worst <= args.atol and shapes_match and counts == expected_counts
        print(f"{label}: max abs diff {worst:.3g} (atol {args.atol:g}); "
              + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
        print(f"  pixels {tuple(whole.shape)}, frames per chunk {counts} (Wan VAE {expected_counts}), "
              f"{unclamped:.0%} of TAEHV's pixels inside the clamp")
    write_result(args.out, device, taehv_checkout=str(args.taehv), latents=list(latents.shape), chunk=args.chunk,
                 atol=args.atol, passed=bool(ok), rows=rows)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
