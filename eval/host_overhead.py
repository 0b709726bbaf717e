"""Host time of one transformer forward at negligible compute: what Python, dynamo and the launchers cost.

Builds the tiny self-forcing pipeline with ``--layers`` Wan blocks (2 heads x 16 dims, 64x64 video, so the
arithmetic is a few microseconds a block), applies a method, renders ``--warmup`` chunks, then times
``--chunks`` more. With so little arithmetic the time per forward is the host's: the eager path against the
compiled blocks (``--compile``), on CPU or on a GPU (where it is the launch cost that a full-size model pays on
top of, or instead of, its GPU time). Prints a table and writes JSON.

    python eval/host_overhead.py --layers 30 --method fastar --out runs/host_overhead.json
    GENKV_KERNEL_BACKEND=torch python eval/host_overhead.py --device cpu     # the CPU probe in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_json import write_result  # noqa: E402


def build(layers: int, method: str, settings: dict, device: str, compiled: bool, dtype: torch.dtype,
          graphs: bool = False):
    import genkv
    from genkv.pipelines.self_forcing.numerics import apply_self_forcing_numerics
    from genkv.testing import tiny_self_forcing_pipeline, tiny_wan_transformer

    pipe = tiny_self_forcing_pipeline(seed=3)
    transformer = tiny_wan_transformer(3, num_layers=layers, attention_head_dim=16)
    apply_self_forcing_numerics(transformer)
    pipe.register_modules(transformer=transformer)
    pipe.to(device)
    pipe.transformer.to(dtype)
    genkv.apply_genkv(pipe, method, **settings)
    if compiled:
        from genkv.compile import compile_transformer

        compile_transformer(pipe.transformer)
    pipe.cuda_graphs = graphs
    return pipe


def time_forwards(pipe, warmup: int, chunks: int) -> float:
    """Milliseconds per transformer forward (a chunk is 4 denoising forwards + the clean pass + the commit)."""
    embeds = pipe.encode_prompt("a red circle")
    device = pipe._execution_device
    generator = torch.Generator(device=device).manual_seed(0)
    frames = pipe.config.num_frames_per_chunk * (warmup + chunks)
    rollout = pipe.rollout(embeds, frames, 64, 64, generator=generator)
    for _ in range(warmup):
        next(rollout)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(chunks):
        next(rollout)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rollout.close()
    forwards = chunks * (len(pipe.scheduler.timesteps) + 1)
    return 1000 * (time.perf_counter() - start) / forwards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--method", default="fastar")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                        help="transformer dtype (default fp16 on CUDA: the Triton kernels' path; fp32 on CPU)")
    parser.add_argument("--out", type=Path, default=Path("host_overhead.json"))
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if cuda else "fp32")]
    settings = {"top_k": 2, "prompt_top_k": 2, "block_m": 16, "block_n": 16} if args.method in ("fastar", "annsa") \
        else {}
    rows = []
    # CUDA graphs replay recorded forwards: their host time is the copy of the inputs and one launch
    variants = [(False, False), (True, False)] + ([(True, True)] if cuda else [])
    for compiled, graphs in variants:
        torch._dynamo.reset()
        pipe = build(args.layers, args.method, settings, args.device, compiled, dtype, graphs)
        ms = time_forwards(pipe, args.warmup, args.chunks)
        name = ("compiled" if compiled else "eager") + (" + CUDA graphs" if graphs else "")
        rows.append({"compiled": compiled, "cuda_graphs": graphs, "ms_per_forward": ms,
                     "ms_per_block": ms / args.layers})
        print(f"{name:24s} {ms:8.2f} ms a forward, {ms / args.layers:6.3f} ms a block")
    write_result(args.out, args.device, layers=args.layers, method=args.method, dtype=str(dtype), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
