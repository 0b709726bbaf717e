"""The small Triton kernels compiled for sm_90 (Hopper) on this CPU, no GPU: the interpreter runs a kernel's Python,
so what only the compiler rejects (a module global read inside ``@triton.jit`` that is not a ``tl.constexpr``, a
cast it has no rule for) passed every interpreter test once and failed on the first GPU run. A subprocess with
``TRITON_INTERPRET=0`` compiles each launch shape the library uses (to PTX; no ptxas)."""

import os
import subprocess
import sys
import textwrap

import pytest

CODE = textwrap.dedent("""
    import itertools, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from genkv.kernels.quant_pool import _pool_codes_kernel
    from genkv.kernels.quant_write import _write_rows_kernel
    from genkv.kernels.fp8_rows import _quantize_rows_kernel, _quantize_rows_tiled_kernel
    from genkv.kernels.qk_norm_rope import _norm_rope_kernel
    from genkv.kernels.adaln import _adaln_kernel
    from genkv.kernels.pair_scores import _pair_scores_kernel

    TARGET = GPUTarget("cuda", 90, 32)
    CODES = {1: "*u8", 2: "*i8", 3: "*u8"}  # fp8 codes go in as their bytes

    def compile_(kernel, types, constexprs, **options):
        names = list(kernel.arg_names)
        sig = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in names}
        src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
        triton.compile(src, target=TARGET, options=dict(num_warps=4, **options))

    failed = []
    for kind, blend, dim in itertools.product((1, 2, 3), (False, True), (64, 128)):
        types = dict(K="*bf16", V="*bf16", Chan="*fp32", Slots="*i64", Weight="*fp32", Merged="*u8",
                     KC=CODES[kind], KS="*fp16", VC=CODES[kind], VS="*fp16", VZ="*fp16")
        try:
            compile_(_write_rows_kernel, types, dict(KIND=kind, HEAD_DIM=dim, BLEND=blend, ROWS=16),
                     enable_fp_fusion=False)
        except Exception as error:
            failed.append(f"write_rows kind={kind} blend={blend} dim={dim}: {str(error)[-600:]}")
    for kind, dim in itertools.product((1, 2, 3), (64, 128)):
        types = dict(KC=CODES[kind], KS="*fp16", Chan="*fp32", Out="*fp32")
        try:
            compile_(_pool_codes_kernel, types, dict(KIND=kind, HEAD_DIM=dim, BLOCK_N=128, ROWS=32))
        except Exception as error:
            failed.append(f"pool_codes kind={kind} dim={dim}: {str(error)[-600:]}")
    for act, dtype, block, emulate in itertools.product((0, 1, 2), ("bf16", "fp16", "fp32"), (2048, 16384),
                                                        (False, True)):
        try:
            pieces = (8192, 512, 256) if block == 16384 else (1024, 512, 0)  # 8960 and 1536 columns
            compile_(_quantize_rows_kernel, dict(X="*" + dtype, Codes="*u8", Scale="*fp32"),
                     dict(ACT=act, PIECE_A=pieces[0], PIECE_B=pieces[1], PIECE_C=pieces[2], EMULATE=emulate))
        except Exception as error:
            failed.append(f"fp8_rows act={act} {dtype} pieces={pieces} emulate={emulate}: {str(error)[-600:]}")
        try:
            compile_(_quantize_rows_tiled_kernel, dict(X="*" + dtype, Codes="*u8", Scale="*fp32"),
                     dict(ACT=act, TILE=block // 8, EMULATE=emulate))
        except Exception as error:
            failed.append(f"fp8_rows tiled act={act} {dtype} tile={block // 8}: {str(error)[-600:]}")
    for dtype, heads, dim, upcast in itertools.product(("bf16", "fp16", "fp32"), (12, 3), (128, 16), (False, True)):
        try:
            compile_(_norm_rope_kernel, dict(X="*" + dtype, W="*" + dtype, Cos="*fp32", Sin="*fp32",
                                             Out="*" + dtype, eps="fp32"),
                     dict(HEADS=heads, HEAD_DIM=dim, BLOCK_H=16 if heads > 4 else 4, UPCAST=upcast))
        except Exception as error:
            failed.append(f"qk_norm_rope {dtype} heads={heads} dim={dim} upcast={upcast}: {str(error)[-600:]}")
    # the three Wan-block stretches (modulated, gated + affine, residual + modulated), each with and without codes
    stretches = [dict(HAS_DELTA=False, HAS_GATE=False, HAS_AFFINE=False, HAS_MODULATION=True),
                 dict(HAS_DELTA=True, HAS_GATE=True, HAS_AFFINE=True, HAS_MODULATION=False),
                 dict(HAS_DELTA=True, HAS_GATE=False, HAS_AFFINE=False, HAS_MODULATION=True)]
    for stretch, dtype, quantize, block in itertools.product(stretches, ("bf16", "fp16", "fp32"), (False, True),
                                                              (2048, 8192)):
        types = dict(X="*" + dtype, Delta="*" + dtype, Gate="*fp32", W="*fp32", Bias="*fp32", Scale="*fp32",
                     Shift="*fp32", H="*" + dtype, Normed="*" + dtype, Codes="*u8", CodeScale="*fp32", eps="fp32")
        flags = dict(stretch, NORMALIZE=True, WRITE_H=stretch["HAS_DELTA"], WRITE_NORMED=not quantize,
                     QUANTIZE=quantize, BLOCK=block, EMULATE=False)
        try:
            compile_(_adaln_kernel, types, flags)
        except Exception as error:
            failed.append(f"adaln {stretch} {dtype} quantize={quantize} block={block}: {str(error)[-600:]}")
    for dtype, heads, dim, rotate in itertools.product(("bf16", "fp16", "fp32"), (12, 3), (128, 16), (False, True)):
        types = dict(K="*" + dtype, Slots="*i64", KNew="*" + dtype, Cos="*fp32", Sin="*fp32", Out="*fp32")
        try:
            compile_(_pair_scores_kernel, types, dict(HEADS=heads, HEAD_DIM=dim, BLOCK_H=16 if heads > 4 else 4,
                                                      BLOCK_K=16, ROTATE=rotate))
        except Exception as error:
            failed.append(f"pair_scores {dtype} heads={heads} dim={dim} rotate={rotate}: {str(error)[-600:]}")
    print("\\n".join(failed))
    sys.exit(1 if failed else 0)
""")


