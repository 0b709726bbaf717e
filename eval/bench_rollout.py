"""Per-chunk latency, peak GPU memory and KV bytes against frame index, for a list of genkv methods.

Builds a ``SelfForcingPipeline`` with random weights at real shapes (``--model wan-1.3b``: Wan2.1-T2V-1.3B
transformer and the Wan VAE; timings do not depend on learned values) or the tiny CPU model, renders one long
video per method end to end (denoising, clean K/V pass, VAE decode, uint8 frames to the host, mp4 encoding in a
writer thread) and records every chunk. Prints a table, writes JSON and, if matplotlib is installed, a PNG.

    python eval/bench_rollout.py --methods full rolling:window_frames=21 --frames 2000 --out runs/bench.json
    python eval/bench_rollout.py --fast --methods fastar --frames 2000 --no-mp4   # plain vs fast path, one run
    python eval/bench_rollout.py --plot-only runs/bench.json        # redraw the figure from the JSON
    python eval/bench_rollout.py --switch-every 240 --recache on --frames 2000   # a prompt switch every 240 frames

``--switch-every N`` switches to a new (random) prompt embedding at the chunk boundary at or after every N-th frame,
through the pipeline's own switching path (``stream(prompt_switches=...)``) with ``--recache`` on (LongLive's KV
re-cache), off or flush; each run then reports how many switches happened, how many re-cached and the cost of a
switch: the median time of the chunks during which a switch ran minus the median of the other steady chunks.

A method spec is a name or preset, optionally with ``:key=value,key=value`` settings. ``full`` runs until it
reaches ``--frames`` or runs out of GPU memory (recorded as ``oom_at_frame``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

WAN_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

#: Wan2.1-T2V-14B's transformer (its config.json): dim 5120 in 40 heads, 40 blocks, FFN 13824
WAN_14B = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
MODELS = {"wan-1.3b": WAN_1_3B, "wan-14b": WAN_14B}


def build_pipeline(model: str, device: torch.device, dtype: torch.dtype):
    """A random-weight pipeline without a text encoder (the benchmark passes prompt embeddings)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from genkv.pipelines import SelfForcingPipeline, SelfForcingScheduler

    if model == "tiny":
        from genkv.testing import tiny_wan_transformer, tiny_wan_vae

        transformer, vae = tiny_wan_transformer(), tiny_wan_vae()
        size, text = (64, 64), (64, 32)
    elif model in MODELS:
        torch.manual_seed(0)
        with torch.device(device):
            transformer = WanTransformer3DModel(**MODELS[model]).to(dtype)  # (14B: 56 GB in fp32 until here)
            vae = AutoencoderKLWan()
        size, text = (480, 832), (512, 4096)
    else:
        raise SystemExit(f"--model must be one of {', '.join(MODELS)} or 'tiny', got {model!r}")
    pipe = SelfForcingPipeline(
        tokenizer=None,
        text_encoder=None,
        transformer=transformer.to(device=device, dtype=dtype).eval(),
        vae=vae.to(device=device, dtype=dtype).eval(),
        scheduler=SelfForcingScheduler(),
        default_height=size[0],
        default_width=size[1],
        max_sequence_length=text[0],
    )
    embeds = torch.randn(1, *text, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    return pipe, embeds


def parse_spec(spec: str):
    import genkv

    name, _, settings = spec.partition(":")
    overrides = dict(kv.split("=", 1) for kv in settings.split(",") if kv)
    return genkv.get_method(name, **overrides)


def check_specs(parser: argparse.ArgumentParser, specs: list[str]) -> None:
    """Parse every method spec before any work starts: a bad one (an unknown name, a value its method refuses)
    stops the run at once with one line, not after the methods before it have rendered."""
    for spec in specs:
        try:
            parse_spec(spec)
        except (ValueError, TypeError) as error:
            parser.error(f"--methods {spec}: {error}")


def flatness(chunk_seconds: list[float]) -> float | None:
    """Median of the last 20 chunks over the median of chunks 20-40 (1.0 = perfectly flat)."""
    if len(chunk_seconds) < 60:
        return None
    return statistics.median(chunk_seconds[-20:]) / statistics.median(chunk_seconds[20:40])


RECACHE_MODES: dict[str, bool | str] = {"on": True, "off": False, "flush": "flush"}


def switch_frames(pipe, frames: int, every: int) -> list[int]:
    """Output frames of a switch every ``every`` frames, each put where ``stream`` would put it (the chunk whose first
    latent frame is at or after the frame's latent frame), so ``stream`` has nothing to move or warn about; those
    with no chunk starting at or after them are dropped."""
    factor, chunk = pipe.vae_scale_factor_temporal, pipe.config.num_frames_per_chunk
    if every < factor * chunk:  # closer switches could fall on one chunk boundary (an error in stream)
        raise SystemExit(f"--switch-every must be at least a chunk's {factor * chunk} frames, got {every}")
    out = []
    for target in range(every, frames, every):
        latent = -(-target // factor)  # the latent frame that decodes to this output frame
        start = chunk * -(-latent // chunk)  # the first chunk start at or after it (chunks start at 3, 6, ...)
        first = 1 + factor * (start - 1)  # that chunk's first output frame
        if first < frames:
            out.append(first)
    return out


def switch_prompts(embeds: torch.Tensor, frames: list[int]) -> list[tuple[int, torch.Tensor]]:
    """(frame, embeds) pairs: a different random prompt embedding per switch (seeded, as the first prompt's)."""
    return [(f, torch.randn(embeds.shape, generator=torch.Generator().manual_seed(1000 + i)).to(embeds))
            for i, f in enumerate(frames)]


class SwitchProbe:
    """Counts the prompt switches a rollout really runs and what each re-cached.

    Wraps the pipeline's own ``_switch_prompt`` on the instance (the class is untouched): a switch the pipeline
    never makes is never counted, so an option that is ignored shows as 0 switches, not as the number asked for.
    """

    def __init__(self, pipe) -> None:
        self.pipe, self.inner = pipe, pipe._switch_prompt
        self.count = 0
        self.modes: list[bool | str] = []  # the mode each switch ran with (a keeper that cannot re-cache: False)
        self.recached: list[int] = []  # latent frames each switch re-committed (0: no re-cache)
        pipe._switch_prompt = self._switch

    def _switch(self, store, embeds, negative_embeds, mode, *args, **kwargs) -> None:
        self.pipe.last_recached_frames = None  # set again by the call only if it re-caches
        self.inner(store, embeds, negative_embeds, mode, *args, **kwargs)
        self.count += 1
        self.modes.append(mode)
        self.recached.append(len(self.pipe.last_recached_frames or ()))

    def close(self) -> None:
        del self.pipe._switch_prompt  # back to the class's method


def switch_summary(rows: list[dict], probe: SwitchProbe, frames: list[int], recache: bool | str) -> dict:
    """Switch count and cost: median seconds of the chunks a switch ran in minus the median of the other steady
    chunks (the first chunk, warm-up, and the last, partial or a flush, are not steady)."""
    with_switch = [r["seconds"] for r in rows[1:] if r["switches"]]
    others = [r["seconds"] for r in rows[1:-1] if not r["switches"]]
    switch_s = statistics.median(with_switch) if with_switch else None
    other_s = statistics.median(others) if others else None
    return {
        "switch_frames": frames,
        "recache": recache,
        "switches": probe.count,
        "switch_modes": probe.modes,
        "recaches": sum(1 for n in probe.recached if n),
        "recached_latent_frames": probe.recached,
        "switch_chunk_median_s": switch_s,
        "other_chunk_median_s": other_s,
        "switch_cost_s": switch_s - other_s if switch_s is not None and other_s is not None else None,
    }


def run_method(
    pipe, embeds, spec: str, frames: int, device, write_mp4: bool, compile_blocks: bool, profile: bool = False,
    overlap: bool | None = None, cuda_graphs: bool = False, fast_vae: bool | None = None, decoder: str = "wan",
    fp8: bool = False, switch_every: int = 0, recache: bool | str = True, vae_device: str | None = None,
) -> dict:
    import genkv
    from genkv.video import Mp4Writer

    if decoder == "taehv":  # TAEHV's architecture at random weights in fp16, as genkv runs the published file
        from genkv.pipelines.self_forcing.taehv import CHANNELS_LAST, TAEHVDecoder

        taehv = TAEHVDecoder().to(device=device, dtype=torch.float16).eval()
        pipe.set_decoder(taehv.use_channels_last(CHANNELS_LAST))  # the layout from_file gives a render
    if fp8:  # before compiling: Inductor then fuses the activation quantization into the producing kernels
        from genkv.fp8 import enable_fp8

        enable_fp8(pipe.transformer)
    if vae_device is not None:  # decode on another device (SelfForcingPipeline.set_vae_device)
        pipe.set_vae_device(vae_device)
    # the decoding GPU when it is another one: its peak memory is read per chunk as the main device's
    decode_gpu = pipe.vae_device if pipe.vae_device not in (None, pipe._execution_device) else None
    decode_gpu = decode_gpu if decode_gpu is not None and decode_gpu.type == "cuda" else None

    # every decoder option enable_compile turns on (until 2026-12-05 this set only the first three, so the "fast
    # VAE" rows of bench_rollout lacked the fused tap sums, transposed up-samplers and fused blocks)
    vae_flags = type(pipe).FAST_DECODE_FLAGS
    saved_vae = {name: getattr(pipe, name) for name in vae_flags}
    if fast_vae is not None:  # the plain path's VAE (all off) or the fast path's (all on, as enable_compile)
        pipe.enable_fast_decode(fast_vae)
    method = parse_spec(spec)
    genkv.apply_genkv(pipe, method)
    if compile_blocks:
        from genkv.compile import compile_transformer

        compile_transformer(pipe.transformer)
    rows: list[dict] = []
    result: dict = {"spec": spec, "method": method.to_dict(), "compile": compile_blocks, "frames_requested": frames,
                    "decoder": decoder, "fp8": fp8, "vae_device": vae_device,
                    "overlap_decode": overlap if overlap is not None else (device.type == "cuda" and not profile),
                    "cuda_graphs": cuda_graphs, "vae": {name: getattr(pipe, name) for name in vae_flags}}
    pipe.cuda_graphs = cuda_graphs
    tmp = tempfile.TemporaryDirectory()
    writer = Mp4Writer(Path(tmp.name) / "bench.mp4", fps=16) if write_mp4 else None
    generator = torch.Generator(device=device).manual_seed(0)
    cuda = device.type == "cuda"
    done = 0
    phases: list[dict] = []
    switches = switch_frames(pipe, frames, switch_every) if switch_every else []
    probe = SwitchProbe(pipe)
    seen_switches = 0
    start = last = time.perf_counter()
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            if decode_gpu is not None:
                torch.cuda.reset_peak_memory_stats(decode_gpu)
        for video in pipe.stream(
            prompt_embeds=embeds,
            num_frames=frames,
            generator=generator,
            profile=profile,
            on_chunk=phases.append,
            overlap_decode=overlap,
            prompt_switches=switch_prompts(embeds, switches),
            recache=recache,
        ):
            if writer is not None:
                writer.append(video)
            now = time.perf_counter()  # stream() returned host frames, so the GPU work of the chunk is done
            done += len(video)
            store = genkv.get_store(pipe)
            rows.append(
                {
                    "chunk": len(rows),
                    "frames_done": done,
                    "seconds": now - last,
                    "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
                    **({"vae_peak_memory_bytes": int(torch.cuda.max_memory_allocated(decode_gpu))}
                       if decode_gpu is not None else {}),
                    "kv_bytes": store.memory_bytes(),  # cheap: no device sync inside the timed loop
                    # switches run since the last yield: with the overlapped decode a chunk's frames come out one
                    # chunk late, so the switch is charged to the interval it ran in, not to the chunk's index
                    "switches": probe.count - seen_switches,
                    **{k: v for k, v in phases[-1].items() if k.endswith("_ms")},
                }
            )
            seen_switches = probe.count
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                if decode_gpu is not None:
                    torch.cuda.reset_peak_memory_stats(decode_gpu)
            last = now
    except torch.OutOfMemoryError:
        result["oom_at_frame"] = done
    finally:
        probe.close()
        if writer is not None:
            writer.close()
        tmp.cleanup()
    total = time.perf_counter() - start
    secs = [r["seconds"] for r in rows]
    # The first chunk carries warm-up (and compilation); steady state starts after it. The last one is left out
    # too: it may be partial, and with the overlapped decode it is only the flush of frames already made.
    steady = rows[1:-1] if len(rows) > 2 else rows[1:] if len(rows) > 1 else rows
    steady_frames = sum(r["frames_done"] - (rows[r["chunk"] - 1]["frames_done"] if r["chunk"] else 0) for r in steady)
    result.update(
        frames=done,
        seconds_total=total,
        fps_total=done / total if total else 0.0,
        fps_steady=steady_frames / sum(r["seconds"] for r in steady) if steady else 0.0,
        chunk_median_s=statistics.median(secs) if secs else None,
        flatness_last20_over_20to40=flatness(secs),
        peak_memory_bytes=max((r["peak_memory_bytes"] or 0) for r in rows) if rows else None,
        peak_memory_first_vs_last=(rows[min(40, len(rows) - 1)]["peak_memory_bytes"], rows[-1]["peak_memory_bytes"])
        if rows and cuda
        else None,
        kv_bytes_final=rows[-1]["kv_bytes"] if rows else None,
        vae_peak_memory_bytes=max((r.get("vae_peak_memory_bytes") or 0) for r in rows) if rows else None,
        vae_peak_memory_first_vs_last=(rows[min(40, len(rows) - 1)].get("vae_peak_memory_bytes"),
                                       rows[-1].get("vae_peak_memory_bytes")) if rows else None,
        final_stats={k: v for k, v in genkv.cache_stats(pipe).items() if k != "layers"},
        profile_median_ms={
            k: statistics.median(r[k] for r in steady) for k in (steady[0] if steady else {}) if k.endswith("_ms")
        },
        chunks=rows,
    )
    if switch_every:
        result["switch_every"] = switch_every
        result.update(switch_summary(rows, probe, switches, recache))
    graphs = pipe.last_graphs
    if graphs is not None:
        result["graph_stats"] = {"captures": graphs.captures, "replays": graphs.replays, "off_reason": graphs.reason}
    pipe.cuda_graphs = False
    for name, value in saved_vae.items():
        setattr(pipe, name, value)
    genkv.remove_genkv(pipe)
    if fp8:
        from genkv.fp8 import disable_fp8

        disable_fp8(pipe.transformer)
    if decoder != "wan":
        pipe.set_decoder("wan")
    if vae_device is not None:  # the VAE back on the pipeline's device for the next run
        pipe.set_vae_device(None)
        pipe.vae.to(device)
    if compile_blocks:
        torch._dynamo.reset()
    return result


class ShadowErrorReader:
    """Wraps a self-attention reader: also attends over a shadow *full* cache and records the relative error.

    The chunk's own K/V are the last ``S_q`` rows the store hands over; the shadow keeps every committed chunk
    (committed lazily when the next chunk starts: the last staging of a chunk is its clean pass).
    """

    def __init__(self, inner, errors: dict) -> None:
        from genkv.cache import LayerKVCache
        from genkv.read.dense import DenseSelfAttention

        self.inner, self.errors = inner, errors
        self.dense = DenseSelfAttention()
        self.caches: dict = {}
        self.make = LayerKVCache

    def attend(self, query, key, value, key_bias, *, layer_index=0, store=None, **kw):
        out = self.inner.attend(query, key, value, key_bias, layer_index=layer_index, store=store, **kw)
        n = query.shape[1]
        slot = (store.branch, layer_index)
        cache, frame = self.caches.get(slot, (None, None))
        if cache is None:
            cache = self.make()
        if frame is not None and frame != store.chunk.frame_start:
            cache.length += cache.staged  # the previous chunk's clean K/V become history
        self.caches[slot] = (cache, store.chunk.frame_start)
        k_full, v_full, _ = cache.stage(key[:, -n:], value[:, -n:])
        ref = self.dense.attend(query, k_full, v_full, None)
        err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12)).item()
        self.errors.setdefault(layer_index, []).append(err)
        return out


def measure_attention_error(pipe, embeds, spec: str, frames: int, device) -> dict:
    """Relative error of every layer's self-attention output against the full cache, over a short rollout."""
    import genkv

    genkv.apply_genkv(pipe, parse_spec(spec))
    errors: dict = {}
    for proc in pipe.transformer.attn_processors.values():
        if hasattr(proc, "_attend_cached"):
            proc.reader = ShadowErrorReader(proc.reader, errors)
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in pipe.stream(prompt_embeds=embeds, num_frames=frames, generator=generator, output_type="latent"):
        pass
    genkv.remove_genkv(pipe)
    per_layer = {layer: statistics.mean(v[-20:]) for layer, v in sorted(errors.items())}
    return {"frames": frames, "per_layer_last_calls": per_layer, "mean": statistics.mean(per_layer.values()),
            "max": max(per_layer.values())}


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for run in results["runs"]:
        label = run["spec"] + (" +compile" if run["compile"] else "") + (" +graphs" if run.get("cuda_graphs") else "")
        x = [r["frames_done"] for r in run["chunks"]]
        axes[0].plot(x, [r["seconds"] * 1000 for r in run["chunks"]], label=label)
        if run["chunks"] and run["chunks"][0]["peak_memory_bytes"] is not None:
            axes[1].plot(x, [r["peak_memory_bytes"] / 2**30 for r in run["chunks"]], label=label)
        axes[2].plot(x, [r["kv_bytes"] / 2**30 for r in run["chunks"]], label=label)
    for ax, title in zip(axes, ("chunk latency (ms)", "peak GPU memory per chunk (GiB)", "KV cache (GiB)")):
        ax.set_title(title)
        ax.set_xlabel("video frame")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    env = results["environment"]
    fig.suptitle(f"genkv rollout, {results['model']} {results['height']}x{results['width']}, {env['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def print_table(results: dict) -> None:
    header = f"{'method':44s} {'frames':>6s} {'fps(all)':>8s} {'fps(steady)':>11s} {'chunk ms':>9s} {'flat':>5s} " \
             f"{'peak GiB':>8s} {'KV GiB':>7s}"
    print(header)
    print("-" * len(header))
    for run in results["runs"]:
        label = run["spec"] + (" +compile" if run["compile"] else "") + (" +graphs" if run.get("cuda_graphs") else "")
        label += " +fast VAE" if run.get("vae") and all(run["vae"].values()) and run.get("decoder", "wan") == "wan" else ""
        label += " +TAEHV" if run.get("decoder") == "taehv" else ""
        label += " +FP8" if run.get("fp8") else ""
        label += f" +VAE on {run['vae_device']}" if run.get("vae_device") else ""
        flat = run["flatness_last20_over_20to40"]
        peak = run["peak_memory_bytes"]
        print(
            f"{label:44s} {run['frames']:6d} {run['fps_total']:8.2f} {run['fps_steady']:11.2f} "
            f"{(run['chunk_median_s'] or 0) * 1000:9.1f} {('%.3f' % flat) if flat else '  -':>5s} "
            f"{(peak or 0) / 2**30:8.2f} {(run['kv_bytes_final'] or 0) / 2**30:7.2f}"
            + (f"  OOM at frame {run['oom_at_frame']}" if "oom_at_frame" in run else "")
        )
        if run.get("attention_error"):
            e = run["attention_error"]
            print(f"    attention rel. error vs full cache at {e['frames']} frames: mean {e['mean']:.3e}, max {e['max']:.3e}")
        if run.get("vae_peak_memory_bytes"):
            first, last = run["vae_peak_memory_first_vs_last"]
            print(f"    VAE device {run['vae_device']}: peak {run['vae_peak_memory_bytes'] / 2**30:.2f} GiB "
                  f"(chunk 40: {(first or 0) / 2**30:.2f}, last: {(last or 0) / 2**30:.2f})")
        if run.get("graph_stats"):
            g = run["graph_stats"]
            print(f"    CUDA graphs: {g['captures']} recorded, {g['replays']} replays"
                  + (f"; off: {g['off_reason']}" if g["off_reason"] else ""))
        secs = sorted(r["seconds"] for r in run["chunks"][5:-1])  # the last chunk: partial, or a flush
        if secs:
            print(f"    chunks after the 5th: median {1000 * secs[len(secs) // 2]:.1f} ms, "
                  f"10th percentile {1000 * secs[len(secs) // 10]:.1f} ms, fastest {1000 * secs[0]:.1f} ms")
        if run.get("switch_every"):
            ms = lambda key, sign="": "-" if run[key] is None else f"{1000 * run[key]:{sign}.1f} ms"  # noqa: E731
            mode = {True: "on", False: "off", "flush": "flush"}[run["recache"]]
            print(f"    switches every {run['switch_every']} frames (recache {mode}): {run['switches']} switches, "
                  f"{run['recaches']} re-cached; switch chunk median {ms('switch_chunk_median_s')} vs other chunks "
                  f"{ms('other_chunk_median_s')}: {ms('switch_cost_s', '+')} per switch")
        if run.get("profile_median_ms"):
            split = ", ".join(f"{k[:-3]} {v:.1f}" for k, v in run["profile_median_ms"].items())
            print(f"    median ms per chunk: {split}")


def hopper_kernel_state(block_sparse, block_sparse_hopper) -> dict:
    """What the run's bf16 reads on Hopper take: the Gluon kernel switched on (env or default), buildable by this
    Triton, and its variant (or why the switches contradict each other: recorded, not raised, so a bad env does
    not stop a run that may never read through it)."""
    from genkv.switches import env_flag

    try:
        variant = block_sparse_hopper.kernel_variant()
    except ValueError as error:
        variant = f"error: {error}"
    return {"switched_on": env_flag("GENKV_HOPPER_KERNEL", block_sparse.DEFAULT_HOPPER),
            "triton_builds_it": block_sparse_hopper.gluon_supported(), "variant": variant}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["full", "rolling:window_frames=21"])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--model", default="wan-1.3b", help="wan-1.3b or wan-14b (random weights, real shapes) or tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bf16 (default on CUDA) or fp32")
    parser.add_argument("--attention-backend", default=None, help="diffusers backend, e.g. _native_cudnn")
    parser.add_argument("--fast", action="store_true",
                        help="run each method on the plain path and on the fast path of `genkv render --compile` "
                        "(compiled blocks, CUDA graphs on CUDA, channels-last + 2-D-tap + fused-norm VAE), same run")
    parser.add_argument("--extras", nargs="*", default=[], choices=("taehv", "fp8", "taehv+fp8"),
                        help="with --fast: also the fast path with the TAEHV decoder (random weights), FP8 linears, "
                        "or both (opt-in paths whose output differs from the plain path's)")
    parser.add_argument("--compile", action="store_true", help="also run each method with compiled blocks")
    parser.add_argument("--compile-only", action="store_true", help="only the compiled runs")
    parser.add_argument("--no-mp4", action="store_true", help="skip mp4 encoding")
    parser.add_argument("--profile", action="store_true", help="time each chunk's phases (one sync per chunk)")
    parser.add_argument("--cuda-graphs", choices=("auto", "off", "on", "both"), default="auto",
                        help="replay each chunk's later forwards from a CUDA graph; 'both' runs each with and without; "
                        "auto: on for the fast path of --fast (CUDA), off otherwise")
    parser.add_argument("--decode-launch", choices=("auto", "early", "late"), default="auto",
                        help="overlapped decode queued before the clean pass (early) or after the commit (late)")
    parser.add_argument("--no-overlap", action="store_true", help="decode on the main stream (no overlap)")
    parser.add_argument("--vae-channels-last", action="store_true", help="channels-last 3-D VAE convolutions")
    parser.add_argument("--vae-conv2d-taps", action="store_true", help="VAE 3-D convolutions as per-tap 2-D ones")
    parser.add_argument("--vae-fused-norms", action="store_true", help="VAE RMS norms fused (compiled on CUDA)")
    parser.add_argument("--vae-frames-per-call", type=int, default=None,
                        help="latent frames per VAE decoder call (default: a chunk's; 1 as upstream)")
    parser.add_argument("--error-frames", type=int, default=0,
                        help="also measure each layer's attention error vs a shadow full cache over this many frames")
    parser.add_argument("--switch-every", type=int, default=0, metavar="N",
                        help="switch to a new random prompt embedding every N frames (at the chunk boundary at or "
                        "after each multiple of N), through the pipeline's prompt-switch path; 0: no switches")
    parser.add_argument("--recache", choices=tuple(RECACHE_MODES), default="on",
                        help="with --switch-every: the self-attention cache at a switch: on (re-cache, LongLive), "
                        "off (kept), flush (sinks + newest frame, infinity-RoPE)")
    parser.add_argument("--vae-device", nargs="+", default=["none"], metavar="DEVICE",
                        help="decode on this device (e.g. cuda:1); several: one run each ('none': the "
                             "pipeline's own device), so one GPU and two compare in the same run")
    parser.add_argument("--out", type=Path, default=Path("bench_rollout.json"))
    parser.add_argument("--plot-only", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.plot_only is not None:
        results = json.loads(args.plot_only.read_text())
        print_table(results)
        png = args.plot_only.with_suffix(".png")
        print(f"plot: {png}" if plot(results, png) else "matplotlib is not installed: no plot")
        return 0

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    pipe, embeds = build_pipeline(args.model, device, dtype)
    if args.switch_every:
        switch_frames(pipe, args.frames, args.switch_every)  # a bad --switch-every fails now, not after a run
    if args.attention_backend:
        pipe.transformer.set_attention_backend(args.attention_backend)
    pipe.decode_channels_last = args.vae_channels_last
    pipe.decode_conv2d_taps = args.vae_conv2d_taps
    pipe.decode_fused_norms = args.vae_fused_norms
    pipe.decode_frames_per_call = args.vae_frames_per_call
    pipe.decode_early = {"auto": None, "early": True, "late": False}[args.decode_launch]

    import diffusers

    from genkv.kernels import block_sparse, block_sparse_hopper, quant_kv

    results = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "model": args.model,
        "height": pipe.config.default_height,
        "width": pipe.config.default_width,
        "dtype": str(dtype),
        "attention_backend": args.attention_backend or "default",
        "vae_channels_last": args.vae_channels_last,
        "vae_conv2d_taps": args.vae_conv2d_taps,
        "vae_fused_norms": args.vae_fused_norms,
        "vae_frames_per_call": args.vae_frames_per_call,
        "decode_launch": args.decode_launch,
        "switch_every": args.switch_every,
        "recache": args.recache,
        "environment": {
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "cuda": torch.version.cuda,
            # the library's switches as this run had them (env and the defaults they override)
            "genkv_env": {name: value for name, value in sorted(os.environ.items()) if name.startswith("GENKV_")},
            "kv_scale_layout": quant_kv.SCALE_LAYOUT,
            "hopper_kernel": hopper_kernel_state(block_sparse, block_sparse_hopper),
        },
        "runs": [],
    }
    # (compiled blocks, CUDA graphs, VAE: None = the --vae-* flags, False = plain, True = fast)
    if args.fast:
        if args.cuda_graphs == "both":
            raise SystemExit("--fast compares the plain path with the fast one; pick --cuda-graphs on or off for it")
        fast_graphs = device.type == "cuda" and args.cuda_graphs != "off"
        # (--compile-only: the fast path alone, e.g. when the plain one was measured in an earlier run)
        variants = ([] if args.compile_only else [(False, False, False)]) + [(True, fast_graphs, True)]
        # the opt-in fast paths (output changes): the tiny decoder, FP8 linears, both
        variants += [(True, fast_graphs, True, extra) for extra in args.extras]
    else:
        compiled_variants = [True] if args.compile_only else ([False, True] if args.compile else [False])
        graph_variants = {"auto": [False], "off": [False], "on": [True], "both": [False, True]}[args.cuda_graphs]
        variants = [(c, g, None) for c in compiled_variants for g in graph_variants]
    vae_devices = [None if d == "none" else d for d in args.vae_device]
    for spec, (compiled, graphs, fast_vae, *extra), vae_device in (
        (s, v, d) for s in args.methods for v in variants for d in vae_devices):  # one run each
        extra = extra[0] if extra else ""
        run = run_method(
            pipe, embeds, spec, args.frames, device, not args.no_mp4, compiled, args.profile,
            False if args.no_overlap else None, graphs, fast_vae,
            decoder="taehv" if "taehv" in extra else "wan", fp8="fp8" in extra,
            switch_every=args.switch_every, recache=RECACHE_MODES[args.recache], vae_device=vae_device,
        )
        if args.error_frames and not compiled:
            run["attention_error"] = measure_attention_error(pipe, embeds, spec, args.error_frames, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results["runs"].append(run)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print_table({"runs": [run]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print_table(results)
    png = args.out.with_suffix(".png")
    print(f"json: {args.out}; " + (f"plot: {png}" if plot(results, png) else "no plot (matplotlib missing)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
