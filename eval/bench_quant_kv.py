"""The block-sparse kernel reading a quantized KV history (issue 22) against the same kernel on a bf16 history.

One attention call at Wan2.1-1.3B shapes (a 3-frame chunk of 4680 queries, 12 heads x 128, a history of 21
frames = 32760 keys plus the chunk's own 4680), at the same tokens and block lists for every storage: every
block listed (dense), top-k routed lists (``--top-k``, 16 random history blocks of 128 plus the chunk's own) and
``fastar``'s lists as a rollout reads them (the sink frame's 13 blocks besides the top-k, and a log-count key bias:
merged history tokens weigh log 1-3).
bf16 runs the kernel on one contiguous (history + chunk) buffer, as genkv's bf16 cache does; fp8 / int8 / int4
pass the history as ``QuantizedKV`` and the chunk in bf16. Also the output's relative error against float32
attention over the *unquantized* keys (what quantization costs) and the bytes the history holds. Median of
CUDA-event timings after warm-up; prints a table, writes JSON.

Rows ``KIND+sdpa`` time the split read of ``chunk_attention="sdpa"`` on the same lists: the chunk's own keys by
dense SDPA with LSE (cuDNN on CUDA), then the kernel resuming over the history blocks (the straddling one up to
the history's end), as ``RoutedSelfAttention`` runs it; their ratio is to the single bf16 kernel call. Every row
reads through the Triton kernel (``GENKV_HOPPER_KERNEL=0``: quantized histories always take it, so their bf16
baseline does too); on CUDA ``bf16/gluon+sdpa`` times the bf16 split read as the library runs it by default on Hopper
(the Gluon kernel; elsewhere it is the Triton kernel again).

``--scales fp16 fp32`` times each quantized history with its scales stored both ways (``GENKV_KV_SCALES``; the same
values, rows ``KIND/s32`` for fp32), ``--scale-layouts heads tokens`` with the scales laid out both ways
(``GENKV_KV_SCALE_LAYOUT``; the same values, rows ``KIND/hd`` and ``KIND/tok``), ``--int4-asm both`` the int4 kernel
with its inline-PTX nibble unpacking off and on (``GENKV_INT4_ASM``; rows ``int4/asm``, ``int4/noasm``),
``--int4-zero-in-v both`` with the zero points in the value tiles off and on (``GENKV_INT4_ZERO_IN_V``; rows
``.../zv``, ``.../nozv``), ``--int4-scale-in-v both`` with their scales there too off and on
(``GENKV_INT4_SCALE_IN_V``; rows ``.../sv``, ``.../nosv``; not with the zero points off, where it does not apply):
A/Bs in one process, on one GPU's clock.

Then routing's key-block means over each storage's history (what ``fastar`` pools once per chunk and layer): the
one-pass kernel ``genkv.kernels.quant_pool`` against its torch reference (``pool_rows`` in the JSON).

    python eval/bench_quant_kv.py --out runs/quant_kv.json
    python eval/bench_quant_kv.py --small --device cpu          # a CPU smoke run (gather path)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_json import write_result  # noqa: E402

WAN = dict(queries=4680, history=32760, heads=12, dim=128, frame=1560)
SMALL = dict(queries=96, history=400, heads=2, dim=64, frame=40)


def timed(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Median milliseconds of ``fn()``.

    On CUDA, Triton's ``do_bench``: calls queued back to back (the host runs ahead of the GPU, so the wrapper's
    launch time is not counted; an event pair synchronised around each call counted it, and two identical launches
    of a 0.9 ms call then differed by up to 15% in one sweep), L2 flushed between calls; it repeats for
    ``10 * iters`` ms (at least 100) after ``5 * warmup`` ms of warm-up (at least 25). On the CPU, the wall-clock
    median of ``iters`` calls after ``warmup``.
    """
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=max(25, 5 * warmup), rep=max(100, 10 * iters),
                                       return_mode="median")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def lists(batch: int, heads: int, n_q: int, n_kv: int, n_hist_blocks: int, top_k: int | None,
          device: torch.device, generator: torch.Generator, sink: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Block lists: every block, or ``top_k`` random history blocks plus every block of the chunk (ascending), and
    with ``sink`` the history's first ``sink`` blocks too (fastar's sink frame, read by every query block)."""
    if top_k is None:
        idx = torch.arange(n_kv, device=device, dtype=torch.int32).expand(batch, heads, n_q, n_kv)
        return idx.contiguous(), torch.full((batch, heads, n_q), n_kv, dtype=torch.int32, device=device)
    own = torch.arange(n_hist_blocks, n_kv)
    rows = []
    for _ in range(batch * heads * n_q):
        picked = sink + torch.randperm(n_hist_blocks - sink, generator=generator)[:top_k]
        rows.append(torch.cat([torch.arange(sink), picked, own]).sort().values)
    idx = torch.stack(rows).view(batch, heads, n_q, -1).to(device=device, dtype=torch.int32)
    return idx, torch.full((batch, heads, n_q), idx.shape[-1], dtype=torch.int32, device=device)


def split_read(q, k_hist, v_hist, chunk_k, chunk_v, idx, cnt, chunk_blocks: int, hist, kw) -> torch.Tensor:
    """``chunk_attention="sdpa"``: dense attention with LSE over the chunk, the kernel resuming over the history
    blocks (each list's last ``chunk_blocks`` entries, the chunk's own, dropped)."""
    from genkv.kernels import block_sparse_attention, dense_attention_with_lse

    partial = dense_attention_with_lse(q, chunk_k, chunk_v)
    return block_sparse_attention(q, k_hist, v_hist, idx, cnt - chunk_blocks, history=hist, initial=partial, **kw)


# fast_dequant: int8 / int4 codes built as fp16 from bits (no conversion instructions); fp8 ignores it
# (defaults: 3 stages, fast_dequant for int4 alone; each row names what it sets, so both sides of a default show)
LAUNCHES = ({"num_stages": 2}, {"tile_n": 64}, {"tile_n": 64, "num_stages": 2}, {"num_warps": 4},
            {"tile_m": 64, "num_warps": 4}, {"fast_dequant": True}, {"fast_dequant": False},
            {"fast_dequant": True, "num_stages": 2}, {"tile_n": 64, "fast_dequant": True},
            {"int8_qk": True}, {"int8_qk": True, "num_stages": 2})  # int8_qk: int8 histories only
# the bf16 kernel without what only it has (TMA, 3 stages): how much of the gap is the launch
BF16_LAUNCHES = ({"tma": False}, {"tma": False, "num_stages": 2}, {"num_stages": 2})


def launch_sweep(q, cur_k, cur_v, idx, cnt, hist, kw, base_ms, device, args, density, kind, ref) -> list[dict]:
    """The Triton kernel on the same call at other launch shapes; a shape that does not compile (shared
    memory) is recorded with its error instead of a time."""
    from genkv.kernels.block_sparse import block_sparse_attention_triton

    rows = []
    launches = BF16_LAUNCHES if hist is None else LAUNCHES
    for launch in launches:
        if launch.get("int8_qk") and kind != "int8":
            continue
        name = ",".join(f"{k}={v}" for k, v in launch.items())
        try:
            ms = timed(lambda: block_sparse_attention_triton(q, cur_k, cur_v, idx, cnt, history=hist, **kw,  # noqa: B023
                                                             **launch), device, args.iters, args.warmup)
        except Exception as error:  # noqa: BLE001 - e.g. out of shared memory: record and go on
            rows.append(dict(density=density, kind=kind, launch=name, error=str(error).splitlines()[0][:120]))
            print(f"{density} {kind} {name}: {rows[-1]['error']}")
            continue
        out = block_sparse_attention_triton(q, cur_k, cur_v, idx, cnt, history=hist, **kw, **launch).float()
        rows.append(dict(density=density, kind=kind, launch=name, ms=ms, ratio=ms / base_ms,
                         history_bytes=hist.nbytes if hist is not None else 2 * cur_k.numel() * 2,
                         rel_err=float((out - ref).norm() / ref.norm())))
    return rows


def pooling_rows(keys: torch.Tensor, values: torch.Tensor, block: int, device: torch.device,
                 args: argparse.Namespace) -> list[dict]:
    """Routing's key-block means over each storage's history: the one-pass kernel
    (:func:`genkv.kernels.quant_pool.pool_code_blocks`) against its torch reference, timed, and their difference."""
    from genkv.kernels import quantize_kv
    from genkv.kernels.quant_pool import pool_code_blocks, pool_code_blocks_reference

    rows = []
    n_blocks = keys.shape[1] // block
    for kind in args.kinds:
        hist = quantize_kv(keys, values, kind)
        kernel = lambda: pool_code_blocks(hist, n_blocks, block)  # noqa: E731
        torch_ops = lambda: pool_code_blocks_reference(hist, n_blocks, block)  # noqa: E731
        rows.append(dict(kind=kind, blocks=n_blocks, kernel_ms=timed(kernel, device, args.iters, args.warmup),
                         torch_ms=timed(torch_ops, device, args.iters, args.warmup),
                         max_abs_diff=float((kernel() - torch_ops()).abs().max())))
    return rows


def variants(args: argparse.Namespace) -> list[tuple[str, str | None, str | None, dict]]:
    """(kind, scale storage, scale layout, int4 switches) per quantized row: scale storage or layout None keeps the
    process's default; the switches map ``asm`` / ``zero_in_v`` / ``scale_in_v`` to on or off where ``both`` asks
    for the two rows (``scale_in_v`` on only with ``zero_in_v`` not off: the launch ignores it there)."""
    out = []
    for kind in args.kinds:
        asked = (("asm", args.int4_asm), ("zero_in_v", args.int4_zero_in_v), ("scale_in_v", args.int4_scale_in_v))
        axes = [(name, [False, True]) for name, both in asked if both == "both" and kind == "int4"]
        for scales, layout in itertools.product(args.scales or [None], args.scale_layouts or [None]):
            combos = [dict(zip([n for n, _ in axes], values)) for values in itertools.product(*[v for _, v in axes])]
            out += [(kind, scales, layout, c) for c in combos
                    if not (c.get("scale_in_v") and c.get("zero_in_v") is False)]
    return out


def variant_name(kind: str, scales: str | None, layout: str | None, switches: dict) -> str:
    """A row's name: ``int4/s32/tok/asm/zv`` and the like (``/tok`` / ``/hd``: the scale layout, where asked)."""
    name = kind + ("/s32" if scales == "fp32" else "") + {"tokens": "/tok", "heads": "/hd", None: ""}[layout]
    if "asm" in switches:
        name += "/asm" if switches["asm"] else "/noasm"
    if "zero_in_v" in switches:
        name += "/zv" if switches["zero_in_v"] else "/nozv"
    if "scale_in_v" in switches:
        name += "/sv" if switches["scale_in_v"] else "/nosv"
    return name


