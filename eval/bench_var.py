"""KV memory, time per image, largest batch and images/s at that batch of next-scale sampling (VAR, Infinity):
full cache vs ``scalekv`` (budget 0.1) vs ``hack`` (budget 0.3), as their authors run them (``mode="official"``).

    python eval/bench_var.py --time-budget-s 420 --out runs/bench_var.json   # one H200, all four models, ~8 min
    python eval/bench_var.py --tiny --out /tmp/bench_var.json                # seconds on a CPU (plumbing check)

Random weights at the official shapes (timings and memory do not depend on the values):

- VAR-d30 (1920 wide, 30 heads, 256px, 680 tokens) and VAR-d36 (2304 wide, shared AdaLN, 512px, 2240 tokens),
  the official VQ-VAE (ch 160, 4096 x 32); guidance 4 on class labels;
- Infinity-2B (32 blocks, 2048 wide, 16 heads, 32-bit tokens, tokenizer d32 with stride 16) and Infinity-8B
  (40 blocks, 3584 wide, 28 heads, 56 = 4 x 14 bits per token, tokenizer d14 with stride 8), 1024x1024 (13
  scales, 10521 tokens); guidance 4 on random T5 features (32 tokens, no text encoder run). ScaleKV's drafter
  layers are the official budget files' ({0, 23} for 2B, {0, 1, 2} for 8B).

For each model and method:

1. seconds per image at each of ``--batches`` (default 1 and 8; median of ``--repeats`` after a warm-up), peak
   GPU memory, and KV memory (the largest cache kept between scales, all layers, both guidance branches);
2. the largest batch that fits. On a GPU it is predicted from the peak memory of step 1 (peak = fixed +
   per-image x batch, against the memory free at the start), capped by ``--max-batch-limit`` and by the time
   left, then verified by sampling at it (stepping down 10% at a time when it does not fit). ``--search
   bisect`` is the slower doubling + bisection search. On a CPU (nothing runs out of memory) it doubles up to
   the limit;
3. images/s at that batch: one timed sampling right after the one that verified the batch (its warm-up), and
   the ratio to full's best images/s on the same model (issue target: scalekv >= 1.5x).

``--time-budget-s`` bounds the whole run: every (model, method) gets an equal share of the time left, and a
batch whose sampling (verification + timed run, estimated from step 1) would not fit in that share is lowered;
such a batch is marked ``capped: "time"`` (a lower bound of the largest batch). Within about 8 minutes all four
models run, but the compressed methods' batches (thousands of VAR images, ~100 Infinity images, a sampling each
to verify and to time) are expected to come out time-capped; uncapped needs about twice that, e.g. one command
per family: ``--models var-d30-256 var-d36-512`` and ``--models infinity-2b-1024 infinity-8b-1024``, each with
``--time-budget-s 540``. Prints a table and writes the JSON after every row.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

MODELS = {
    "var-d30-256": dict(kind="var", depth=30, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), shared_aln=False),
    "var-d36-512": dict(kind="var", depth=36, patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32), shared_aln=True),
    "infinity-2b-1024": dict(kind="infinity", depth=32, embed_dim=2048, num_heads=16, bits=32, mlp_hidden=8192,
                             vae=dict(bits=32, ch_mult=(1, 2, 4, 4, 4), upsample=(1, 2, 3, 4)), drafters="0,23"),
    "infinity-8b-1024": dict(kind="infinity", depth=40, embed_dim=3584, num_heads=28, bits=56, mlp_hidden=14336,
                             vae=dict(bits=14, ch_mult=(1, 2, 4, 4), upsample=(1, 2, 3)), drafters="0,1,2"),
}
TINY = {"tiny": dict(kind="var"), "tiny-infinity": dict(kind="infinity", drafters="0")}
#: label -> (method, overrides); the ``-genkv`` rows are genkv's earlier selection rules (``mode="genkv"``).
METHODS = {"full": ("full", {}), "scalekv-0.1": ("scalekv", {"budget": 0.1}), "hack-0.3": ("hack", {"budget": 0.3}),
           "scalekv-0.1-genkv": ("scalekv", {"budget": 0.1, "mode": "genkv"}),
           "hack-0.3-genkv": ("hack", {"budget": 0.3, "mode": "genkv"})}
DEFAULT_METHODS = ["full", "scalekv-0.1", "hack-0.3"]
TEXT_TOKENS = 32  # T5 tokens per prompt in the Infinity runs
GUIDANCE = 4.0


def build(name: str, device: torch.device, dtype: torch.dtype):
    from genkv.pipelines.infinity import BitwiseDecoder, InfinityConfig, InfinityPipeline, InfinityTransformer
    from genkv.pipelines.var import MultiScaleVQVAE, VARConfig, VARPipeline, VARTransformer

    if name in TINY:
        from genkv.testing import tiny_infinity_pipeline, tiny_var_pipeline

        return (tiny_var_pipeline() if TINY[name]["kind"] == "var" else tiny_infinity_pipeline()).to(device)
    spec = MODELS[name]
    with torch.device(device):
        if spec["kind"] == "var":
            config = VARConfig(depth=spec["depth"], patch_nums=spec["patch_nums"], shared_aln=spec["shared_aln"])
            transformer = VARTransformer(config).init_random(None, std=0.02).to(dtype).eval()
            return VARPipeline(transformer, MultiScaleVQVAE(patch_nums=spec["patch_nums"]).eval())
        config = InfinityConfig(depth=spec["depth"], embed_dim=spec["embed_dim"], num_heads=spec["num_heads"],
                                bits=spec["bits"], mlp_hidden=spec["mlp_hidden"])
        transformer = InfinityTransformer(config).init_random(None, std=0.02).to(dtype).eval()
        vae = BitwiseDecoder(**spec["vae"]).eval()
    return InfinityPipeline(transformer, vae, tokenizer=None, text_encoder=None, pn="1M")


class Sampler:
    """``sampler(batch)``: one full sampling (with guidance, decoded to pixels) of ``batch`` images. ``probe``
    holds, for the last sampling on a GPU, the peak memory before the first decode call and the memory held when
    it starts (the decoder runs on ``decode_batch`` images at a time, so its activations stop growing with the
    batch beyond that: the largest-batch prediction models the two phases apart)."""

    def __init__(self, pipe, device: torch.device) -> None:
        self.pipe, self.device, self.probe = pipe, device, {}
        self.decode_batch = pipe.decode_batch
        vae, method = (pipe.vqvae, "decode_fhat") if hasattr(pipe, "vqvae") else (pipe.vae, "decode")
        decode = getattr(vae, method)

        def probed(*args, **kwargs):
            if device.type == "cuda" and not self.probe:
                self.probe = {"pre_decode_peak_bytes": int(torch.cuda.max_memory_allocated(device)),
                              "decode_start_bytes": int(torch.cuda.memory_allocated(device))}
            return decode(*args, **kwargs)

        setattr(vae, method, probed)

    def __call__(self, batch: int):
        self.probe = {}
        pipe, device = self.pipe, self.device
        if hasattr(pipe.transformer.config, "num_classes"):  # VAR
            classes = pipe.transformer.config.num_classes
            return pipe(class_labels=[i % classes for i in range(batch)], guidance_scale=GUIDANCE,
                        generator=torch.Generator().manual_seed(0), output_type="pt")
        g = torch.Generator(device=device).manual_seed(0)
        features = torch.randn(batch, TEXT_TOKENS, pipe.transformer.config.text_channels, generator=g,
                               device=device)
        mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.bool, device=device)
        return pipe(prompt_embeds=(features, mask), guidance_scale=GUIDANCE, generator=g, output_type="pt")


def run_once(sample, batch: int, device: torch.device) -> tuple[float, int]:
    """(seconds, peak bytes allocated) of one sampling of ``batch`` images."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    sample(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
    return seconds, peak


