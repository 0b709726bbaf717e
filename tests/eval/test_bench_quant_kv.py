"""eval/bench_quant_kv.py at its small shapes on the CPU: every storage's single kernel call and its split read
(``chunk_attention="sdpa"``: dense chunk + the kernel resuming over the history) compute the same attention."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "eval" / "bench_quant_kv.py"


def test_split_rows_compute_what_the_single_call_computes(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--device", "cpu", "--iters", "1", "--warmup", "0",
                           "--out", str(tmp_path / "q.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "q.json").read_text())["rows"]
    single = {(r["density"], r["kind"]): r for r in rows}
    for density in ("dense", "top-16", "fastar"):
        for kind in ("bf16", "fp8", "int8", "int4"):
            alone, split = single[(density, kind)], single[(density, f"{kind}+sdpa")]
            # the error against float32 attention over the unquantized keys: quantization's, equal in both
            assert abs(split["rel_err"] - alone["rel_err"]) < 1e-5, (density, kind, split, alone)
            assert split["history_bytes"] == alone["history_bytes"] and split["ms"] > 0
    assert single[("top-16", "int4")]["rel_err"] > 0.1 > single[("top-16", "int8")]["rel_err"]  # really quantized
    pools = {r["kind"]: r for r in json.loads((tmp_path / "q.json").read_text())["pool_rows"]}
    assert set(pools) == {"fp8", "int8", "int4"}
    for r in pools.values():  # the one-pass kernel (interpreted here) and the torch reference pool the same means
        assert r["blocks"] > 0 and r["kernel_ms"] > 0 and r["torch_ms"] > 0 and r["max_abs_diff"] < 1e-5


def test_scale_storage_and_int4_switch_variants_are_rows_of_one_process(tmp_path):
    # fp32-stored scales hold the same fp16 values (bit-identical attention: equal errors) and take 4 bytes, not 2,
    # per token and head; the int4 switches do not reach the CPU's gather path, so their rows agree too
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--device", "cpu", "--iters", "1", "--warmup", "0",
                           "--densities", "fastar", "--kinds", "int8", "int4", "--scales", "fp16", "fp32",
                           "--int4-asm", "both", "--int4-zero-in-v", "both", "--out", str(tmp_path / "q.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["kind"]: r for r in json.loads((tmp_path / "q.json").read_text())["rows"]}
    assert {r["density"] for r in rows.values()} == {"fastar"}
    int4 = {f"int4{s}/{a}/{z}" for s in ("", "/s32") for a in ("asm", "noasm") for z in ("zv", "nozv")}
    assert set(rows) >= {"int8", "int8/s32"} | int4
    tokens_heads = 400 * 2  # SMALL: 400 history tokens, 2 heads
    for kind, scale_fields in (("int8", 2), ("int4/noasm/nozv", 3)):
        wide = kind.replace("/", "/s32/", 1) if "/" in kind else kind + "/s32"
        assert rows[wide]["rel_err"] == rows[kind]["rel_err"]
        assert rows[wide]["history_bytes"] - rows[kind]["history_bytes"] == 2 * scale_fields * tokens_heads
    assert len({rows[k]["rel_err"] for k in int4}) == 1


def test_scale_layout_rows_hold_the_same_values_and_bytes(tmp_path):
    # ``--scale-layouts heads tokens``: the same fp16 scales laid out two ways (bit-identical attention, so equal
    # errors, and the same bytes), one row each, named /hd and /tok
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--device", "cpu", "--iters", "1", "--warmup", "0",
                           "--densities", "fastar", "--kinds", "int8", "int4", "--scale-layouts", "heads", "tokens",
                           "--out", str(tmp_path / "q.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["kind"]: r for r in json.loads((tmp_path / "q.json").read_text())["rows"]}
    assert set(rows) >= {"int8/hd", "int8/tok", "int4/hd", "int4/tok", "int4/hd+sdpa", "int4/tok+sdpa"}
    for kind in ("int8", "int4", "int4+sdpa"):
        heads, tokens = rows[kind.replace("int4", "int4/hd").replace("int8", "int8/hd")], \
            rows[kind.replace("int4", "int4/tok").replace("int8", "int8/tok")]
        assert heads["rel_err"] == tokens["rel_err"] and heads["history_bytes"] == tokens["history_bytes"]


def test_scale_in_v_rows_come_only_where_the_zero_points_are_in_v_too():
    """``--int4-scale-in-v both``: a row with it off and one with it on, but none with the zero points off and the
    scales on (the launch ignores the scales switch there: two rows would time one kernel)."""
    import argparse

    sys.path.insert(0, str(SCRIPT.parent))
    import bench_quant_kv

    def names(zero, scale):
        args = argparse.Namespace(kinds=["int8", "int4"], scales=None, scale_layouts=None, int4_asm="default",
                                  int4_zero_in_v=zero, int4_scale_in_v=scale)
        return [bench_quant_kv.variant_name(*v) for v in bench_quant_kv.variants(args)]

    assert names("both", "both") == ["int8", "int4/nozv/nosv", "int4/zv/nosv", "int4/zv/sv"]
    assert names("default", "both") == ["int8", "int4/nosv", "int4/sv"]
    assert names("default", "default") == ["int8", "int4"]
