"""eval/bench_split.py on two CPU processes (torchrun, gloo) at tiny shapes: one row per method from the decoding
stage, with every stage's memory; each stage holds half of the one-process KV cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "eval" / "bench_split.py"


def _run(argv: list[str], tmp_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *argv, "--model", "tiny", "--frames", "33", "--warmup-frames", "0",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / argv[-1]).read_text()) if argv[-2] == "--json" else {}


def test_two_stages_report_every_stage_and_half_the_cache_each(tmp_path):
    split = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT), "--methods",
                  "fastar", "rolling", "--json", "split.json"], tmp_path)
    one = _run([str(SCRIPT), "--methods", "fastar", "rolling", "--json", "one.json"], tmp_path)
    assert split["stages"] == 2 and one["stages"] == 1
    for row, alone in zip(split["rows"], one["rows"]):
        assert row["method"] == alone["method"] and row["frames"] == alone["frames"] == 33
        assert len(row["stage_peak_memory_bytes"]) == 2 and min(row["stage_peak_memory_bytes"]) > 0
        assert row["stage_kv_bytes"] == [alone["stage_kv_bytes"][0] // 2] * 2  # an even number of tiny blocks
        assert row["fps_total"] > 0 and len(row["chunk_ms"]) == 3
