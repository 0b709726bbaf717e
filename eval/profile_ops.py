"""Where a method's chunk time goes, op by op: torch.profiler over a few steady-state chunks of a rollout.

    python eval/profile_ops.py --methods fastar rolling:window_frames=21 --frames 96 --out runs/ops.json
    python eval/profile_ops.py --compile --methods fastar --frames 120 --chunks 3   # compiled blocks
    python eval/profile_ops.py --fast --methods fastar --frames 240 --chunks 4      # as renders run: how busy
    python eval/profile_ops.py --fast --fp8 --decoder taehv --methods fastar --frames 120 --chunks 3

Also prints each chunk phase's host (wall) time next to the device time of the kernels it launched (the
pipeline names its phases with ``record_function``: ``genkv.denoise``, ``genkv.kv_commit.forward``,
``genkv.kv_commit.keeper``, ``genkv.decode``): a phase whose kernels take far less than its wall time leaves
the GPU idle (launch- or sync-bound); one whose kernels fill it is compute-bound.

Builds the same random-weight pipeline as ``eval/bench_rollout.py`` (Wan2.1-1.3B shapes, 480x832), renders
``--frames`` frames per method, profiles the last ``--chunks`` chunks and prints the top ops by self device
time and by self host time. Writes the tables as JSON (and a Chrome trace per method with ``--trace``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import build_pipeline, parse_spec  # noqa: E402


def _self_device_us(evt) -> float:
    """An averaged profiler row's self device time in microseconds (``self_cuda_time_total`` before torch 2.4)."""
    return getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0))


def top_ops(prof, key: str, limit: int) -> list[dict]:
    rows = []
    for evt in prof.key_averages():
        rows.append({
            "name": evt.key[:90],
            "calls": evt.count,
            "self_device_ms": _self_device_us(evt) / 1e3,
            "self_host_ms": evt.self_cpu_time_total / 1e3,
        })
    rows.sort(key=lambda r: -r[key])
    return rows[:limit]


def device_busy_ms(prof) -> float:
    """Milliseconds of device activity (kernels, copies, fills): the device-side rows only, since a host op's
    self device time is its kernels again; ``genkv.*`` / profiler annotations are time spans, not work."""
    total = 0.0
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CPU and not evt.key.startswith(("genkv.", "ProfilerStep")):
            total += _self_device_us(evt)
    return total / 1e3


def is_device_copy(name: str) -> bool:
    """Whether a device-side profiler row is a device copy: a CUPTI copy record (``Memcpy DtoD (Device ->
    Device)``, ``Memcpy HtoD ...``) or one of the kernels the driver runs a copy captured in a CUDA graph as
    (``memcpy128``, ``memcpy32_post``, ...). Which of the two a replayed graph's copy shows up as depends on when
    the profiler attached (pytorch/pytorch#191284): counting the records alone can move hundreds of copies a
    chunk from "copies" to "kernels" between two profiles of the same work."""
    return name.lower().startswith("memcpy")


def device_copies(prof) -> tuple[int, float]:
    """(rows, milliseconds) of device copies over the profiled chunks, records and copy kernels together (see
    :func:`is_device_copy`); a host op such as ``aten::copy_`` is not counted (its device time is its kernels')."""
    calls, total = 0, 0.0
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CPU and is_device_copy(evt.key):
            calls += evt.count
            total += _self_device_us(evt)
    return calls, total / 1e3


def device_busy_union_ms(prof) -> tuple[float, float]:
    """(milliseconds during which at least one device activity ran, span from the first to the last one): the
    union of kernel / copy / fill intervals over all streams, so concurrent work (the decode on its side
    stream under the denoising) counts once. Busy / wall says how much of the time the GPU had nothing to do."""
    spans = sorted(
        (evt.time_range.start, evt.time_range.end)
        for evt in prof.events()
        if evt.device_type != torch.autograd.DeviceType.CPU and not evt.name.startswith(("genkv.", "ProfilerStep"))
    )
    busy, start, end = 0.0, None, None
    for lo, hi in spans:
        if end is None or lo > end:
            if end is not None:
                busy += end - start
            start, end = lo, hi
        else:
            end = max(end, hi)
    if end is not None:
        busy += end - start
    return busy / 1e3, (spans[-1][1] - spans[0][0]) / 1e3 if spans else 0.0


