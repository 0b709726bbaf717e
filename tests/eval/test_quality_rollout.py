"""eval/quality_rollout.py end to end on the tiny random model (plumbing; the measures themselves are tested in
tests/data/test_persistence.py)."""

import json
import math
import sys
from pathlib import Path

EVAL = Path(__file__).resolve().parents[2] / "eval"


def test_full_against_itself_is_identical_and_a_sparse_method_is_not(tmp_path):
    sys.path.insert(0, str(EVAL))
    try:
        import quality_rollout
    finally:
        sys.path.remove(str(EVAL))
    out = tmp_path / "q.json"
    quality_rollout.main(["--frames", "21", "--methods", "full", "full",
                          "fastar:budget_frames=2,top_k=1,prompt_top_k=2",
                          "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    again = results["full"]  # the second `full` overwrote the key: same seed, same frames
    assert again["psnr_mean"] is None or math.isinf(again["psnr_mean"]) or again["psnr_mean"] > 99
    assert again["ssim_mean"] == 1.0
    sparse = results["fastar:budget_frames=2,top_k=1,prompt_top_k=2"]
    assert len(sparse["psnr"]) == 21 and sparse["ssim_mean"] < 1.0
    assert len(sparse["flicker"]) == 20 and "objects_kept" in sparse["persistence"]
