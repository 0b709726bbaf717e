"""Block-sparse attention and routing at Self-Forcing shapes: Triton kernel vs compiled FlexAttention vs dense SDPA.

    python eval/bench_kernels.py --out runs/bench_kernels.json           # on a CUDA GPU
    python eval/bench_kernels.py --small --out /tmp/k.json               # tiny shapes, any device (smoke run)

Q = 4680 tokens (3 latent frames at 480x832), 12 heads x 128, bf16; KV of 32760 and 131040 tokens; block
densities 0.1, 0.25, 0.5, 1.0 (every query block lists the same number of random key blocks, always including
the diagonal-most block so no row is empty). For each shape: dense cuDNN and flash SDPA, compiled
FlexAttention given the same ``BlockMask.from_kv_blocks``, and the Triton kernel; outputs are checked against
Flex (relative error) before timing. Times are medians of ``triton.testing.do_bench``; TFLOP/s count computed
work, ``4 * H * S_q * S_kv_selected * D / t``. Routing (torch) is timed at the largest KV as a fraction of the
sparse attention it feeds. Prints a table, writes JSON. ``triton`` runs the kernel as callers get it (the split
count chosen from the grid: ``num_splits`` of ``block_sparse_attention_triton``); ``triton_1split`` the same
launch reading each list in one share, as the kernel did before split reads. On a Hopper GPU ``hopper`` and
``hopper_ws`` / ``hopper_pingpong`` time the Gluon kernels of ``kernels/block_sparse_hopper.py`` (plain;
warp-specialised: a producer warp for the TMA loads; and that with two consumer warpgroups in ping-pong) on the same
lists, each first checked against SDPA in a child process: one that faults, hangs or disagrees there is left out
(``gluon_left_out`` in the JSON says why) instead of poisoning the benchmark's own CUDA context.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


def timer(fn, device):
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    import time

    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1000


def random_block_lists(b, h, n_q, n_kv, per_row, generator, device):
    scores = torch.rand(b, h, n_q, n_kv, generator=generator)
    diag = (torch.arange(n_q) * n_kv // max(n_q, 1)).view(1, 1, n_q, 1)
    scores.scatter_(3, diag.expand(b, h, n_q, 1), 2.0)  # keep one block per row: no empty rows
    chosen = scores.topk(per_row, dim=-1).indices.sort(-1).values
    idx = torch.zeros(b, h, n_q, n_kv, dtype=torch.int32)
    idx[..., :per_row] = chosen.to(torch.int32)
    counts = torch.full((b, h, n_q), per_row, dtype=torch.int32)
    return idx.to(device), counts.to(device)


TRITON_CONFIGS = [  # (tile_m, tile_n, num_warps, num_stages, warp_specialize): swept once, the fastest serves all
    (128, 128, 8, 2, False), (128, 128, 8, 3, False), (128, 64, 4, 3, False), (128, 64, 8, 3, False),
    (128, 64, 4, 4, False), (64, 64, 4, 3, False), (128, 128, 8, 3, True), (128, 64, 4, 3, True),
    (128, 128, 4, 3, True),
]


def flex_with_mask(q, k, v, idx, counts, block):
    """Compiled FlexAttention with the ``BlockMask`` built once (the strongest form of the baseline)."""
    from torch.nn.attention.flex_attention import BlockMask

    from genkv.kernels.flex import _compiled_flex

    mask = BlockMask.from_kv_blocks(counts, idx, BLOCK_SIZE=(block, block), seq_lengths=(q.shape[1], k.shape[1]))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    flex = _compiled_flex()
    return lambda: flex(qt, kt, vt, block_mask=mask).transpose(1, 2)


GLUON_VARIANTS = {  # column -> block_sparse_attention_hopper's switches
    "hopper": dict(warp_specialize=False, pingpong=False),
    "hopper_ws": dict(warp_specialize=True, pingpong=False),
    "hopper_pingpong": dict(warp_specialize=True, pingpong=True),
}


def run_probe(command: list[str], timeout_s: float) -> tuple[str | None, str]:
    """Run ``command`` in its own process: (None if it exited 0, else one line saying why not: exit status or
    timeout and its last line of output; its stdout so far). A kernel that faults or hangs there cannot take the
    benchmark's own CUDA context down with it (after an illegal address every later launch of a process fails)."""
    import subprocess

    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return f"probe timed out after {timeout_s:.0f} s (a hang?)", out
    if done.returncode == 0:
        return None, done.stdout
    lines = done.stderr.strip().splitlines()
    # a traceback's last line names the error; a warning printed after it must not stand in for it
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    why = (errors or lines or ["(no error output)"])[-1]
    return f"probe exited {done.returncode}: {why[:200]}", done.stdout