def test_small_kernels_compile_for_hopper():
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        pytest.skip("triton without its GPU backends")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


HOPPER_WS_CODE = textwrap.dedent("""
    import itertools, sys
    from genkv.kernels.block_sparse_hopper import compile_for_sm90

    failed = []
    # every combination on one consumer; the ping-pong form (the same consumer code twice) with bias and resume both
    # off or both on
    shapes = [(False, *shape) for shape in itertools.product(("bf16", "fp16"), (64, 128), (False, True),
                                                             (False, True), (False, True))]
    shapes += [(True, dtype, dim, split, extras, extras)
               for dtype, dim, split, extras in itertools.product(("bf16", "fp16"), (64, 128), (False, True),
                                                                  (False, True))]
    for pingpong, dtype, dim, split, bias, resume in shapes:
        name = f"pingpong={pingpong} {dtype} dim={dim} split={split} bias={bias} resume={resume}"
        try:
            c = compile_for_sm90(dim, split, dtype=dtype, bias=bias, resume=resume, warp_specialize=True,
                                 pingpong=pingpong)
            if c.metadata.shared > 232448:
                failed.append(f"{name}: shared {c.metadata.shared}")
        except Exception as error:
            failed.append(f"{name}: {str(error)[-600:]}")
    print("\\n".join(failed))
    sys.exit(1 if failed else 0)
""")


def test_the_warp_specialised_hopper_kernel_compiles_for_every_launch_shape():
    """The Gluon kernel's warp-specialised variant (``block_sparse_hopper``, ``warp_specialize=True``) at every
    switch combination a launch can make: fp16 / bf16, head dim 64 / 128, split or not, key bias, resume; and its
    ping-pong form (``pingpong=True``). (Their ptxas resources at four shapes: ``test_hopper_kernel.py``.)"""
    pytest.importorskip("triton")
    from genkv.kernels import block_sparse_hopper

    if not block_sparse_hopper.gluon_available():
        pytest.skip("this Triton has no Gluon")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        pytest.skip("triton without its GPU backends")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", HOPPER_WS_CODE], capture_output=True, text=True, timeout=900,
                          env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