def try_run(sample, batch: int, device: torch.device) -> tuple[float, int] | None:
    """``run_once``, or None when out of memory (the allocator's cache is then emptied)."""
    try:
        return run_once(sample, batch, device)
    except torch.OutOfMemoryError:
        pass  # the failed sampling's tensors are freed once the exception is gone
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return None


def largest_batch(sample, device, start: int, limit: int, tolerance: float = 1 / 16,
                  known_bad: int | None = None) -> int:
    """Doubling from ``start`` until out of memory (or ``limit``), then bisection to within ``tolerance``
    (towards ``known_bad``, a batch already seen not to fit, when the doubling stopped at the limit).
    0 when ``start`` itself does not fit."""
    good, bad = 0, None
    batch = start
    while batch <= limit:
        if try_run(sample, batch, device) is not None:
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
        if try_run(sample, mid, device) is not None:
            good = mid
        else:
            bad = mid
    return good


def _line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(intercept, slope) through the two largest batches of ``points`` (batch, bytes)."""
    (b0, y0), (b1, y1) = sorted(points)[-2:]
    slope = max(0.0, (y1 - y0) / (b1 - b0))
    return y1 - slope * b1, slope


def predict_batch(rows: list[dict], usable: float, decode_batch: int) -> int | None:
    """The largest batch whose peak stays within ``usable`` bytes, from the measured rows: sampling peaks
    (before decoding) and the memory held when decoding starts are linear in the batch; the decoder adds its
    activations for ``decode_batch`` images (measured at the largest row, scaled up when that row was smaller).
    With a single measured batch the lines start at the memory held before sampling (``base_memory_bytes``);
    None without (or without the decode probe, i.e. off a GPU)."""
    rows = [r for r in rows if not r.get("oom") and "pre_decode_peak_bytes" in r]
    # one batch (the other out of memory): the line from the memory held before sampling (the weights)
    origin = [(0, r["base_memory_bytes"]) for r in rows[:1] if len({r["batch"] for r in rows}) == 1
              and "base_memory_bytes" in r]
    if len({r["batch"] for r in rows}) + len(origin) < 2:
        return None
    sampling = _line(origin + [(r["batch"], r["pre_decode_peak_bytes"]) for r in rows])
    held = _line(origin + [(r["batch"], r["decode_start_bytes"]) for r in rows])
    top = max(rows, key=lambda r: r["batch"])
    transient = max(0, top["peak_memory_bytes"] - top["decode_start_bytes"]) * max(1.0, decode_batch / top["batch"])
    bounds = [(usable - fixed) / slope for fixed, slope in (sampling, (held[0] + transient, held[1])) if slope > 0]
    return max(0, int(min(bounds))) if bounds else None


def usable_memory(device: torch.device) -> int:
    """Bytes the allocator can reach: free on the device plus what torch holds already."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device))


