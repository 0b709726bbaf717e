"""genkv's small fused kernels against what ``torch.compile`` makes of the same torch ops, at a Wan2.1-1.3B chunk's
shapes (4680 tokens, dim 1536, FFN 8960, 12 heads x 128): each op alone, timed with ``triton.testing.do_bench``
(median), checked against the compiled torch output first.

- ``fp8 quantize rows, GELU (FFN)``: ``genkv.kernels.fp8_rows`` with the tanh GELU, against Inductor's kernel for
  ``quantize_rows(gelu(h))`` (the FP8 FFN's down-projection input, unfused);
- ``fp8 quantize rows (attention output)``: the same without an activation at dim 1536;
- each of those two also with the two-sweep kernel (``tiled``: 2048 columns at a time, the row read twice);
- ``q/k RMSNorm + RoPE``: ``genkv.kernels.qk_norm_rope`` against the compiled module path (``rms_norm`` then
  ``apply_rotary_emb``, for q and for k).

    python eval/bench_fused_ops.py --out runs/fused_ops.json     # on a GPU: well under a minute
    python eval/bench_fused_ops.py --device cpu --tiny           # a CPU smoke run (interpreter, tiny shapes)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_json import write_result  # noqa: E402
from bench_kernels import timer as time_ms  # noqa: E402  (do_bench medians on CUDA)

WAN = dict(tokens=4680, dim=1536, ffn=8960, heads=12)
TINY = dict(tokens=40, dim=64, ffn=160, heads=4)


def rows_for(shape: dict, device: torch.device, dtype: torch.dtype, compile_: bool) -> list[dict]:
    from genkv.fp8 import quantize_rows
    from genkv.kernels.fp8_rows import quantize_rows_fp8
    from genkv.kernels.qk_norm_rope import qk_norm_rope
    from genkv.rope import apply_rotary_emb

    maybe_compile = (lambda fn: torch.compile(fn, dynamic=False)) if compile_ else (lambda fn: fn)
    gen = torch.Generator(device=device).manual_seed(0)
    tokens, dim, ffn, heads = shape["tokens"], shape["dim"], shape["ffn"], shape["heads"]
    hidden = torch.randn(tokens, ffn, device=device, dtype=dtype, generator=gen)
    attn_out = torch.randn(tokens, dim, device=device, dtype=dtype, generator=gen)
    q = torch.randn(1, tokens, dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(1, tokens, dim, device=device, dtype=dtype, generator=gen)
    weight_q = torch.rand(dim, device=device, dtype=dtype, generator=gen) + 0.5
    weight_k = torch.rand(dim, device=device, dtype=dtype, generator=gen) + 0.5
    angle = torch.rand(1, tokens, 1, dim // heads // 2, device=device, generator=gen) * 6
    cos, sin = torch.cos(angle).repeat_interleave(2, -1), torch.sin(angle).repeat_interleave(2, -1)

    def gelu_quant_torch(h):
        return quantize_rows(torch.nn.functional.gelu(h, approximate="tanh"))

    def norm_rope_torch(q, k):
        out = []
        for x, w in ((q, weight_q), (k, weight_k)):
            normed = torch.nn.functional.rms_norm(x, (dim,), w, 1e-6).unflatten(2, (heads, -1))
            out.append(apply_rotary_emb(normed, cos, sin))
        return out

    cases = [
        ("fp8 quantize rows, GELU (FFN)", tokens * ffn, maybe_compile(gelu_quant_torch), (hidden,),
         lambda: quantize_rows_fp8(hidden, "gelu_tanh", tiled=False)),
        ("fp8 quantize rows, GELU (FFN), tiled", tokens * ffn, maybe_compile(gelu_quant_torch), (hidden,),
         lambda: quantize_rows_fp8(hidden, "gelu_tanh", tiled=True)),
        ("fp8 quantize rows (attention output)", tokens * dim, maybe_compile(quantize_rows), (attn_out,),
         lambda: quantize_rows_fp8(attn_out, tiled=False)),
        ("fp8 quantize rows (attention output), tiled", tokens * dim, maybe_compile(quantize_rows), (attn_out,),
         lambda: quantize_rows_fp8(attn_out, tiled=True)),
        ("q/k RMSNorm + RoPE", 2 * tokens * dim, maybe_compile(norm_rope_torch), (q, k),
         lambda: qk_norm_rope(q, k, weight_q, weight_k, 1e-6, cos, sin, heads)),
    ]
    rows = []
    for name, elements, torch_fn, args, genkv_fn in cases:
        want, got = torch_fn(*args), genkv_fn()
        errors = [((g.float() - w.float()).abs().max() / w.float().abs().max().clamp(min=1e-12)).item()
                  for g, w in zip(got, want)]
        torch_ms, genkv_ms = time_ms(lambda: torch_fn(*args), device), time_ms(genkv_fn, device)
        in_bytes = elements * hidden.element_size()
        rows.append({"op": name, "elements": elements, "torch_compiled_us" if compile_ else "torch_eager_us":
                     torch_ms * 1e3, "genkv_us": genkv_ms * 1e3, "speedup": torch_ms / genkv_ms,
                     "genkv_read_GBps": in_bytes / genkv_ms / 1e6, "max_rel_diff_vs_torch": max(errors)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run under TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, default=Path("runs/fused_ops.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape = TINY if args.tiny else WAN
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = rows_for(shape, device, dtype, compile_=cuda)
    baseline = "torch compiled" if cuda else "torch eager"
    print(f"\n{'op':<38} {baseline + ' us':>18} {'genkv us':>10} {'speedup':>8} {'genkv GB/s read':>16} "
          f"{'max rel diff':>13}")
    for r in rows:
        base = r.get("torch_compiled_us", r.get("torch_eager_us"))
        print(f"{r['op']:<38} {base:18.1f} {r['genkv_us']:10.1f} {r['speedup']:7.2f}x {r['genkv_read_GBps']:16.0f} "
              f"{r['max_rel_diff_vs_torch']:13.2e}")
    write_result(args.out, device, shape=shape, dtype=str(dtype).replace("torch.", ""), rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
