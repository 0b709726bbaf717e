"""Block-sparse attention and routing at Self-Forcing shapes: Triton kernel vs compiled FlexAttention vs dense SDPA.

    python eval/bench_kernels.py --out runs/bench_kernels.json           # on a CUDA GPU
    python eval/bench_kernels.py --small --out /tmp/k.json               # tiny shapes, any device (smoke run)

Q = 4680 tokens (3 latent frames at 480x832), 12 heads x 128, bf16; KV of 32760 and 131040 tokens; block
densities 0.1, 0.25, 0.5, 1.0 (every query block lists the same number of random key blocks, always including
the diagonal-most block so no row is empty). For each shape: dense cuDNN and flash SDPA, compiled
FlexAttention given the same ``BlockMask.from_kv_blocks``, and the Triton kernel; outputs are checked against
Flex (relative error) before timing. Times are medians of ``triton.testing.do_bench``; TFLOP/s count computed
work, ``4 * H * S_q * S_kv_selected * D / t``. Routing (torch) is timed at the largest KV as a fraction of the
sparse attention it feeds. Prints a table, writes JSON.
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


def main(argv: list[str] | None = None) -> int:
    from genkv.kernels import block_sparse_attention, route_blocks
    from genkv.kernels.block_sparse import triton_available

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_kernels.json"))
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    heads, dim, block = (12, 128, 128) if not args.small else (2, 64, 32)
    s_q = 4680 if not args.small else 150
    kv_sizes = (32760, 131040) if not args.small else (400,)
    g = torch.Generator().manual_seed(0)
    rows = []
    for s_kv in kv_sizes:
        q = torch.randn(1, s_q, heads, dim, generator=g).to(device, dtype)
        k = torch.randn(1, s_kv, heads, dim, generator=g).to(device, dtype)
        v = torch.randn(1, s_kv, heads, dim, generator=g).to(device, dtype)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        n_q, n_kv = math.ceil(s_q / block), math.ceil(s_kv / block)
        dense = {}
        if cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                with sdpa_kernel(backend):
                    dense[name] = timer(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt), device)
        for density in (0.1, 0.25, 0.5, 1.0):
            per_row = max(1, round(n_kv * density))
            idx, counts = random_block_lists(1, heads, n_q, n_kv, per_row, g, device)
            flops = 4 * heads * s_q * min(s_kv, per_row * block) * dim
            row = {"s_kv": s_kv, "density": per_row / n_kv, "blocks_per_row": per_row}
            backends = ["flex", "triton"] if cuda else ["torch"] + (["triton"] if triton_available() else [])
            reference = None
            for backend in backends:
                fn = lambda b=backend: block_sparse_attention(  # noqa: E731
                    q, k, v, idx, counts, block_m=block, block_n=block, backend=b
                )
                out = fn()
                if reference is None:
                    reference = out.float()
                err = ((out.float() - reference).norm() / reference.norm()).item()
                ms = timer(fn, device)
                row[backend] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_err_vs_first": err}
            for name, ms in dense.items():
                row[f"dense_{name}_ms"] = ms
            rows.append(row)
            parts = "  ".join(f"{b} {row[b]['ms']:.3f} ms ({row[b]['tflops']:.0f} TF/s, err {row[b]['rel_err_vs_first']:.1e})"
                              for b in backends)
            dense_part = "  ".join(f"{n} {ms:.3f} ms" for n, ms in dense.items())
            print(f"KV {s_kv:7d} density {row['density']:.2f}: {parts}  | dense {dense_part}")
    # Routing cost at the largest KV, relative to the sparse attention it feeds (density ~0.1).
    s_kv = kv_sizes[-1]
    k = torch.randn(1, s_kv, heads, dim, generator=g).to(device, dtype)
    per_row = max(1, round(math.ceil(s_kv / block) * 0.1))
    route_ms = timer(lambda: route_blocks(q, k, block_m=block, block_n=block, top_k=per_row), device)
    last = [r for r in rows if r["s_kv"] == s_kv and r["density"] <= 0.11]
    sparse_ms = min(r[b]["ms"] for r in last for b in r if isinstance(r.get(b), dict)) if last else None
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "rows": rows,
        "routing_ms": route_ms,
        "routing_fraction_of_sparse_attention": route_ms / sparse_ms if sparse_ms else None,
    }
    print(f"routing (torch) at KV {s_kv}: {route_ms:.3f} ms"
          + (f" = {result['routing_fraction_of_sparse_attention']:.1%} of the sparse attention" if sparse_ms else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