def predicted_largest(sample, device, rows, usable: int, limit: int, seconds_left: float, margin: float = 0.95
                      ) -> dict:
    """The largest batch predicted from the measured rows (:func:`predict_batch`, ``margin`` of the memory),
    capped by ``limit`` and by the time left (a verification and a timed sampling), then verified by sampling
    at it, 10% lower at each out-of-memory. Not searched above the prediction."""
    timed = [r for r in rows if not r.get("oom")]
    predicted = predict_batch(rows, usable * margin, sample.decode_batch)
    if predicted is None or not timed:
        return {"batch": 0, "capped": None, "predicted": predicted, "note": "no batch measured"}
    per_image_s = min(r["seconds_per_image"] for r in timed)  # an estimate: large batches are faster per image
    known = max(r["batch"] for r in timed)  # fits already
    by_time = max(known, int(seconds_left / (2 * per_image_s)))
    batch, capped = max(min(predicted, limit, by_time), min(known, limit)), None  # a measured batch fits
    if batch < predicted:
        capped = "limit" if limit <= by_time else "time"
    deadline = time.perf_counter() + seconds_left
    while batch >= 1:
        result = try_run(sample, batch, device)
        if result is not None:
            return {"batch": batch, "capped": capped, "predicted": predicted, "verify_seconds": result[0]}
        batch = int(batch * 0.9)
        if batch > known and time.perf_counter() + 2 * batch * per_image_s > deadline:
            batch = max(known, int(max(0.0, deadline - time.perf_counter()) / (2 * per_image_s)))
            capped = "time"
    return {"batch": 0, "capped": capped, "predicted": predicted, "note": "nothing fitted"}


