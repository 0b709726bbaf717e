"""eval/bench_fused_ops.py end to end at tiny shapes on the CPU (the kernels under the interpreter): every row is
there, the genkv kernels agree with the torch ops they replace, and the JSON is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

EVAL = Path(__file__).resolve().parents[2] / "eval"


def test_tiny_run_writes_rows_that_agree_with_torch(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EVAL))
    import bench_fused_ops

    out = tmp_path / "fused.json"
    assert bench_fused_ops.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["op"] for r in rows] == ["fp8 quantize rows, GELU (FFN)",
                                       "fp8 quantize rows, GELU (FFN), one power-of-two block",
                                       "fp8 quantize rows, GELU (FFN), tiled",
                                       "fp8 quantize rows (attention output)",
                                       "fp8 quantize rows (attention output), tiled", "q/k RMSNorm + RoPE",
                                       "norm1 + modulation", "norm1 + modulation, fp8 codes",
                                       "gated residual + affine norm2", "residual + norm3 + modulation",
                                       "residual + norm3 + modulation, fp8 codes", "tempcache merge scores"]
    # codes may sit one e4m3 step apart at a rounding midpoint; the norms (+ rope) and the merge scores only by
    # float32 rounding
    codes = [0, 1, 2, 3, 4, 7, 10]
    assert all(r["max_rel_diff_vs_torch"] < 0.07 for i, r in enumerate(rows) if i in codes)
    assert all(r["max_rel_diff_vs_torch"] < 1e-5 for i, r in enumerate(rows) if i not in codes)
    sys.modules.pop("bench_fused_ops", None)