def phase_split(prof, chunks: int) -> list[dict]:
    """Per chunk: wall (host) ms of each ``genkv.*`` phase and the device ms of the kernels launched inside it
    (the host-side ranges; the device-side copies of the annotations are spans, skipped)."""
    rows = []
    for evt in prof.key_averages():
        if evt.key.startswith("genkv.") and evt.device_type == torch.autograd.DeviceType.CPU:
            rows.append({
                "phase": evt.key,
                "calls": evt.count,
                "host_ms_per_chunk": evt.cpu_time_total / 1e3 / chunks,
                "device_ms_per_chunk": getattr(evt, "device_time_total", getattr(evt, "cuda_time_total", 0)) / 1e3
                / chunks,
            })
    order = ["genkv.denoise", "genkv.kv_commit.forward", "genkv.kv_commit.keeper", "genkv.decode"]
    rows.sort(key=lambda r: order.index(r["phase"]) if r["phase"] in order else len(order))
    return rows


def sync_call_sites(fn) -> list[tuple[str, int]]:
    """Call ``fn`` under ``torch.cuda.set_sync_debug_mode("warn")``; count the repo call sites that synchronize."""
    import collections
    import traceback
    import warnings

    counts: collections.Counter = collections.Counter()
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1]
                  if any(p in f.filename for p in ("/genkv/", "/kernels/", "/pipelines/", "/diffusers/"))]
        site = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-3:]))
        counts[site or f"{filename}:{lineno}"] += 1

    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = original
    return counts.most_common(25)


