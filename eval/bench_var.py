"""KV memory, peak memory and time per image of VAR sampling: full cache vs ``scalekv`` vs ``hack``.

    python eval/bench_var.py --out runs/bench_var.json                  # on a GPU: VAR-d30 @256, VAR-d36 @512
    python eval/bench_var.py --tiny --out /tmp/bench_var.json           # seconds on a CPU (plumbing check)

Random weights at the official shapes (timings and memory do not depend on the values): VAR-d30 (1920 wide,
30 heads, 256px, 680 tokens) and VAR-d36 (2304 wide, shared AdaLN, 512px, 2240 tokens), the official VQ-VAE
(ch 160, 4096 x 32). For each model, method and batch (8 and 32 images, x2 rows for guidance): seconds per
image (median of ``--repeats`` after a warm-up), peak GPU memory, and KV memory (the largest cache kept between
scales, all layers, both guidance branches). Then the largest batch that fits, by doubling and bisection. Prints
a table and writes JSON after every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

MODELS = {
    "var-d30-256": dict(depth=30, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), shared_aln=False),
    "var-d36-512": dict(depth=36, patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32), shared_aln=True),
}
METHODS = {"full": ("full", {}), "scalekv-0.1": ("scalekv", {"budget": 0.1, "mode": "genkv"}),
           "hack-0.3": ("hack", {"budget": 0.3, "mode": "genkv"})}


def build(name: str, device: torch.device, dtype: torch.dtype, tiny: bool):
    from genkv.pipelines.var import MultiScaleVQVAE, VARConfig, VARPipeline, VARTransformer

    if tiny:
        from genkv.testing import tiny_var_pipeline

        return tiny_var_pipeline().to(device)
    spec = MODELS[name]
    config = VARConfig(depth=spec["depth"], patch_nums=spec["patch_nums"], shared_aln=spec["shared_aln"])
    with torch.device(device):
        transformer = VARTransformer(config).init_random(None, std=0.02).to(dtype).eval()
        vqvae = MultiScaleVQVAE(patch_nums=spec["patch_nums"]).eval()
    return VARPipeline(transformer, vqvae)


def run_once(pipe, batch: int, device: torch.device, classes: int) -> tuple[float, int]:
    labels = [i % classes for i in range(batch)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    pipe(class_labels=labels, guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="pt")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
    return seconds, peak


def fits(pipe, batch: int, device: torch.device, classes: int) -> bool:
    try:
        run_once(pipe, batch, device, classes)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(pipe, device, classes: int, start: int, limit: int, tolerance: float = 1 / 16,
                  known_bad: int | None = None) -> int:
    """Doubling from ``start`` until out of memory (or ``limit``), then bisection to within ``tolerance``
    (towards ``known_bad``, a batch already seen not to fit, when the doubling stopped at the limit).
    0 when ``start`` itself does not fit."""
    good, bad = 0, None
    batch = start
    while batch <= limit:
        if fits(pipe, batch, device, classes):
            good, batch = batch, batch * 2
        else:
            bad = batch
            break
    if bad is None and known_bad is not None and good and known_bad > good:
        bad = known_bad
    if bad is None:
        return good
    while good and bad - good > max(1, int(good * tolerance)):
        mid = (good + bad) // 2
        if fits(pipe, mid, device, classes):
            good = mid
        else:
            bad = mid
    return good


def main(argv: list[str] | None = None) -> int:
    import genkv

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch-limit", type=int, default=1024, help="stop the largest-batch search here")
    parser.add_argument("--no-max-batch", action="store_true")
    parser.add_argument("--max-batch-only", action="store_true", help="only the largest-batch search")
    parser.add_argument("--target-ratio", type=float, default=4.0,
                        help="the compressed methods' largest-batch search starts at this multiple of full's (each "
                             "try at thousands of images costs tens of seconds)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random VAR (CPU plumbing check)")
    parser.add_argument("--out", type=Path, default=Path("bench_var.json"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype), "rows": []}
    models = ["tiny"] if args.tiny else args.models
    for name in models:
        pipe = build(name, device, dtype, args.tiny)
        classes = pipe.transformer.config.num_classes
        for label in args.methods:
            method, overrides = METHODS[label]
            genkv.apply_genkv(pipe, method, **overrides)
            for batch in [] if args.max_batch_only else args.batches:
                row = {"model": name, "method": label, "batch": batch}
                try:
                    run_once(pipe, batch, device, classes)  # warm-up (cuDNN autotuning, allocator)
                    runs = [run_once(pipe, batch, device, classes) for _ in range(args.repeats)]
                    stats = genkv.cache_stats(pipe)
                    row.update(seconds_per_image=statistics.median(r[0] for r in runs) / batch,
                               peak_memory_bytes=max(r[1] for r in runs), kv_bytes=stats["peak_bytes"])
                except torch.OutOfMemoryError:
                    row["oom"] = True
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                result["rows"].append(row)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1))
                print(json.dumps(row), flush=True)
            if not args.no_max_batch:
                start = max(args.batches)
                full_best = result.get("largest_batch", {}).get(f"{name}/full")
                if label != "full" and full_best:
                    start = max(start, int(full_best * args.target_ratio))
                # With full's largest batch known, twice the target is enough to tell whether it is met;
                # without it (full not in this run), search up to the limit.
                limit = 2 * start if label != "full" and full_best else args.max_batch_limit
                best = largest_batch(pipe, device, classes, start, max(start, limit), tolerance=1 / 8)
                if best == 0:  # below the target ratio: search up from the benchmark's batches instead
                    best = largest_batch(pipe, device, classes, max(args.batches), start, tolerance=1 / 8,
                                         known_bad=start)
                result.setdefault("largest_batch", {})[f"{name}/{label}"] = best
                args.out.write_text(json.dumps(result, indent=1))
                print(f"{name} {label}: largest batch {best}", flush=True)
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    full = {(r["model"], r["batch"]): r for r in result["rows"] if r["method"] == "full" and not r.get("oom")}
    print(f"\n{'model':12s} {'method':12s} {'batch':>5s} {'s/img':>8s} {'speedup':>8s} {'peak GiB':>9s} "
          f"{'KV GiB':>8s} {'KV vs full':>10s}")
    for r in result["rows"]:
        if r.get("oom"):
            print(f"{r['model']:12s} {r['method']:12s} {r['batch']:5d} out of memory")
            continue
        ref = full.get((r["model"], r["batch"]))
        speed = ref["seconds_per_image"] / r["seconds_per_image"] if ref else float("nan")
        kv = r["kv_bytes"] / ref["kv_bytes"] if ref and ref["kv_bytes"] else float("nan")
        print(f"{r['model']:12s} {r['method']:12s} {r['batch']:5d} {r['seconds_per_image']:8.4f} {speed:8.2f} "
              f"{r['peak_memory_bytes'] / 2**30:9.2f} {r['kv_bytes'] / 2**30:8.3f} {kv:10.1%}")
    for key, best in result.get("largest_batch", {}).items():
        print(f"largest batch {key}: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
