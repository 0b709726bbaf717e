"""eval/kernel_resources.py: the block-sparse kernel compiled for sm_90 on this CPU (no GPU), resources read back.

Two properties of the quantized-history kernel are guarded here, as ptxas reports them: its fp8 / int8 launch at 3
stages fits a Hopper block's shared memory (the merged loop is not pipelined; before, 294920 bytes were asked for and
the H200 refused the launch), and the int4 path keeps its wgmma accumulators free of other instructions (ptxas
C7515, serialised wgmmas, came from adding the zero points to them).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "eval" / "kernel_resources.py"


def _run(tmp_path: Path, *argv: str) -> list[dict]:
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        pytest.skip("triton without its GPU backends")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = tmp_path / "resources.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv, "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def test_quantized_launches_fit_hopper_shared_memory_at_three_stages_and_int4_keeps_wgmma_async(tmp_path):
    rows = _run(tmp_path, "--kinds", "int8", "int4", "--stages", "3", "--fast", "off")
    by_kind = {row["kind"]: row for row in rows}
    assert set(by_kind) == {"int8", "int4"} and not any("error" in row for row in rows)
    for row in rows:
        assert row["fits"] and 0 < row["shared_bytes"] <= 232448, row
        assert 0 < row["registers"] <= 255 and row["spill_store_bytes"] is not None, row
    assert "C7515" not in by_kind["int4"]["warnings"], by_kind["int4"]


def test_float32_scales_take_the_scalar_scale_loads_out_of_the_int4_loops(tmp_path):
    # fp16 scale columns (2 bytes at a stride of H) compile to scalar global loads inside the loops; 4-byte ones
    # to asynchronous copies (GENKV_KV_SCALES=fp32; timed on an H100 it was slower all the same, so it is off)
    rows = _run(tmp_path, "--kinds", "int4", "--tile-n", "64", "--stages", "3", "--fast", "on", "--bias",
                "--scales", "fp16", "fp32", "--scale-layout", "tokens")
    by_scales = {row["scales"]: row for row in rows}
    if by_scales["fp16"]["global_u16_loads"] is None:
        pytest.skip("triton without nvdisasm")
    assert by_scales["fp16"]["global_u16_loads"] > 0 and by_scales["fp32"]["global_u16_loads"] == 0
    assert by_scales["fp32"]["sass_instructions"] < by_scales["fp16"]["sass_instructions"]
    assert by_scales["fp32"]["fits"] and by_scales["fp32"]["registers"] <= 255


def test_int4_inline_ptx_unpacking_compiles_with_fewer_instructions(tmp_path):
    # the inline PTX is checked by ptxas here (the interpreter never sees it); two nibbles per instruction
    rows = _run(tmp_path, "--kinds", "int4", "--tile-n", "64", "--stages", "3", "--fast", "on", "--bias",
                "--scales", "fp32", "--int4-asm", "both")
    by_asm = {row["int4_asm"]: row for row in rows}
    assert set(by_asm) == {False, True} and not any("error" in row for row in rows), rows
    assert by_asm[True]["fits"] and by_asm[True]["registers"] <= 255
    if by_asm[True]["sass_instructions"] is None:
        pytest.skip("triton without nvdisasm")
    assert by_asm[True]["sass_instructions"] < by_asm[False]["sass_instructions"]


def test_int4_scales_in_the_value_tiles_trade_multiplies_per_logit_for_packed_fmas(tmp_path):
    # int4_scale_in_v: one packed fp16 fma per two values (replacing int4_zero_in_v's add) and no multiply of p by
    # the value scales: fewer fp32 multiplies, more HFMA2, fewer instructions in all (6856 -> 6608 in Triton 3.7)
    rows = _run(tmp_path, "--kinds", "int4", "--tile-n", "64", "--stages", "3", "--fast", "on", "--bias",
                "--scales", "fp16", "--int4-asm", "on", "--int4-zero-in-v", "on", "--int4-scale-in-v", "both")
    by_switch = {row["int4_scale_in_v"]: row for row in rows}
    assert set(by_switch) == {False, True} and not any("error" in row for row in rows), rows
    on, off = by_switch[True], by_switch[False]
    assert on["fits"] and on["registers"] <= 255 and "C7515" not in on["warnings"]
    if on["sass_instructions"] is None:
        pytest.skip("triton without nvdisasm")
    assert on["sass_instructions"] < off["sass_instructions"]
    assert on["opcodes"]["FMUL"] < off["opcodes"]["FMUL"] and on["opcodes"]["HFMA2"] > off["opcodes"]["HFMA2"]


def test_the_interpreter_is_refused_in_one_line(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "TRITON_INTERPRET=0" in proc.stderr


def test_scales_contiguous_over_tokens_take_the_scalar_loads_out_of_the_whole_history_loop(tmp_path):
    # GENKV_KV_SCALE_LAYOUT=heads: a tile's scale columns are one contiguous run (slot stride 1, specialised), so the
    # whole-history loop copies them asynchronously instead of 2-byte scalar loads (at these launches int4 36 a block,
    # int8 64; the straddling block's masked loads stay scalar), in fewer instructions
    for kind, extra in (("int4", ["--tile-n", "64", "--fast", "on", "--int4-asm", "on", "--int4-zero-in-v", "on",
                                  "--int4-scale-in-v", "on"]), ("int8", ["--fast", "off", "--int8-qk", "on"])):
        rows = {layout: _run(tmp_path, "--kinds", kind, "--stages", "3", "--bias", "--resume", *extra,
                             "--scale-layout", layout)[-1] for layout in ("heads", "tokens")}
        heads, tokens = rows["heads"], rows["tokens"]
        assert heads["scale_layout"] == "heads" and tokens["scale_layout"] == "tokens"
        assert heads["fits"] and heads["registers"] <= 255 and "C7515" not in heads["warnings"], heads
        if heads["sass_instructions"] is None:
            pytest.skip("triton without nvdisasm")
        assert heads["global_u16_loads"] < tokens["global_u16_loads"], (kind, heads, tokens)
        # the first loop is the whole-history one: most of its synchronous global loads (LDG) go (int4 36 -> 4: the
        # value tiles' scale and zero point, one 2-byte element a thread in their layout, stay scalar), its copies
        # are async
        whole_heads, whole_tokens = heads["loops"][0], tokens["loops"][0]
        assert 4 * whole_heads.get("LDG", 0) < whole_tokens.get("LDG", 0), (kind, whole_heads, whole_tokens)
        assert whole_heads.get("LDGSTS", 0) > whole_tokens.get("LDGSTS", 0), (kind, whole_heads, whole_tokens)
        assert sum(whole_heads.values()) < sum(whole_tokens.values()), (kind, whole_heads, whole_tokens)


def test_another_checkouts_kernel_file_compiles_with_its_own_modules(tmp_path):
    """``--kernel-file`` loads a copy of ``kernels/block_sparse.py`` with its relative imports resolved in the copy's
    folder (a checkout to compare with): a copy of this checkout's kernel compiles to the same resources."""
    copy = tmp_path / "other" / "kernels"
    copy.mkdir(parents=True)
    here = SCRIPT.parents[1] / "kernels"
    for name in ("block_sparse.py", "quant_kv.py"):
        (copy / name).write_text((here / name).read_text())
    argv = ("--kinds", "bf16", "--stages", "2")
    ours = _run(tmp_path, *argv)
    theirs = _run(tmp_path, *argv, "--kernel-file", str(copy / "block_sparse.py"))
    assert ours == theirs and not any("error" in row for row in ours)