def searched_largest(sample, device, args, start: int, full_best: int | None, is_full: bool) -> dict:
    """Doubling + bisection (``--search bisect``, and on a CPU, where it ends at the limit)."""
    if not is_full and full_best:
        start = max(start, int(full_best * args.target_ratio))
    # With full's largest batch known, twice the target is enough to tell whether it is met;
    # without it (full not in this run), search up to the limit.
    limit = min(2 * start, args.max_batch_limit) if not is_full and full_best else args.max_batch_limit
    start = min(start, limit)
    best = largest_batch(sample, device, start, limit, tolerance=1 / 8)
    if best == 0:  # below the target ratio: search up from the benchmark's batches instead
        best = largest_batch(sample, device, min(args.batches), start, tolerance=1 / 8, known_bad=start)
    capped = "limit" if best >= args.max_batch_limit else None
    return {"batch": best, "capped": capped, "predicted": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS) + list(TINY))
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
                        help="the -genkv labels run genkv's earlier selection (mode='genkv')")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 8 (1 2 with --tiny)")
    parser.add_argument("--repeats", type=int, default=None, help="default 2 (1 with --tiny)")
    parser.add_argument("--max-batch-limit", type=int, default=None,
                        help="never try a larger batch (default 4096; 4 with --tiny)")
    parser.add_argument("--no-max-batch", action="store_true", help="skip the largest batch and its images/s")
    parser.add_argument("--max-batch-only", action="store_true", help="only the largest batch and its images/s")
    parser.add_argument("--search", choices=["predict", "bisect"], default="predict",
                        help="GPU: predict the largest batch from peak memory and verify it (default), or the "
                             "doubling + bisection search (several samplings at thousands of images)")
    parser.add_argument("--target-ratio", type=float, default=4.0,
                        help="--search bisect: the compressed methods' search starts at this multiple of full's")
    parser.add_argument("--time-budget-s", type=float, default=450.0,
                        help="the whole run's time (--search predict): each model and method gets an equal share "
                             "of what is left for its largest batch")
    parser.add_argument("--tiny", action="store_true", help="the tiny random VAR and Infinity (CPU plumbing check)")
    parser.add_argument("--out", type=Path, default=Path("bench_var.json"))
    args = parser.parse_args(argv)
    for option, full_size, tiny in (("batches", [1, 8], [1, 2]), ("repeats", 2, 1), ("max_batch_limit", 4096, 4)):
        if getattr(args, option) is None:
            setattr(args, option, tiny if args.tiny else full_size)
    threads = torch.get_num_threads()
    if args.tiny:  # the tiny models gain nothing from threads, and lose a lot on a busy host
        torch.set_num_threads(1)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    import genkv

    deadline = time.perf_counter() + args.time_budget_s
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    usable = usable_memory(device) if device.type == "cuda" else 0  # before any model is built
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype), "time_budget_s": args.time_budget_s,
              "usable_memory_bytes": usable, "rows": [], "largest_batch": {}, "throughput": {}}
    models = list(TINY) if args.tiny else args.models
    units_left = len(models) * len(args.methods)

    def save():
        add_ratios(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))

    for name in models:
        pipe = build(name, device, dtype)
        sample = Sampler(pipe, device)
        spec = TINY.get(name) or MODELS[name]
        for label in args.methods:
            method, overrides = METHODS[label]
            if method == "scalekv" and overrides.get("mode", "official") == "official" and "drafters" in spec:
                overrides = {**overrides, "drafters": spec["drafters"]}
            genkv.apply_genkv(pipe, method, **overrides)
            result.setdefault("methods", {})[f"{name}/{label}"] = genkv.get_method(method, **overrides).to_dict()
            rows = []
            for batch in [] if args.max_batch_only else args.batches:
                row = {"model": name, "method": label, "batch": batch}
                try:
                    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                    run_once(sample, batch, device)  # warm-up (cuDNN autotuning, allocator)
                    runs = [run_once(sample, batch, device) for _ in range(args.repeats)]
                    seconds = statistics.median(r[0] for r in runs)
                    row.update(seconds_per_image=seconds / batch, images_per_s=batch / seconds,
                               peak_memory_bytes=max(r[1] for r in runs), base_memory_bytes=base,
                               kv_bytes=genkv.cache_stats(pipe)["peak_bytes"], **sample.probe)
                except torch.OutOfMemoryError:
                    row["oom"] = True
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                result["rows"].append(row)
                save()
                print(json.dumps(row), flush=True)
            if not args.no_max_batch:
                key = f"{name}/{label}"
                share = max(0.0, deadline - time.perf_counter()) / max(1, units_left)
                full_best = result["largest_batch"].get(f"{name}/full")
                if device.type == "cuda" and args.search == "predict":
                    if not rows:  # --max-batch-only: one untimed-quality sampling per batch for the memory fit
                        rows = [r for r in (measure_one(sample, device, b, name, label) for b in args.batches) if r]
                    found = predicted_largest(sample, device, rows, usable, args.max_batch_limit, share)
                else:
                    found = searched_largest(sample, device, args, max(args.batches), full_best, label == "full")
                best = found["batch"]
                result["largest_batch"][key] = best
                timed = try_run(sample, best, device) if best else None  # right after a sampling at this batch
                if not timed and best:
                    found["timed_run_oom"] = True
                    if found.get("verify_seconds"):
                        # At the edge of memory a second sampling can fail (fragmentation) where the first fit:
                        # the verifying sampling's time stands in (a first run at this batch: a lower bound on
                        # images/s, 5-20% under a timed run in the H200 runs).
                        timed = (found["verify_seconds"], None)
                        found["timed_by"] = "verify"
                if timed:
                    found.update(seconds=timed[0], images_per_s=best / timed[0], peak_memory_bytes=timed[1] or None)
                result["throughput"][key] = found
                save()
                print(f"{key}: largest batch {best}{' (capped: ' + found['capped'] + ')' if found['capped'] else ''}"
                      f"{', %.3f images/s' % found['images_per_s'] if timed else ''}", flush=True)
            units_left -= 1
        del pipe, sample
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save()
    print_table(result)
    return 0