_SWITCH_ENV = {"asm": "GENKV_INT4_ASM", "zero_in_v": "GENKV_INT4_ZERO_IN_V", "scale_in_v": "GENKV_INT4_SCALE_IN_V",
               "hopper": "GENKV_HOPPER_KERNEL"}


@contextlib.contextmanager
def int4_env(switches: dict):
    """The int4 launch switches' env (``GENKV_INT4_ASM``, ``GENKV_INT4_ZERO_IN_V``, ``GENKV_INT4_SCALE_IN_V``) set
    while a variant is timed (switches not given: as the process has them). The launch reads them per call, so they
    are set around the timing loop, not inside the timed calls."""
    with mock.patch.dict(os.environ, {_SWITCH_ENV[k]: "1" if on else "0" for k, on in switches.items()}):
        yield


@contextlib.contextmanager
def triton_kernel_only():
    """Every read through the Triton kernel (``GENKV_HOPPER_KERNEL=0``): quantized histories always take it, so the
    bf16 rows they are divided by do too (on Hopper the library's default bf16 read is the Gluon kernel; the
    ``bf16/gluon+sdpa`` row times that one)."""
    with mock.patch.dict(os.environ, {"GENKV_HOPPER_KERNEL": "0"}):
        yield


def main(argv: list[str] | None = None) -> int:
    from genkv.kernels import QuantizedKV, block_sparse_attention, key_channel_scales, quantize_kv  # noqa: F401
    from genkv.kernels.block_sparse_hopper import hopper_kernel_applies
    from genkv.kernels.quant_kv import with_scale_layout, with_scale_storage

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run)")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20, help="CPU: timed calls; CUDA: 10 ms of calls each")
    parser.add_argument("--warmup", type=int, default=5, help="CPU: untimed calls; CUDA: 5 ms of calls each")
    parser.add_argument("--kinds", nargs="+", default=["fp8", "int8", "int4"])
    parser.add_argument("--out", type=Path, default=Path("bench_quant_kv.json"))
    parser.add_argument("--scales", nargs="+", choices=("fp16", "fp32"), default=None,
                        help="scale storage of the quantized histories (default: GENKV_KV_SCALES's)")
    parser.add_argument("--scale-layouts", nargs="+", choices=("heads", "tokens"), default=None,
                        help="layout of the histories' scales, one row each (default: GENKV_KV_SCALE_LAYOUT's)")
    parser.add_argument("--int4-asm", choices=("default", "both"), default="default",
                        help="both: int4 rows with GENKV_INT4_ASM=0 and =1")
    parser.add_argument("--int4-zero-in-v", choices=("default", "both"), default="default",
                        help="both: int4 rows with GENKV_INT4_ZERO_IN_V=0 and =1")
    parser.add_argument("--int4-scale-in-v", choices=("default", "both"), default="default",
                        help="both: int4 rows with GENKV_INT4_SCALE_IN_V=0 and =1 (zero points in V not off)")
    parser.add_argument("--densities", nargs="+", choices=("dense", "top-k", "fastar"),
                        default=["dense", "top-k", "fastar"], help="which block lists to time (default: all three)")
    parser.add_argument("--launch-sweep", action="store_true",
                        help="also time the Triton kernel at other launch shapes (stages, warps, key tile) per kind")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = SMALL if args.small else WAN
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    block = 128 if not args.small else 32
    g = torch.Generator().manual_seed(0)
    n_q, n_h, heads, dim = shape["queries"], shape["history"], shape["heads"], shape["dim"]
    q = torch.randn(1, n_q, heads, dim, generator=g)
    keys = torch.randn(1, n_h + n_q, heads, dim, generator=g)
    keys[..., :8] *= 8.0  # a few outlier channels, as post-RoPE keys have
    values = torch.randn(1, n_h + n_q, heads, dim, generator=g)
    q, keys, values = (t.to(device, dtype) for t in (q, keys, values))
    n_kv, n_hist_blocks = math.ceil((n_h + n_q) / block), n_h // block
    chunk_blocks = n_kv - math.ceil(n_h / block)  # blocks wholly inside the chunk: the split read's dense part
    cur_k, cur_v = keys[:, n_h:].contiguous(), values[:, n_h:].contiguous()
    rows = []
    sink = math.ceil(shape["frame"] / block)
    # merged history tokens carry log(count) (TempCache's groups of 1-3 here), the chunk's own 0
    counts = torch.randint(1, 4, (1, n_h, heads), generator=g).float()
    log_counts = torch.cat([counts.log(), torch.zeros(1, n_q, heads)], 1).to(device)
    with triton_kernel_only():
        for density, top_k, sink_blocks, bias in (("dense", None, 0, None), (f"top-{args.top_k}", args.top_k, 0, None),
                                                  ("fastar", args.top_k, sink, log_counts)):
            if (density if density in ("dense", "fastar") else "top-k") not in args.densities:
                continue
            idx, cnt = lists(1, heads, math.ceil(n_q / block), n_kv, n_hist_blocks, top_k, device, g, sink_blocks)
            kw = dict(block_m=block, block_n=block, key_bias=bias)
            # the split read's kernel call sees the history alone: its bias is the history's part
            split_kw = dict(kw, key_bias=None if bias is None else bias[:, :n_h])
            ref = block_sparse_attention(q.float(), keys.float(), values.float(), idx, cnt, backend="torch", **kw) \
                if args.small or device.type != "cuda" else None
            base_fn = lambda: block_sparse_attention(q, keys, values, idx, cnt, **kw)  # noqa: E731
            base_ms = timed(base_fn, device, args.iters, args.warmup)
            base_out = base_fn().float()
            ref = base_out if ref is None else ref
            hist_bytes = 2 * keys[:, :n_h].numel() * 2
            if args.launch_sweep and device.type == "cuda":
                rows += launch_sweep(q, keys, values, idx, cnt, None, kw, base_ms, device, args, density, "bf16", ref)
            rows.append(dict(density=density, kind="bf16", ms=base_ms, ratio=1.0, history_bytes=hist_bytes,
                             rel_err=float((base_out - ref).norm() / ref.norm())))
            bf16_split = lambda: split_read(q, keys[:, :n_h], values[:, :n_h], keys[:, n_h:],  # noqa: E731
                                            values[:, n_h:], idx, cnt, chunk_blocks, None, split_kw)
            split_fns = {"bf16+sdpa": (bf16_split, hist_bytes, {})}
            if device.type == "cuda" and block == 128 and hopper_kernel_applies(q, keys, values):
                # the bf16 read as a rollout on Hopper takes it by default: the Gluon kernel
                split_fns["bf16/gluon+sdpa"] = (split_fns["bf16+sdpa"][0], hist_bytes, {"hopper": True})
            swept = set()
            for kind, scales, layout, switches in variants(args):
                name = variant_name(kind, scales, layout, switches)
                hist = quantize_kv(keys[:, :n_h], values[:, :n_h], kind)
                if scales is not None:
                    hist = with_scale_storage(hist, torch.float32 if scales == "fp32" else torch.float16)
                if layout is not None:
                    hist = with_scale_layout(hist, layout)
                fn = lambda hist=hist: block_sparse_attention(  # noqa: E731
                    q, cur_k, cur_v, idx, cnt, history=hist, **kw)
                with int4_env(switches):
                    ms = timed(fn, device, args.iters, args.warmup)
                    out = fn().float()
                rows.append(dict(density=density, kind=name, ms=ms, ratio=ms / base_ms, history_bytes=hist.nbytes,
                                 rel_err=float((out - ref).norm() / ref.norm())))
                split_fns[f"{name}+sdpa"] = (lambda hist=hist: split_read(q, cur_k[:, :0], cur_v[:, :0], cur_k, cur_v,
                                                                          idx, cnt, chunk_blocks, hist, split_kw),
                                             hist.nbytes, switches)
                if args.launch_sweep and device.type == "cuda" and kind not in swept:  # each kind's first variant
                    swept.add(kind)
                    rows += launch_sweep(q, cur_k, cur_v, idx, cnt, hist, kw, base_ms, device, args, density, kind, ref)
            for kind, (fn, held, switches) in split_fns.items():
                with int4_env(switches):
                    ms = timed(fn, device, args.iters, args.warmup)
                    out = fn().float()
                rows.append(dict(density=density, kind=kind, ms=ms, ratio=ms / base_ms, history_bytes=held,
                                 rel_err=float((out - ref).norm() / ref.norm())))
    pool_rows = pooling_rows(keys[:, :n_h], values[:, :n_h], block, device, args)
    print(f"{'lists':>8s} {'history':>20s} {'launch':>24s} {'ms':>8s} {'x bf16':>7s} {'hist MiB':>9s} {'rel err':>9s}")
    for r in (r for r in rows if "ms" in r):
        print(f"{r['density']:>8s} {r['kind']:>20s} {r.get('launch', 'default'):>24s} {r['ms']:8.3f} {r['ratio']:7.3f} "
              f"{r['history_bytes'] / 2**20:9.1f} {r['rel_err']:9.2e}")
    print(f"\nrouting's key-block means from the codes ({n_h // block} blocks of {block}): "
          "genkv.kernels.quant_pool (one pass) vs its torch reference")
    for r in pool_rows:
        print(f"{r['kind']:>8s}  kernel {1000 * r['kernel_ms']:8.1f} us  torch {1000 * r['torch_ms']:8.1f} us  "
              f"{r['torch_ms'] / r['kernel_ms']:6.2f}x  max |diff| {r['max_abs_diff']:.1e}")
    write_result(args.out, device, shape=shape, block=block, top_k=args.top_k, dtype=str(dtype), rows=rows,
                 pool_rows=pool_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
