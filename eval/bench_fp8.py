"""FP8 linears (``genkv.fp8``, issue 20): the speed of one Wan block's GEMMs and the cost in a chunk's latents.

(a) The linear layers of one Wan2.1-1.3B block at a chunk's 4680 tokens (dim 1536, FFN 8960, 12 heads x 128):
self-attention q/k/v/out, cross-attention q/out (the prompt's k/v are projected once per prompt) and the FFN,
each fed by the op that produces its input in the real block (LayerNorm + modulation before q/k/v and the FFN,
tanh-GELU between the FFN's linears; the FFN is diffusers' ``FeedForward``, as in Wan), so that under
``torch.compile`` the FP8 activation quantization can fuse into that producer. Timed with CUDA events after
warm-up: bf16 eager, bf16 compiled, FP8 eager (quantization unfused: three extra passes per activation) and FP8
compiled, each FP8 setting with and / or without ``row_kernel`` (genkv's one-pass quantization of the attention
outputs and the FFN's GELU; ``--row-kernel``). ms per block; x 30 blocks x 5 forwards per chunk.

(b) The relative error of one chunk's denoised latents (3 latent frames, 480x832, 4 steps) with the block
linears in FP8 against bf16, at Wan2.1-1.3B shapes with random weights (``bench_rollout.build_pipeline``), and,
for scale, bf16 against float32 of the same weights.

    python eval/bench_fp8.py --out runs/fp8.json                  # on an H200: well under 3 minutes
    python eval/bench_fp8.py --device cpu --tiny                  # a CPU smoke run of the same code
    python eval/bench_fp8.py --scaling row tensor --fast-accum both  # the four FP8 GEMM settings side by side
    python eval/bench_fp8.py --row-kernel both      # per-row FP8 with and without the one-pass quantization
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_json import write_result  # noqa: E402

WAN_BLOCK = dict(dim=1536, ffn=8960, tokens=4680, text_tokens=512)
TINY_BLOCK = dict(dim=64, ffn=128, tokens=96, text_tokens=16)


class BlockLinears(nn.Module):
    """The GEMMs of one Wan block with the elementwise ops that produce their inputs (attention itself left out:
    its outputs are given). Names follow diffusers' WanTransformerBlock, so ``enable_fp8``'s patterns apply."""

    def __init__(self, dim: int, ffn: int) -> None:
        super().__init__()
        from diffusers.models.attention import FeedForward

        self.attn1 = nn.ModuleDict({name: nn.Linear(dim, dim) for name in ("to_q", "to_k", "to_v")})
        self.attn1["to_out"] = nn.ModuleList([nn.Linear(dim, dim)])
        self.attn2 = nn.ModuleDict({"to_q": nn.Linear(dim, dim), "to_out": nn.ModuleList([nn.Linear(dim, dim)])})
        self.ffn = FeedForward(dim, inner_dim=ffn, activation_fn="gelu-approximate")  # Wan's: net.0.proj, net.2
        self.dim = dim

    def forward(self, x, attn_out, cross_out, shift, scale):
        h = F.layer_norm(x.float(), (self.dim,)).mul(1 + scale).add(shift).type_as(x)  # norm1 + modulation
        q, k, v = self.attn1["to_q"](h), self.attn1["to_k"](h), self.attn1["to_v"](h)
        x = x + self.attn1["to_out"][0](attn_out)
        q2 = self.attn2["to_q"](F.layer_norm(x.float(), (self.dim,)).type_as(x))  # norm2 (affine in the model)
        x = x + self.attn2["to_out"][0](cross_out)
        h = F.layer_norm(x.float(), (self.dim,)).mul(1 + scale).add(shift).type_as(x)  # norm3 + modulation
        x = x + self.ffn(h)
        return x, q, k, v, q2


def gemm_flops(dim: int, ffn: int, tokens: int) -> float:
    return 2 * tokens * (6 * dim * dim + 2 * dim * ffn)


def time_ms(fn, args, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn(*args)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn(*args)
    return (time.perf_counter() - t) * 1e3 / iters


SWITCH = {"off": [False], "on": [True], "both": [False, True]}


def fp8_configs(scalings: list[str], fast_accum: str, row_kernel: str = "on") -> list[tuple[str, bool, bool]]:
    """The (scaling, fast accumulation, row kernel) settings to compare: every scaling asked, with ``fast_accum``
    and ``row_kernel`` (genkv's one-pass quantization and fused GELU; per-row scaling only) off, on or both."""
    return [(scaling, fast, kernel) for scaling in scalings for fast in SWITCH[fast_accum]
            for kernel in (SWITCH[row_kernel] if scaling == "row" else [False])]


def config_label(scaling: str, fast: bool, row_kernel: bool = False) -> str:
    return (f"FP8 {'per-row' if scaling == 'row' else 'per-tensor'}{' fast-accum' if fast else ''}"
            f"{' row-kernel' if row_kernel else ''}")


def bench_block(shape: dict, device: torch.device, dtype: torch.dtype, compile_: bool, warmup: int, iters: int,
                configs: list[tuple[str, bool, bool]], mode: str | None) -> list[dict]:
    from genkv.fp8 import enable_fp8

    torch.manual_seed(0)
    dim, ffn, tokens = shape["dim"], shape["ffn"], shape["tokens"]
    with torch.device(device):
        bf16 = BlockLinears(dim, ffn).to(dtype).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    args = [torch.randn(1, tokens, dim, device=device, dtype=dtype, generator=gen) for _ in range(3)]
    args += [0.1 * torch.randn(1, 1, dim, device=device, dtype=torch.float32, generator=gen) for _ in range(2)]
    variants = [("bf16 eager", bf16, False, None)] + ([("bf16 compiled", bf16, True, None)] if compile_ else [])
    replaced = 0
    for scaling, fast, kernel in configs:
        fp8 = copy.deepcopy(bf16)
        replaced = enable_fp8(fp8, include="*", fast_accum=fast, keep_originals=None, scaling=scaling,
                              row_kernel=kernel)
        label = config_label(scaling, fast, kernel)
        variants.append((f"{label} eager", fp8, False, (scaling, fast, kernel)))
        if compile_:
            variants.append((f"{label} compiled", fp8, True, (scaling, fast, kernel)))
    flops = gemm_flops(dim, ffn, tokens)
    rows, outputs = [], {}
    with torch.inference_mode():
        for name, module, compiled, config in variants:
            fn = torch.compile(module, dynamic=False, mode=mode) if compiled else module
            t0 = time.perf_counter()
            outputs[name] = fn(*args)[0].float()
            first_s = time.perf_counter() - t0
            ms = time_ms(fn, args, device, warmup, iters)
            rows.append({"variant": name, "ms_per_block": ms, "ms_per_chunk_30x5": ms * 150,
                         "gemm_tflops": flops / ms / 1e9, "first_call_s": first_s, "compiled": compiled,
                         "scaling": config and config[0], "fast_accum": config and config[1],
                         "row_kernel": config and config[2]})
    ref = outputs["bf16 eager"]
    for row in rows:
        row["ratio_to_bf16_eager"] = rows[0]["ms_per_block"] / row["ms_per_block"]
        out = outputs[row["variant"]]
        # error of the block's residual stream output (the input x is added back: error relative to the change)
        change = ref - args[0].float()
        row["rel_error_of_block_update"] = ((out - ref).norm() / change.norm()).item()
    for row in rows:
        row["fp8_layers"] = replaced if row["variant"].startswith("FP8") else 0
    bf16_compiled = next((r["ms_per_block"] for r in rows if r["variant"] == "bf16 compiled"), None)
    for row in rows:
        row["ratio_to_bf16_compiled"] = bf16_compiled / row["ms_per_block"] if bf16_compiled else None
    return rows


def chunk_latent_errors(model: str, device: torch.device, configs: list[tuple[str, bool, bool]]) -> dict:
    """One chunk's latents: FP8 (each of ``configs``) vs bf16, and bf16 vs float32 of the same weights (for
    scale). The first config's figures are also the flat keys of older runs."""
    import genkv
    from bench_rollout import build_pipeline

    from genkv.fp8 import enable_fp8, disable_fp8, fp8_summary

    pipe, embeds = build_pipeline(model, device, torch.bfloat16)
    height, width = pipe.config.default_height, pipe.config.default_width
    chunk = pipe.config.num_frames_per_chunk
    s = pipe.vae_scale_factor_spatial
    noise = torch.randn(1, pipe.transformer.config.in_channels, chunk, height // s, width // s,
                        generator=torch.Generator().manual_seed(1)).to(device)

    def latents(embeds):
        genkv.apply_genkv(pipe, "full")
        out, = pipe.rollout(embeds, chunk, height, width, generator=torch.Generator(device=device).manual_seed(2),
                            latents=noise)  # one chunk, the generator run to its end
        genkv.remove_genkv(pipe)
        return out.double()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    t0 = time.perf_counter()
    with torch.inference_mode():
        bf16 = latents(embeds)
        fp8 = {}
        for scaling, fast, kernel in configs:
            replaced = enable_fp8(pipe.transformer, fast_accum=fast, keep_originals="device", scaling=scaling,
                                  row_kernel=kernel)
            skipped = len(fp8_summary(pipe.transformer)["skipped_dims"])
            fp8[(scaling, fast, kernel)] = latents(embeds)
            disable_fp8(pipe.transformer)
        pipe.transformer.to(torch.float32)
        fp32 = latents(embeds.float())
    tokens = chunk * (height // s // 2) * (width // s // 2)
    per_config = [{"scaling": scaling, "fast_accum": fast, "row_kernel": kernel,
                   "label": config_label(scaling, fast, kernel),
                   "rel_error_fp8_vs_bf16": rel(out, bf16), "rel_error_fp8_vs_fp32": rel(out, fp32)}
                  for (scaling, fast, kernel), out in fp8.items()]
    return {"model": model, "latent_frames": chunk, "tokens": tokens, "fp8_layers": replaced,
            "fp8_skipped_dims": skipped, "rel_error_fp8_vs_bf16": per_config[0]["rel_error_fp8_vs_bf16"],
            "rel_error_bf16_vs_fp32": rel(bf16, fp32), "rel_error_fp8_vs_fp32": per_config[0]["rel_error_fp8_vs_fp32"],
            "configs": per_config, "seconds": time.perf_counter() - t0}


def print_tables(block_rows: list[dict], shape: dict, latents: dict | None) -> None:
    print(f"\none block's linears at {shape['tokens']} tokens (dim {shape['dim']}, FFN {shape['ffn']}):")
    print(f"{'variant':<52} {'ms/block':>9} {'x150/chunk':>11} {'TFLOP/s':>8} {'vs bf16':>8} {'vs comp.':>9} "
          f"{'rel err':>9}")
    for r in block_rows:
        vs_compiled = f"{r['ratio_to_bf16_compiled']:8.2f}x" if r["ratio_to_bf16_compiled"] else f"{'-':>9}"
        print(f"{r['variant']:<52} {r['ms_per_block']:9.3f} {r['ms_per_chunk_30x5']:11.1f} {r['gemm_tflops']:8.1f} "
              f"{r['ratio_to_bf16_eager']:7.2f}x {vs_compiled} {r['rel_error_of_block_update']:9.2e}")
    if latents:
        print(f"\none chunk's latents ({latents['model']}, {latents['tokens']} tokens, {latents['fp8_layers']} FP8 "
              f"layers, {latents['fp8_skipped_dims']} kept for their dims): bf16 vs fp32 "
              f"{latents['rel_error_bf16_vs_fp32']:.3e}")
        for c in latents["configs"]:
            print(f"  {c['label']:<28} vs bf16 {c['rel_error_fp8_vs_bf16']:.3e}   vs fp32 "
                  f"{c['rel_error_fp8_vs_fp32']:.3e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and the tiny model (CPU smoke run)")
    parser.add_argument("--compile", dest="compile_", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the compiled variants (default: on CUDA only; a CPU compile takes minutes)")
    parser.add_argument("--mode", default=None, help="torch.compile mode for the compiled variants")
    parser.add_argument("--fast-accum", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                        help="_scaled_mm's fast accumulation (Hopper): off, on (the bare flag) or both")
    parser.add_argument("--scaling", nargs="+", default=["row"], choices=("row", "tensor"),
                        help="FP8 scalings to compare: per row (token / output channel) and / or per tensor")
    parser.add_argument("--row-kernel", default="on", choices=("off", "on", "both"),
                        help="per-row FP8 with genkv's one-pass quantization / fused GELU (enable_fp8's row_kernel)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--no-latents", action="store_true", help="skip (b), the chunk latents' error")
    parser.add_argument("--out", type=Path, default=Path("runs/fp8.json"))
    args = parser.parse_args(argv)

    from genkv.fp8 import fp8_supported

    device = torch.device(args.device)
    ok, reason = fp8_supported(device)
    if not ok:
        print(f"bench_fp8: {reason}", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    compile_ = cuda if args.compile_ is None else args.compile_
    shape = TINY_BLOCK if args.tiny else WAN_BLOCK
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    iters = args.iters if args.iters is not None else (50 if cuda else 5)
    dtype = torch.bfloat16
    configs = fp8_configs(args.scaling, args.fast_accum, args.row_kernel)
    block_rows = bench_block(shape, device, dtype, compile_, warmup, iters, configs, args.mode)
    latents = None if args.no_latents else chunk_latent_errors("tiny" if args.tiny else "wan-1.3b", device,
                                                               configs)
    print_tables(block_rows, shape, latents)
    write_result(args.out, device, shape=shape, dtype="bf16", fast_accum=args.fast_accum, row_kernel=args.row_kernel,
                 compile_mode=args.mode,
                 block=block_rows, latents=latents, fp8_support=reason)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
