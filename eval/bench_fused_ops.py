"""genkv's small fused kernels against what ``torch.compile`` makes of the same torch ops, at a Wan2.1-1.3B chunk's
shapes (4680 tokens, dim 1536, FFN 8960, 12 heads x 128): each op alone, timed with ``triton.testing.do_bench``
(median), checked against the compiled torch output first.

- ``fp8 quantize rows, GELU (FFN)``: ``genkv.kernels.fp8_rows`` with the tanh GELU, against Inductor's kernel for
  ``quantize_rows(gelu(h))`` (the FP8 FFN's down-projection input, unfused);
- ``fp8 quantize rows (attention output)``: the same without an activation at dim 1536;
- each of those two also with the two-sweep kernel (``tiled``: 2048 columns at a time, the row read twice);
- ``q/k RMSNorm + RoPE``: ``genkv.kernels.qk_norm_rope`` against the compiled module path (``rms_norm`` then
  ``apply_rotary_emb``, for q and for k);
- the Wan block's three norm stretches (``genkv.kernels.adaln``) against the compiled diffusers arithmetic:
  ``norm1 + modulation``, ``gated residual + affine norm2``, ``residual + norm3 + modulation``, the first and the
  last also with the FP8 codes of the result instead of the row (what the FP8 path's linears read);
- ``tempcache merge scores``: ``genkv.kernels.pair_scores`` against the compiled ``genkv.keep.tempcache.pair_scores``
  (30 layers x 3 frames x 1560 tokens x 9 candidates, content matching: the new key rotated per candidate; its
  "read" bandwidth counts every candidate row as gathered, 9 per token, most of them from L2).

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

WAN = dict(tokens=4680, dim=1536, ffn=8960, heads=12, layers=30, grid=(30, 52))
TINY = dict(tokens=40, dim=64, ffn=160, heads=4, layers=2, grid=(4, 5))


def rows_for(shape: dict, device: torch.device, dtype: torch.dtype, compile_: bool) -> list[dict]:
    from genkv.fp8 import quantize_rows
    from genkv.keep.tempcache import _neighbourhood, pair_scores
    from genkv.kernels.adaln import adaln
    from genkv.kernels.fp8_rows import quantize_rows_fp8
    from genkv.kernels.pair_scores import pair_scores_triton
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

    # a block's hidden states, the attention output added to them, Wan's float32 modulation (views of one (1, 6, C)
    # table) and norm2's affine weight and bias
    states = torch.randn(1, tokens, dim, device=device, dtype=dtype, generator=gen)
    attn_delta = torch.randn(1, tokens, dim, device=device, dtype=dtype, generator=gen)
    shift, scale, gate = torch.randn(1, 6, dim, device=device, generator=gen).mul(0.3).chunk(6, dim=1)[:3]
    norm_weight = torch.rand(dim, device=device, generator=gen) + 0.5
    norm_bias = torch.randn(dim, device=device, generator=gen) * 0.1

    def layer_norm(x, weight=None, bias=None):
        return torch.nn.functional.layer_norm(x.float(), (dim,), weight, bias, 1e-6)

    def norm1_torch(x):
        return ((layer_norm(x) * (1 + scale) + shift).to(dtype),)

    def norm1_codes_torch(x):
        return quantize_rows(norm1_torch(x)[0].reshape(-1, dim))

    def norm2_torch(x, delta):
        h = (x.float() + delta * gate).to(dtype)
        return h, layer_norm(h, norm_weight, norm_bias).to(dtype)

    def norm3_torch(x, delta):
        h = x + delta
        return h, (layer_norm(h) * (1 + scale) + shift).to(dtype)

    def norm3_codes_torch(x, delta):
        h, y = norm3_torch(x, delta)
        return (h, *quantize_rows(y.reshape(-1, dim)))

    # TempCache's commit: every layer's staged frames against their 9 neighbours one frame earlier (the keys of one
    # layer at l * capacity + slot), with the relative rotation per (token, candidate)
    layers, grid, head_dim = shape["layers"], shape["grid"], dim // heads
    frame = grid[0] * grid[1]
    capacity = 4 * frame
    cache_keys = torch.randn(1, layers * capacity, heads, head_dim, device=device, dtype=dtype, generator=gen)
    nbr = _neighbourhood(grid, 1, device)
    slots = (torch.arange(3, device=device).view(1, 3, 1, 1) * frame + nbr
             + (torch.arange(layers, device=device) * capacity).view(-1, 1, 1, 1))
    staged = torch.randn(1, layers, 3, frame, heads, head_dim, device=device, dtype=dtype, generator=gen)
    turn = torch.rand(frame, nbr.shape[1], head_dim // 2, device=device, generator=gen)
    rotation = (torch.cos(turn).repeat_interleave(2, -1), torch.sin(turn).repeat_interleave(2, -1))

    def gelu_quant_torch(h):
        return quantize_rows(torch.nn.functional.gelu(h, approximate="tanh"))

    def gelu_quant_one_block(h):  # the one-pass kernel as it was before its pieces: one power-of-two block a row
        from genkv.kernels.fp8_rows import _launch_one_pass

        codes = torch.empty(h.shape, device=h.device, dtype=torch.float8_e4m3fn)
        scale = torch.empty(h.shape[0], 1, device=h.device, dtype=torch.float32)
        _launch_one_pass(h, codes, scale, "gelu_tanh", (1 << (h.shape[1] - 1).bit_length(), 0, 0))
        return codes, scale

    def norm_rope_torch(q, k):
        out = []
        for x, w in ((q, weight_q), (k, weight_k)):
            normed = torch.nn.functional.rms_norm(x, (dim,), w, 1e-6).unflatten(2, (heads, -1))
            out.append(apply_rotary_emb(normed, cos, sin))
        return out

    cases = [
        ("fp8 quantize rows, GELU (FFN)", tokens * ffn, maybe_compile(gelu_quant_torch), (hidden,),
         lambda: quantize_rows_fp8(hidden, "gelu_tanh", tiled=False)),
        ("fp8 quantize rows, GELU (FFN), one power-of-two block", tokens * ffn, maybe_compile(gelu_quant_torch),
         (hidden,), lambda: gelu_quant_one_block(hidden)),
        ("fp8 quantize rows, GELU (FFN), tiled", tokens * ffn, maybe_compile(gelu_quant_torch), (hidden,),
         lambda: quantize_rows_fp8(hidden, "gelu_tanh", tiled=True)),
        ("fp8 quantize rows (attention output)", tokens * dim, maybe_compile(quantize_rows), (attn_out,),
         lambda: quantize_rows_fp8(attn_out, tiled=False)),
        ("fp8 quantize rows (attention output), tiled", tokens * dim, maybe_compile(quantize_rows), (attn_out,),
         lambda: quantize_rows_fp8(attn_out, tiled=True)),
        ("q/k RMSNorm + RoPE", 2 * tokens * dim, maybe_compile(norm_rope_torch), (q, k),
         lambda: qk_norm_rope(q, k, weight_q, weight_k, 1e-6, cos, sin, heads)),
        ("norm1 + modulation", tokens * dim, maybe_compile(norm1_torch), (states,),
         lambda: adaln(states, None, None, None, None, scale, shift, 1e-6, True, True, False)[1:2]),
        ("norm1 + modulation, fp8 codes", tokens * dim, maybe_compile(norm1_codes_torch), (states,),
         lambda: adaln(states, None, None, None, None, scale, shift, 1e-6, True, False, True)[2:]),
        ("gated residual + affine norm2", 2 * tokens * dim, maybe_compile(norm2_torch), (states, attn_delta),
         lambda: adaln(states, attn_delta, gate, norm_weight, norm_bias, None, None, 1e-6, True, True, False)[:2]),
        ("residual + norm3 + modulation", 2 * tokens * dim, maybe_compile(norm3_torch), (states, attn_delta),
         lambda: adaln(states, attn_delta, None, None, None, scale, shift, 1e-6, True, True, False)[:2]),
        ("residual + norm3 + modulation, fp8 codes", 2 * tokens * dim, maybe_compile(norm3_codes_torch),
         (states, attn_delta),
         lambda: (lambda out: (out[0], out[2], out[3]))(
             adaln(states, attn_delta, None, None, None, scale, shift, 1e-6, True, False, True))),
        ("tempcache merge scores", slots.numel() * dim, maybe_compile(pair_scores),
         (cache_keys, slots, staged, rotation), lambda: (pair_scores_triton(cache_keys, slots, staged, rotation),)),
    ]
    rows = []
    for name, elements, torch_fn, args, genkv_fn in cases:
        want, got = torch_fn(*args), genkv_fn()
        want = (want,) if isinstance(want, torch.Tensor) else want
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
    print(f"\n{'op':<42} {baseline + ' us':>18} {'genkv us':>10} {'speedup':>8} {'genkv GB/s read':>16} "
          f"{'max rel diff':>13}")
    for r in rows:
        base = r.get("torch_compiled_us", r.get("torch_eager_us"))
        print(f"{r['op']:<42} {base:18.1f} {r['genkv_us']:10.1f} {r['speedup']:7.2f}x {r['genkv_read_GBps']:16.0f} "
              f"{r['max_rel_diff_vs_torch']:13.2e}")
    write_result(args.out, device, shape=shape, dtype=str(dtype).replace("torch.", ""), rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
