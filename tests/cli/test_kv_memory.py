"""``genkv render --kv-memory SIZE``: a memory budget instead of frames (issue 22); ``--set kv_dtype=...``."""

import json

from genkv.cli.main import main
from genkv.cli.render import parse_size


def _render(prompts, out, *extra):
    argv = ["render", str(prompts), "--model", "tiny-random", "--frames", "17", "--out", str(out), "--overwrite",
            *extra]
    assert main(argv) == 0
    return json.loads((out / "000-a-red-circle-bouncing.json").read_text())


def test_sizes_parse_and_a_bad_one_is_one_line(prompts, capsys):
    assert (parse_size("6GiB"), parse_size("512MiB"), parse_size("1.5GB"), parse_size("4096")) == (
        6 * 2**30, 512 * 2**20, 1_500_000_000, 4096)
    assert main(["render", str(prompts), "--model", "tiny-random", "--kv-memory", "6 gigs"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--kv-memory '6 gigs' is not a size; e.g. 6GiB" in err


def test_kv_memory_fits_more_frames_at_int4_within_the_bytes(prompts, tmp_path):
    plain = _render(prompts, tmp_path / "a", "--kv-memory", "60KB")
    packed = _render(prompts, tmp_path / "b", "--kv-memory", "60KB", "--set", "kv_dtype=int4")
    for summary in (plain, packed):
        assert summary["method"]["budget_bytes"] == 60_000
        assert summary["kv_budget"]["bytes"] == summary["kv_bytes"] <= 60_000
    assert packed["method"]["kv_dtype"] == "int4"
    assert packed["kv_budget"]["window_frames"] >= 2 * plain["kv_budget"]["window_frames"]


def test_kv_memory_on_an_unbounded_method_is_one_line(prompts, tmp_path, capsys):
    assert main(["render", str(prompts), "--model", "tiny-random", "--method", "full", "--kv-memory", "1GiB",
                 "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "budget_bytes needs a bounded method" in err