def main(argv: list[str] | None = None) -> int:
    import genkv

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["fastar"])
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--chunks", type=int, default=2, help="profiled chunks at the end of the rollout")
    parser.add_argument("--model", default="wan-1.3b")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--stacks", action="store_true",
                        help="also print the Python call sites of host memcpys / syncs (profiler with_stack)")
    parser.add_argument("--sync-debug", action="store_true",
                        help="run one more chunk with torch.cuda.set_sync_debug_mode and list the syncing call sites")
    parser.add_argument("--compile", action="store_true", help="compiled transformer blocks (as render --compile)")
    parser.add_argument("--fast", action="store_true",
                        help="the whole fast path of render --compile (compiled blocks, CUDA graphs, fast VAE) with "
                        "the decode overlapped on its side stream, as renders run; adds how busy the GPU was")
    parser.add_argument("--fp8", action="store_true", help="the transformer's linears in FP8 (as render --fp8)")
    parser.add_argument("--decoder", choices=("wan", "taehv"), default="wan",
                        help="taehv: TAEHV's architecture at random weights in fp16 (as render --decoder taehv)")
    parser.add_argument("--out", type=Path, default=Path("profile_ops.json"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe, embeds = build_pipeline(args.model, device, dtype)
    if args.decoder == "taehv":
        from genkv.pipelines.self_forcing.taehv import CHANNELS_LAST, TAEHVDecoder

        taehv = TAEHVDecoder().to(device=device, dtype=torch.float16 if device.type == "cuda" else dtype)
        pipe.set_decoder(taehv.use_channels_last(CHANNELS_LAST))  # the layout from_file gives a render
    if args.fp8:  # before compiling, as render --fp8 does: Inductor fuses the activation quantization
        from genkv.fp8 import enable_fp8

        enable_fp8(pipe.transformer)
    frames_per_chunk = 4 * pipe.config.num_frames_per_chunk
    total_chunks = max(args.chunks + 1, args.frames // frames_per_chunk)
    result = {}
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for spec in args.methods:
        genkv.apply_genkv(pipe, parse_spec(spec))
        if args.fast:
            pipe.enable_compile()
        elif args.compile:
            from genkv.compile import compile_transformer

            compile_transformer(pipe.transformer)
        stream = pipe.stream(prompt_embeds=embeds, num_frames=(total_chunks + 1) * frames_per_chunk,
                             generator=torch.Generator(device=device).manual_seed(0),
                             overlap_decode=None if args.fast else False)
        for _ in range(total_chunks - args.chunks):
            next(stream)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter()
        with torch.profiler.profile(activities=activities, with_stack=args.stacks) as prof:
            for _ in range(args.chunks):
                next(stream)
            if device.type == "cuda":
                torch.cuda.synchronize()
        wall = (time.perf_counter() - wall) * 1e3 / args.chunks
        if args.sync_debug and device.type == "cuda":
            result.setdefault(spec, {})
            sync_sites = sync_call_sites(lambda: next(stream))
            print(f"\n== {spec}: synchronizing calls in one chunk, by call site ==")
            for site, n in sync_sites:
                print(f"{n:6d}x  {site}")
        stream.close()
        genkv.remove_genkv(pipe)
        key = "self_device_ms" if device.type == "cuda" else "self_host_ms"
        result[spec] = {"sync_sites": sync_sites} if args.sync_debug and device.type == "cuda" else {}
        result[spec] |= {"by_device": top_ops(prof, key, args.top), "by_host": top_ops(prof, "self_host_ms", args.top)}
        kernels_ms = device_busy_ms(prof) / args.chunks
        busy_ms, span_ms = device_busy_union_ms(prof)
        copy_rows, copy_ms = device_copies(prof)
        result[spec] |= {"compile": args.compile or args.fast, "fast": args.fast, "fp8": args.fp8,
                         "decoder": args.decoder, "wall_ms_per_chunk": wall,
                         "kernel_ms_per_chunk": kernels_ms, "device_busy_ms_per_chunk": busy_ms / args.chunks,
                         "device_span_ms": span_ms, "phases": phase_split(prof, args.chunks),
                         "device_copies_per_chunk": copy_rows / args.chunks,
                         "device_copy_ms_per_chunk": copy_ms / args.chunks}
        label = " (fast path)" if args.fast else " (compiled blocks)" if args.compile else ""
        print(f"\n== {spec}{label}: per chunk, profiled: wall {wall:.1f} ms, kernels {kernels_ms:.1f} ms summed over "
              f"streams, device busy {busy_ms / args.chunks:.1f} ms ({100 * busy_ms / max(span_ms, 1e-9):.0f}% of "
              f"the {span_ms:.0f} ms from first to last kernel) ==")
        for r in result[spec]["phases"]:
            print(f"{r['phase']:28s} host {r['host_ms_per_chunk']:8.1f} ms   "
                  f"kernels {r['device_ms_per_chunk']:8.1f} ms")
        if device.type == "cuda":
            print(f"device copies (records and graph copy kernels): {copy_rows / args.chunks:.0f} rows, "
                  f"{copy_ms / args.chunks:.1f} ms a chunk")
        if args.stacks:
            sites = []
            for evt in prof.key_averages(group_by_stack_n=12):
                if evt.key in ("cudaMemcpyAsync", "cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item",
                               "aten::_local_scalar_dense", "cudaHostAlloc", "cudaEventSynchronize",
                               "aten::_pin_memory",
                               "cudaStreamWaitEvent", "cudaEventQuery"):
                    frames = [f for f in evt.stack if ("genkv" in f or "kernels" in f or "pipelines" in f
                                                       or "diffusers" in f)][:4]
                    sites.append({"op": evt.key, "calls": evt.count, "host_ms": evt.self_cpu_time_total / 1e3,
                                  "stack": frames})
            sites.sort(key=lambda r: -r["host_ms"])
            result[spec]["memcpy_sites"] = sites[:30]
            print(f"\n== {spec}: host copies / syncs by call site ==")
            for r in sites[:30]:
                print(f"{r['host_ms']:8.1f} host ms {r['calls']:6d}x {r['op']}")
                for f in r["stack"]:
                    print(f"      {f}")
        if args.trace:
            prof.export_chrome_trace(str(args.out.with_name(f"{args.out.stem}_{spec.split(':')[0]}.trace.json")))
        for title, rows in (("device", result[spec]["by_device"]), ("host", result[spec]["by_host"])):
            print(f"\n== {spec}: top ops by self {title} time over {args.chunks} chunks ==")
            for r in rows:
                print(f"{r['self_device_ms']:9.1f} dev ms {r['self_host_ms']:9.1f} host ms "
                      f"{r['calls']:7d}x  {r['name']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
