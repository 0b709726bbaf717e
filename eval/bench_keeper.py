"""Time of TempCache's commit (merge, evict, place) per chunk, at Wan2.1-1.3B cache shapes, without the model.

Fills ``--layers`` fixed-layout layer caches with synthetic chunks (3 latent frames of 30x52 tokens, 12 heads x
128 dims; each frame a noisy copy of one base frame, so keys merge at the default 0.95 threshold) and times
``commit_layers`` for every chunk, synchronising the GPU around it. The steady chunks (budget full, evicting)
are the ones a long render pays for. Prints a table and writes JSON.

    python eval/bench_keeper.py --device cuda --layers 30 --out runs/keeper.json
    python eval/bench_keeper.py --device cpu --layers 1 --chunks 8 --dtype fp32      # a CPU probe
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_json import write_result  # noqa: E402


def commit_times(layers: int, chunks: int, device: torch.device, dtype: torch.dtype, budget_frames: int,
                 grid: tuple[int, int], heads: int, dim: int, profile_chunk: int | None = None,
                 cuda_graph: bool = False, stacked: bool = True) -> list[float]:
    from genkv.cache import ChunkInfo, LayerKVCache, LayerStack
    from genkv.keep.tempcache import TemporalMerge

    tpf = grid[0] * grid[1]
    keeper = TemporalMerge(threshold=0.95, radius=1, sink_frames=1, budget_frames=budget_frames, max_tokens=None)
    caches = [LayerKVCache(budget_frames * tpf, fixed=True) for _ in range(layers)]
    if stacked:  # one allocation for all layers, as KVCacheStore makes them: the keeper commits them together
        LayerStack(caches)
    gen = torch.Generator(device=device).manual_seed(0)
    graphs = None
    if cuda_graph:  # as KVCacheStore.commit(graphs) does: eager the first time a key comes, then record/replay
        from genkv.pipelines.self_forcing.step_graph import ChunkGraphs

        graphs = ChunkGraphs(device)
    seen = set()
    seconds = []
    for c in range(chunks):
        base = torch.randn(1, tpf, heads, dim, generator=gen, device=device, dtype=dtype)
        keys = torch.cat([base + 0.1 * torch.randn(base.shape, generator=gen, device=device, dtype=dtype)
                          for _ in range(3)], 1)
        values = torch.randn(keys.shape, generator=gen, device=device, dtype=dtype)
        chunk = ChunkInfo(3 * c, 3, tpf, 3 * c, grid)
        for cache in caches:
            cache.stage(keys, values)
            cache.label_staged(chunk)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with _profiled(c == profile_chunk, device):
            key = keeper.commit_graph_key(chunk)
            if graphs is not None and key in seen:
                def recordable(frame_start, chunk=chunk):
                    keeper.commit_layers(caches, chunk, frame_start)
                    return frame_start + 0

                graphs.run(("bench", key), recordable, torch.full((), chunk.frame_start, device=device))
            else:
                keeper.commit_layers(caches, chunk)
                seen.add(key)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        for cache in caches:
            cache.staged = 0
    return seconds


@contextlib.contextmanager
def _profiled(enabled: bool, device: torch.device):
    """Profile one commit: the ops with the most device time, and the kernels' summed time (the GPU work a
    commit costs when nothing else runs; the wall time above adds the host's launches)."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        yield
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60))
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        busy = sum(e.device_time for e in kernels) / 1000
        print(f"profiled commit: {len(kernels)} kernels, {busy:.1f} ms of kernel time")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 on CUDA")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--budget-frames", type=int, default=18)
    parser.add_argument("--out", type=Path, default=Path("bench_keeper.json"))
    parser.add_argument("--profile", action="store_true", help="profile the last chunk's commit (op table)")
    parser.add_argument("--per-layer", action="store_true",
                        help="separate buffers per layer (committed one layer at a time), as before LayerStack")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="record the commit as a CUDA graph and replay it (what a render with graphs does)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    seconds = commit_times(args.layers, args.chunks, device, dtype, args.budget_frames, (30, 52), 12, 128,
                           profile_chunk=args.chunks - 1 if args.profile else None, cuda_graph=args.cuda_graph,
                           stacked=not args.per_layer)
    steady = sorted(seconds[args.budget_frames // 3 + 1 :]) or sorted(seconds)
    median_ms = 1000 * steady[len(steady) // 2]
    print(f"{'chunk':>5s} {'commit ms':>10s}")
    for i, s in enumerate(seconds):
        print(f"{i:5d} {1000 * s:10.1f}")
    print(f"steady (budget full) median: {median_ms:.1f} ms a chunk for {args.layers} layers")
    write_result(args.out, device, dtype=str(dtype), layers=args.layers, budget_frames=args.budget_frames,
                 cuda_graph=args.cuda_graph, layout="per-layer" if args.per_layer else "stacked",
                 commit_ms=[1000 * s for s in seconds], steady_median_ms=median_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
