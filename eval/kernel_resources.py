"""What the block-sparse kernel costs a Hopper SM before it runs: compiled for sm_90 on any machine, no GPU needed.

Triton compiles to a target given by name, and its wheel ships ptxas, so shared memory (what decides whether a
launch fits: 232448 bytes per block on an H100 / H200), registers per thread, spill bytes and ptxas' performance
warnings (C7515: wgmma serialised) can be read on a CPU box. Integer arguments are marked divisible by 16 where a
real launch at Wan shapes has them so (strides of q / K / V / codes), as Triton's launcher does, so the compiler
pipelines the loads as it does on the GPU: the old kernel's fp8 / int8 launch at 3 stages asks for 294920 bytes
here, exactly what the H200 refused (docs/BENCHMARKS.md, 2026-12-04 afternoon).

    TRITON_INTERPRET=0 python eval/kernel_resources.py --out runs/kernel_resources.json
    TRITON_INTERPRET=0 python eval/kernel_resources.py --kinds int8 int4 --stages 3 --fast both
    TRITON_INTERPRET=0 python eval/kernel_resources.py --kinds int8 int4 --stages 3 --resume --bias --scales fp16 fp32

Use the GPU image's Triton for its numbers (``pip install --target DIR triton==3.6.0`` and ``PYTHONPATH=DIR``); 3.6
and 3.7 agreed on every shared-memory figure checked (2026-12-05).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_json import write_result  # noqa: E402

SWITCH_VALUES = {"off": [False], "on": [True], "both": [False, True]}  # --fast / --int8-qk: the variants compiled
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (H100, H200)
CODE_TYPES = {"bf16": "bf16", "fp8": "fp8e4nv", "int8": "i8", "int4": "u8"}
HIST_KIND = {"bf16": 0, "fp8": 1, "int8": 2, "int4": 3}
# Integer arguments a Wan-shaped launch has divisible by 16 (12 heads x 128: the rows of q / K / V / codes / out);
# the per-token scales' (B, S, H) strides are not (H = 12) in the ``tokens`` layout; in ``heads`` their batch and head
# strides are (rows padded to 16 slots) and their slot stride is 1 (see compile_variant).
DIVISIBLE = {"stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs",
             "stride_vh", "stride_ob", "stride_os", "stride_oh", "stride_hb", "stride_hs", "stride_hh", "stride_xb",
             "stride_xh", "stride_zb", "stride_zs", "stride_zh", "stride_sb"}


def signature(kernel, kind: str, scales: str = "fp16") -> dict[str, str]:
    """Triton types of the kernel's arguments for a bf16 model with history ``kind``, its per-token scales stored as
    ``scales`` (``GENKV_KV_SCALES``)."""
    pointers = {"Q": "bf16", "K": "bf16", "V": "bf16", "Bias": "fp32", "Out": "bf16", "Lse": "fp32", "Idx": "i32",
                "Cnt": "i32", "HK": CODE_TYPES[kind], "HV": CODE_TYPES[kind], "HKS": scales, "HVS": scales,
                "HVZ": scales, "HC": "fp32", "Init": "bf16", "InitLse": "fp32"}
    constexprs = {kernel.arg_names[i] for i in kernel.constexprs}
    sig = {}
    for name in kernel.arg_names:
        if name in pointers:
            sig[name] = "*" + pointers[name]
        elif name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    return sig


def load_kernel(path: Path | None):
    """``_block_sparse_fwd`` of this checkout, or of another checkout's ``kernels/block_sparse.py`` (a comparison)."""
    if path is None:
        from genkv.kernels.block_sparse import _block_sparse_fwd

        return _block_sparse_fwd
    import importlib.util
    import types

    # A package of its own over the file's folder, so its relative imports (``from .quant_kv import ...``) load
    # that checkout's modules, not this one's (and its __init__, which imports everything, never runs).
    folder = Path(path).resolve().parent
    package = types.ModuleType(f"kernels_under_test_{abs(hash(str(folder)))}")
    package.__path__ = [str(folder)]
    sys.modules[package.__name__] = package
    spec = importlib.util.spec_from_file_location(f"{package.__name__}.{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module._block_sparse_fwd


def compile_variant(kind: str, stages: int, fast: bool, resume: bool, args, int8_qk: bool = False,
                    scales: str = "fp16", int4_asm: bool = False, zero_in_v: bool = False,
                    scale_in_v: bool = False) -> dict:
    """Compile one launch shape for sm_90 and read its resources (ptxas -v on the PTX) and, from the SASS
    (nvdisasm), its instruction count and its 2-byte global loads (``LDG.E.U16``: scalar, synchronous loads, what
    fp16 scale columns at a stride of H compile to; 4-byte ones become asynchronous copies)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = load_kernel(args.kernel_file)
    names = list(kernel.arg_names)
    sig = signature(kernel, kind, scales)
    consts = dict(HAS_BIAS=args.bias, STORE_LSE=False, MASK_BLOCK_M=128, MASK_BLOCK_N=128, TILE_M=args.tile_m,
                  TILE_N=args.tile_n, HEAD_DIM=args.head_dim, RAGGED=True, WARP_SPECIALIZE=False,
                  USE_TMA=kind == "bf16", HIST_KIND=HIST_KIND[kind], HAS_INIT=resume, FAST_DEQUANT=fast,
                  INT8_QK=int8_qk, INT4_ASM=int4_asm, INT4_ZERO_IN_V=zero_in_v, INT4_SCALE_IN_V=scale_in_v,
                  LIST_WIDTH=args.list_width,
                  NUM_STAGES=stages)
    divisible = set(DIVISIBLE)
    if args.scale_layout == "heads" and kind != "bf16" and "stride_ss" in names:
        # quant_kv's ``heads`` layout: a (batch, head)'s scales contiguous over tokens (stride 1, which Triton's
        # launcher specialises as a constant), rows padded to 16 slots
        consts["stride_ss"] = 1
        sig["stride_ss"] = "constexpr"
        divisible |= {"stride_sb", "stride_sh"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*") or n in divisible}
    # (constants a kernel does not take are dropped: an older checkout's kernel compiles too, for comparisons)
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items() if k in names},
                    attrs=attrs)
    row = dict(kind=kind, stages=stages, fast_dequant=fast, resume=resume, int8_qk=int8_qk, scales=scales,
               scale_layout=args.scale_layout,
               int4_asm=int4_asm, int4_zero_in_v=zero_in_v, int4_scale_in_v=scale_in_v)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=args.warps, num_stages=stages))
    except Exception as error:  # noqa: BLE001 - a variant that does not compile is a row, not a crash
        return {**row, "error": str(error).splitlines()[0][:200]}
    shared = int(compiled.metadata.shared)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(compiled.asm["ptx"])
        report = subprocess.run([str(tools / "ptxas"), "-arch=sm_90a", "-v", str(Path(tmp) / "k.ptx"), "-o",
                                 str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(Path(tmp) / "k.cubin")], capture_output=True,
                              text=True).stdout if (tools / "nvdisasm").exists() else ""
    text = report.stdout + report.stderr
    instructions = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else None  # noqa: E731
    return {**row, "shared_bytes": shared, "fits": shared <= SHARED_LIMIT,
            "registers": number(r"Used (\d+) registers"), "spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "spill_load_bytes": number(r"(\d+) bytes spill loads"),
            "warnings": sorted(set(re.findall(r"\((C\d+)\)", text))),
            "sass_instructions": len(instructions) if sass else None,
            "global_u16_loads": sum(op == "LDG.E.U16" for op in instructions) if sass else None,
            "opcodes": dict(Counter(op.split(".")[0] for op in instructions).most_common()) if sass else None,
            "loops": loop_bodies(sass) if sass else None}


def loop_bodies(sass: str) -> list[dict[str, int]]:
    """The opcodes of each loop in nvdisasm output, in code order: the instructions from a label to a branch back to
    it (its last one). The block-sparse kernel's first loop over a quantized history is its whole-history loop."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\.L_x_\d+):", line))}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            ops = [op.group(1).split(".")[0] for x in lines[labels[m.group(1)]:i + 1]
                   if (op := re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", x))]
            if len(ops) > 1:  # (not a one-instruction spin, e.g. the trap loop at the end)
                loops.append(dict(Counter(ops)))
    return loops


def applies(kind: str, fast: bool, int8_qk: bool, int4_asm: bool, zero_in_v: bool = False,
            scale_in_v: bool = False) -> bool:
    """Whether a switch combination is a launch the library makes: ``fast_dequant`` for int8 / int4, ``int8_qk``
    for int8, ``int4_asm`` and ``int4_zero_in_v`` for int4 on ``fast_dequant``'s path, ``int4_scale_in_v`` on
    ``int4_zero_in_v``'s."""
    return (not fast or kind in ("int8", "int4")) and (not int8_qk or kind == "int8") and \
        (not (int4_asm or zero_in_v) or (kind == "int4" and fast)) and (not scale_in_v or zero_in_v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=["bf16", "fp8", "int8", "int4"], choices=tuple(HIST_KIND))
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--fast", choices=("off", "on", "both"), default="both",
                        help="fast_dequant variants (int8 / int4 only)")
    parser.add_argument("--resume", action="store_true", help="also the variants resuming from a partial (initial=)")
    parser.add_argument("--int4-asm", choices=("off", "on", "both"), default="off",
                        help="int4 with --fast on: nibbles unpacked by inline PTX (int4_asm)")
    parser.add_argument("--int4-zero-in-v", choices=("off", "on", "both"), default="off",
                        help="int4 with --fast on: zero points added to the value tiles (int4_zero_in_v)")
    parser.add_argument("--int4-scale-in-v", choices=("off", "on", "both"), default="off",
                        help="with --int4-zero-in-v on: the value tiles dequantized whole (int4_scale_in_v)")
    parser.add_argument("--int8-qk", choices=("off", "on", "both"), default="off",
                        help="int8_qk variants (int8 histories only: logits from an int8 x int8 dot)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tile-m", type=int, default=128)
    parser.add_argument("--tile-n", type=int, default=128)
    parser.add_argument("--warps", type=int, default=8)
    parser.add_argument("--list-width", type=int, default=64, help="a list's padded width (top-16 at Wan shapes: 64)")
    parser.add_argument("--bias", action="store_true", help="with a key bias (fastar's log counts)")
    parser.add_argument("--scales", nargs="+", choices=("fp16", "fp32"), default=["fp16"],
                        help="the per-token scales' storage (GENKV_KV_SCALES), one variant each")
    parser.add_argument("--scale-layout", choices=("heads", "tokens"), default=None,
                        help="the per-token scales' layout (default: the library's, GENKV_KV_SCALE_LAYOUT's)")
    parser.add_argument("--kernel-file", type=Path, default=None,
                        help="another checkout's kernels/block_sparse.py, to compare (default: this one's)")
    parser.add_argument("--out", type=Path, default=Path("kernel_resources.json"))
    args = parser.parse_args(argv)
    if args.scale_layout is None:
        from genkv.kernels.quant_kv import SCALE_LAYOUT

        args.scale_layout = SCALE_LAYOUT
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run with TRITON_INTERPRET=0: the interpreter's kernels cannot be compiled")
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as error:
        parser.error(f"needs triton with its NVIDIA backend ({error})")
    fast_options, qk_options = SWITCH_VALUES[args.fast], SWITCH_VALUES[args.int8_qk]
    rows = []
    for kind, stages, fast, resume, int8_qk, scales, int4_asm, zero_in_v, scale_in_v in itertools.product(
            args.kinds, args.stages, fast_options, [False, True] if args.resume else [False], qk_options, args.scales,
            SWITCH_VALUES[args.int4_asm], SWITCH_VALUES[args.int4_zero_in_v], SWITCH_VALUES[args.int4_scale_in_v]):
        if not applies(kind, fast, int8_qk, int4_asm, zero_in_v, scale_in_v) or \
                (kind == "bf16" and scales != args.scales[0]):
            continue  # (a bf16 history has no scales: one variant)
        rows.append(compile_variant(kind, stages, fast, resume, args, int8_qk, scales, int4_asm, zero_in_v,
                                    scale_in_v))
        r = rows[-1]
        name = (f"{kind:>5s} stages {stages} fast {fast!s:5s} resume {resume!s:5s} int8_qk {int8_qk!s:5s} "
                f"scales {scales} int4_asm {int4_asm!s:5s} zero_in_v {zero_in_v!s:5s} scale_in_v {scale_in_v!s:5s}")
        if "error" in r:
            print(f"{name}: {r['error']}", flush=True)
        else:
            print(f"{name}: shared {r['shared_bytes']:6d} "
                  f"({'fits' if r['fits'] else 'TOO BIG'}), {r['registers']} registers, spills "
                  f"{r['spill_store_bytes']} / {r['spill_load_bytes']} B, warnings {r['warnings'] or '-'}, "
                  f"{r['sass_instructions']} SASS instructions, {r['global_u16_loads']} 2-byte global loads",
                  flush=True)
    import triton

    write_result(args.out, "cpu", triton=triton.__version__, target="cuda sm_90 (compiled here, not run)", shared_limit=SHARED_LIMIT,
                 head_dim=args.head_dim, tile_m=args.tile_m, tile_n=args.tile_n, warps=args.warps,
                 list_width=args.list_width, bias=args.bias,
                 kernel_file=str(args.kernel_file) if args.kernel_file else "this checkout", rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
