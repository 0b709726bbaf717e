"""One stream with its transformer blocks split over GPUs (issue 25): frames/s and memory on every GPU.

    torchrun --standalone --nproc-per-node 2 eval/bench_split.py --model wan-14b --methods fastar rolling \
        --frames 2000 --json runs/split.json
    python eval/bench_split.py --model wan-14b --methods fastar --frames 2000     # one process: the unsplit baseline

Each process builds the same random-weight pipeline (``bench_rollout.build_pipeline``: Wan2.1 shapes, bf16, the
Wan VAE), applies the method, then :func:`~genkv.pipelines.self_forcing.block_split.apply_block_split` (stage =
rank; the other stages' blocks go to the ``meta`` device and their memory is freed), and runs ``stream`` with the
same noise: the last stage decodes (``output_type="np"``), the others ask for latents. After a warm-up video,
one timed video of ``--frames`` frames per method: the decoding stage's time per chunk (steady: the first chunk
and the last left out), and every stage's peak memory and KV bytes, gathered to the last stage, which prints the
table and writes the JSON. Eager (a split is not recorded as CUDA graphs). The blocks are built whole on each GPU
and then split (a 14B model fits on one H200 in bf16): the peak is measured from after the split.

``--model tiny`` runs on CPU processes over gloo (``--device cpu``): plumbing only, for tests.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

EVAL = Path(__file__).resolve().parent
sys.path.insert(0, str(EVAL))
from bench_json import write_result  # noqa: E402
from bench_rollout import build_pipeline, flatness, parse_spec  # noqa: E402


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_method(spec: str, args: argparse.Namespace, device: torch.device, world: int) -> dict | None:
    """One method's timed video; the row on the decoding stage, None on the others."""
    import genkv
    from genkv.cli.stages import gather_stage_memory
    from genkv.pipelines.self_forcing.block_split import apply_block_split, is_decoding_stage

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe, embeds = build_pipeline(args.model, device, dtype)
    genkv.apply_genkv(pipe, parse_spec(spec))
    if world > 1:
        apply_block_split(pipe)
    decodes = is_decoding_stage(pipe)
    kind = "np" if decodes else "latent"

    def video(frames: int, seed: int) -> list[tuple[int, float]]:
        chunks, last = [], time.perf_counter()
        for out in pipe.stream(prompt_embeds=embeds, num_frames=frames, output_type=kind,
                               generator=torch.Generator(device=device).manual_seed(seed)):
            now = time.perf_counter()  # np frames: the chunk's GPU work is done (latents: queued on this stage)
            chunks.append((len(out) if kind == "np" else out.shape[2], now - last))
            last = now
        return chunks

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the other stages' blocks, built here and moved to meta by the split
    if args.warmup_frames:
        video(args.warmup_frames, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    chunks = video(args.frames, 0)
    seconds = time.perf_counter() - start
    peaks, kvs = [peak_bytes(device)], [genkv.get_store(pipe).memory_bytes()]
    if world > 1:
        peaks, kvs = gather_stage_memory(peaks[0], kvs[0])
    del pipe, embeds
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not decodes:
        return None
    steady = chunks[1:-1] if len(chunks) > 2 else chunks[1:]
    secs = [s for _, s in steady]
    frames = sum(n for n, _ in chunks)
    return dict(
        method=spec, stages=world, frames=frames, seconds=seconds, fps_total=frames / seconds,
        fps_steady=sum(n for n, _ in steady) / sum(secs) if steady else None,
        median_ms_per_chunk=1000 * statistics.median(secs) if secs else None,
        flatness_last20_over_20to40=flatness([s for _, s in chunks]),
        stage_peak_memory_bytes=peaks, stage_kv_bytes=kvs,
        chunk_ms=[1000 * s for _, s in chunks],
    )


def format_rows(rows: list[dict]) -> str:
    header = f"{'method':36s} {'stages':>6s} {'frames':>6s} {'fps':>7s} {'steady':>7s} {'ms/chunk':>8s}  peak GiB / KV GiB per stage"
    lines = [header, "-" * len(header)]
    for row in rows:
        per_stage = ", ".join(f"{p / 2**30:.2f}/{k / 2**30:.2f}"
                              for p, k in zip(row["stage_peak_memory_bytes"], row["stage_kv_bytes"]))
        steady = f"{row['fps_steady']:7.2f}" if row["fps_steady"] else f"{'-':>7s}"
        ms = f"{row['median_ms_per_chunk']:8.1f}" if row["median_ms_per_chunk"] else f"{'-':>8s}"
        lines.append(f"{row['method']:36s} {row['stages']:6d} {row['frames']:6d} {row['fps_total']:7.2f} {steady} "
                     f"{ms}  {per_stage}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan-1.3b", help="wan-1.3b, wan-14b (random weights) or tiny")
    parser.add_argument("--methods", nargs="+", default=["fastar", "rolling:sink_frames=1,window_frames=21"])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--warmup-frames", type=int, default=45)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device)
    if world > 1:  # the process group and device of a stage, as `genkv render --pipeline-gpus` sets them up
        from genkv.cli.stages import init_stage

        device = init_stage(device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    rows = []
    with torch.no_grad():
        for spec in args.methods:
            row = run_method(spec, args, device, world)
            if row is not None:
                rows.append(row)
                print(format_rows([row]), flush=True)
    if rows:
        print(format_rows(rows))
        if args.json is not None:
            write_result(args.json, device, model=args.model, stages=world, rows=rows)
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