def probe_variants(names: list[str], timeout_s: float, command: list[str] | None = None) -> dict[str, str]:
    """Probe Gluon variants ``names`` in order in child processes (``command`` + names; default this script's
    ``--probe-variants``), each printing ``ok NAME`` once it agrees with SDPA: the variants that did not, each
    with why. ``timeout_s`` is each variant's share (a process gets it times the variants it has left, so one
    slow compile does not use up the others'). After a failure the probe goes on with the variants after it in a
    fresh process."""
    command = command or [sys.executable, str(Path(__file__).resolve()), "--probe-variants"]
    broken, remaining = {}, list(names)
    while remaining:
        why, out = run_probe([*command, *remaining], timeout_s * len(remaining))
        passed = {line.split()[1] for line in out.splitlines() if line.startswith("ok ")}
        failed = next((n for n in remaining if n not in passed), None)
        if failed is None:
            break
        broken[failed] = why or "probe exited 0 without reporting it"
        remaining = remaining[remaining.index(failed) + 1:]
    return broken


def probe(names: list[str]) -> int:
    """One call of each Gluon variant in ``names`` against dense SDPA (every block listed, a ragged KV), printing
    ``ok NAME`` for each that agrees; exit 1 at the first that does not."""
    from genkv.kernels.block_sparse_hopper import block_sparse_attention_hopper

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, 4, 128, generator=g).cuda().bfloat16() for n in (600, 1000, 1000))
    n_q, n_kv = math.ceil(600 / 128), math.ceil(1000 / 128)
    idx = torch.arange(n_kv, dtype=torch.int32).expand(1, 4, n_q, n_kv).contiguous().cuda()
    counts = torch.full((1, 4, n_q), n_kv, dtype=torch.int32).cuda()
    want = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2).float() for x in (q, k, v)))
    for name in names:
        got = block_sparse_attention_hopper(q, k, v, idx, counts, **GLUON_VARIANTS[name]).float()
        err = ((got - want.transpose(1, 2)).norm() / want.norm()).item()
        if not err < 2e-2:
            print(f"{name}: relative error {err:.1e} against SDPA", flush=True)
            return 1
        print(f"ok {name} (relative error {err:.1e})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from genkv.kernels import block_sparse_attention, route_blocks
    from genkv.kernels.block_sparse import block_sparse_attention_triton, triton_available
    from genkv.kernels.block_sparse_hopper import block_sparse_attention_hopper, hopper_kernel_applies

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_kernels.json"))
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--no-sweep", action="store_true",
                        help="skip the launch sweep: 128 x 128 tiles, 8 warps, 3 stages (its pick on H100 and H200)")
    parser.add_argument("--probe-timeout", type=float, default=100.0,
                        help="seconds each Gluon variant's probe (compile and one call, in a child process run "
                             "first) may take")
    parser.add_argument("--probe-variants", nargs="+", choices=sorted(GLUON_VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_variants:
        return probe(args.probe_variants)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    heads, dim, block = (12, 128, 128) if not args.small else (2, 64, 32)
    s_q = 4680 if not args.small else 150
    kv_sizes = (32760, 131040) if not args.small else (400,)
    g = torch.Generator().manual_seed(0)
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__ if triton_available() else None,
        "dtype": str(dtype),
        "shape": {"s_q": s_q, "heads": heads, "head_dim": dim, "block": block},
        "rows": [],
    }

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))

    def tensors(s_kv):
        q = torch.randn(1, s_q, heads, dim, generator=g).to(device, dtype)
        k = torch.randn(1, s_kv, heads, dim, generator=g).to(device, dtype)
        v = torch.randn(1, s_kv, heads, dim, generator=g).to(device, dtype)
        return q, k, v

    # 0. The Gluon variants run once in a child process first; one that faults, hangs or disagrees is left out
    #    (its columns say why) rather than poisoning this process's CUDA context for every row after it.
    gluon_broken = {}
    if cuda and not args.small:
        q = torch.empty(1, s_q, heads, dim, device=device, dtype=dtype)  # (not from g: later draws stay as they were)
        k = v = torch.empty(1, kv_sizes[0], heads, dim, device=device, dtype=dtype)
        if block == 128 and hopper_kernel_applies(q, k, v):
            gluon_broken = probe_variants(list(GLUON_VARIANTS), args.probe_timeout)
            for name, why in gluon_broken.items():
                print(f"{name} left out: {why}")
        result["gluon_left_out"] = gluon_broken
        del q, k, v

    # 1. Pick the Triton launch shape on the largest KV at density 0.25 (outputs checked against Flex).
    triton_kw = {}
    if args.no_sweep:
        triton_kw = dict(tile_m=128, tile_n=128, num_warps=8, num_stages=3, warp_specialize=False)
        result["triton_config"] = triton_kw
    elif cuda and triton_available():
        q, k, v = tensors(kv_sizes[-1])
        n_q, n_kv = math.ceil(s_q / block), math.ceil(k.shape[1] / block)
        idx, counts = random_block_lists(1, heads, n_q, n_kv, round(n_kv * 0.25), g, device)
        want = flex_with_mask(q, k, v, idx, counts, block)().float()  # the dense torch reference would not fit
        sweep = []
        for tm, tn, warps, stages, ws in TRITON_CONFIGS:
            kw = dict(block_m=block, block_n=block, tile_m=tm, tile_n=tn, num_warps=warps, num_stages=stages,
                      warp_specialize=ws)
            try:
                fn = lambda kw=kw: block_sparse_attention_triton(q, k, v, idx, counts, **kw)  # noqa: E731
                err = ((fn().float() - want).norm() / want.norm()).item()
                ms = timer(fn, device)
            except Exception as exc:  # a shape the compiler rejects (e.g. shared memory) is skipped, and said
                print(f"triton config {kw} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                continue
            sweep.append({"tile_m": tm, "tile_n": tn, "num_warps": warps, "num_stages": stages,
                          "warp_specialize": ws, "ms": ms, "rel_err": err})
            print(f"triton tile {tm}x{tn} warps {warps} stages {stages} ws {ws}: {ms:.3f} ms (err {err:.1e})")
        best = min((r for r in sweep if r["rel_err"] < 2e-2), key=lambda r: r["ms"])
        triton_kw = {key: best[key] for key in ("tile_m", "tile_n", "num_warps", "num_stages", "warp_specialize")}
        # The cost of masking a ragged KV length: the same lists over a KV padded to a multiple of the block.
        k_even = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, n_kv * block - k.shape[1]))
        v_even = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, n_kv * block - k.shape[1]))
        ms_even = timer(lambda: block_sparse_attention_triton(q, k_even, v_even, idx, counts, block_m=block,
                                                              block_n=block, **triton_kw), device)
        result["triton_unmasked_ms"] = {"kv": k_even.shape[1], "ms": ms_even, "masked_ms": best["ms"]}
        print(f"triton best config on an unragged KV of {k_even.shape[1]}: {ms_even:.3f} ms (ragged {best['ms']:.3f})")
        del k_even, v_even
        result["triton_sweep"], result["triton_config"] = sweep, triton_kw
        save()
        del q, k, v, want

    for s_kv in kv_sizes:
        q, k, v = tensors(s_kv)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        n_q, n_kv = math.ceil(s_q / block), math.ceil(s_kv / block)
        dense = {}
        if cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                with sdpa_kernel(backend):
                    dense[name] = timer(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt), device)
        dense_flops = 4 * heads * s_q * s_kv * dim
        for density in (0.1, 0.25, 0.5, 1.0):
            per_row = max(1, round(n_kv * density))
            idx, counts = random_block_lists(1, heads, n_q, n_kv, per_row, g, device)
            flops = 4 * heads * s_q * min(s_kv, per_row * block) * dim
            row = {"s_kv": s_kv, "density": per_row / n_kv, "blocks_per_row": per_row, "gflop": flops / 1e9}
            runs = {}
            if cuda:
                runs["flex"] = flex_with_mask(q, k, v, idx, counts, block)
                runs["flex_incl_mask"] = lambda: block_sparse_attention(  # noqa: E731
                    q, k, v, idx, counts, block_m=block, block_n=block, backend="flex")
            else:
                runs["torch"] = lambda: block_sparse_attention(  # noqa: E731
                    q, k, v, idx, counts, block_m=block, block_n=block, backend="torch")
            if triton_available():
                runs["triton"] = lambda: block_sparse_attention_triton(  # noqa: E731
                    q, k, v, idx, counts, block_m=block, block_n=block, **triton_kw)
                # the same launch read in one share per list (num_splits=1): what the split read gains
                runs["triton_1split"] = lambda: block_sparse_attention_triton(  # noqa: E731
                    q, k, v, idx, counts, block_m=block, block_n=block, num_splits=1, **triton_kw)
            if cuda and block == 128 and hopper_kernel_applies(q, k, v):
                # the Gluon kernel for Hopper (kernels/block_sparse_hopper.py), same lists and split rule
                for name, switches in GLUON_VARIANTS.items():
                    if name in gluon_broken:
                        row[name] = {"error": gluon_broken[name]}
                    else:
                        runs[name] = lambda kw=switches: block_sparse_attention_hopper(q, k, v, idx, counts, **kw)
            reference = None
            for name, fn in runs.items():
                try:
                    out = fn()
                except Exception as exc:  # noqa: BLE001 - a Gluon variant failing is a row, not the run
                    if not name.startswith("hopper"):
                        raise
                    first_line = (str(exc).splitlines() or [""])[0][:200]
                    row[name] = {"error": f"{type(exc).__name__}: {first_line}"}
                    print(f"{name} failed: {row[name]['error']}")
                    continue
                if reference is None:
                    reference = out.float()
                err = ((out.float() - reference).norm() / reference.norm()).item()
                ms = timer(fn, device)
                row[name] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_err_vs_first": err}
            for name, ms in dense.items():
                row[f"dense_{name}"] = {"ms": ms, "tflops": dense_flops / ms / 1e9}
            if "triton" in row and "flex" in row:
                row["triton_speedup_vs_flex"] = row["flex"]["ms"] / row["triton"]["ms"]
            if "triton" in row and dense:
                row["triton_speedup_vs_best_dense"] = min(dense.values()) / row["triton"]["ms"]
                row["triton_1split_speedup_vs_best_dense"] = min(dense.values()) / row["triton_1split"]["ms"]
                row["triton_speedup_vs_1split"] = row["triton_1split"]["ms"] / row["triton"]["ms"]
            for name in GLUON_VARIANTS:
                if "ms" not in row.get(name, {}):
                    continue
                row[f"{name}_speedup_vs_triton"] = row["triton"]["ms"] / row[name]["ms"]
                if "flex" in row:
                    row[f"{name}_speedup_vs_flex"] = row["flex"]["ms"] / row[name]["ms"]
                if dense:
                    row[f"{name}_speedup_vs_best_dense"] = min(dense.values()) / row[name]["ms"]
                    if "cudnn" in dense:
                        row[f"{name}_speedup_vs_cudnn"] = dense["cudnn"] / row[name]["ms"]
            if "triton" in row and "cudnn" in dense:
                row["triton_speedup_vs_cudnn"] = dense["cudnn"] / row["triton"]["ms"]
            result["rows"].append(row)
            save()
            parts = "  ".join(f"{n} {row[n]['ms']:.3f} ms ({row[n]['tflops']:.0f} TF/s, "
                              f"err {row[n]['rel_err_vs_first']:.1e})"
                              for n in runs if "ms" in row[n])
            dense_part = "  ".join(f"{n} {ms:.3f} ms" for n, ms in dense.items())
            print(f"KV {s_kv:7d} density {row['density']:.2f}: {parts}  | dense {dense_part}")
    # 2. Routing cost at the largest KV, relative to the sparse attention it feeds (density ~0.1 and ~0.25).
    s_kv = kv_sizes[-1]
    q, k, _ = tensors(s_kv)
    result["routing"] = []
    from genkv.kernels import pool_blocks

    summary = pool_blocks(k, block)
    pool_ms = timer(lambda: pool_blocks(k, block), device)
    for density in (0.1, 0.25):
        per_row = max(1, round(math.ceil(s_kv / block) * density))
        route_ms = timer(lambda: route_blocks(q, k, block_m=block, block_n=block, top_k=per_row), device)
        cached_ms = timer(lambda: route_blocks(q, k, block_m=block, block_n=block, top_k=per_row,
                                               key_summary=summary), device)
        torch_ms = timer(lambda: route_blocks(q, k, block_m=block, block_n=block, top_k=per_row,
                                              key_summary=summary, backend="torch"), device)
        graph_ms = None
        if cuda:  # device time alone: the launches replayed from a CUDA graph (no Python / launch overhead)
            import triton.testing

            graph_ms = triton.testing.do_bench_cudagraph(
                lambda: route_blocks(q, k, block_m=block, block_n=block, top_k=per_row, key_summary=summary),
                rep=100, return_mode="median")
        same = [r for r in result["rows"] if r["s_kv"] == s_kv and abs(r["density"] - density) < 0.02]
        sparse_ms = min(r[b]["ms"] for r in same for b in ("triton", "flex", "torch") if b in r) if same else None
        entry = {"density": density, "top_k": per_row, "routing_ms": route_ms, "key_pooling_ms": pool_ms,
                 "routing_with_cached_key_summary_ms": cached_ms, "torch_routing_with_cached_key_summary_ms": torch_ms,
                 "routing_with_cached_key_summary_device_ms": graph_ms,
                 "sparse_attention_ms": sparse_ms,
                 "fraction": route_ms / sparse_ms if sparse_ms else None,
                 "fraction_cached_summary": cached_ms / sparse_ms if sparse_ms else None}
        result["routing"].append(entry)
        print(f"routing at KV {s_kv}, top_k {per_row}: {route_ms:.3f} ms (key pooling {pool_ms:.3f}; "
              f"with cached key summaries {cached_ms:.3f} ms, device time {graph_ms or float('nan'):.3f} ms; "
              f"torch selection {torch_ms:.3f} ms)"
              + (f" = {entry['fraction']:.1%} / {entry['fraction_cached_summary']:.1%} of the sparse attention"
                 if sparse_ms else ""))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