def measure_one(sample, device, batch: int, name: str, label: str) -> dict | None:
    """One sampling's time and memory (``--max-batch-only``: the memory fit needs the rows of two batches)."""
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    result = try_run(sample, batch, device)
    if result is None:
        return None
    return {"model": name, "method": label, "batch": batch, "seconds_per_image": result[0] / batch,
            "peak_memory_bytes": result[1], "base_memory_bytes": base, **sample.probe}


def add_ratios(result: dict) -> None:
    """images/s at each largest batch against full's best images/s (any batch) on the same model."""
    best: dict[str, float] = {}
    for r in result["rows"]:
        if r["method"] == "full" and r.get("images_per_s"):
            best[r["model"]] = max(best.get(r["model"], 0.0), r["images_per_s"])
    for key, t in result["throughput"].items():
        model, method = key.split("/")
        if method == "full" and t.get("images_per_s"):
            best[model] = max(best.get(model, 0.0), t["images_per_s"])
    for key, t in result["throughput"].items():
        ref = best.get(key.split("/")[0])
        t["images_per_s_vs_full"] = t["images_per_s"] / ref if ref and t.get("images_per_s") else None
    result["full_best_images_per_s"] = best


def print_table(result: dict) -> None:
    full = {(r["model"], r["batch"]): r for r in result["rows"] if r["method"] == "full" and not r.get("oom")}
    print(f"\n{'model':17s} {'method':18s} {'batch':>5s} {'s/img':>8s} {'speedup':>8s} {'peak GiB':>9s} "
          f"{'KV GiB':>8s} {'KV vs full':>10s}")
    for r in result["rows"]:
        if r.get("oom"):
            print(f"{r['model']:17s} {r['method']:18s} {r['batch']:5d} out of memory")
            continue
        ref = full.get((r["model"], r["batch"]))
        speed = ref["seconds_per_image"] / r["seconds_per_image"] if ref else float("nan")
        kv = r["kv_bytes"] / ref["kv_bytes"] if ref and ref["kv_bytes"] else float("nan")
        print(f"{r['model']:17s} {r['method']:18s} {r['batch']:5d} {r['seconds_per_image']:8.4f} {speed:8.2f} "
              f"{r['peak_memory_bytes'] / 2**30:9.2f} {r['kv_bytes'] / 2**30:8.3f} {kv:10.1%}")
    print(f"\n{'model / method':36s} {'largest batch':>13s} {'capped':>7s} {'images/s':>9s} {'vs full best':>12s}")
    for key, t in result["throughput"].items():
        ratio = t.get("images_per_s_vs_full")
        note = " (verify run)" if t.get("timed_by") == "verify" else ""
        print(f"{key:36s} {t['batch']:13d} {t['capped'] or '-':>7s} {t.get('images_per_s') or float('nan'):9.3f} "
              f"{ratio if ratio is not None else float('nan'):11.2f}x{note}")


if __name__ == "__main__":
    sys.exit(main())
