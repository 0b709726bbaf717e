"""eval/bench_peers.py at tiny shapes on the CPU: rows, frame counts, ratios against the upstream row, skips.

The upstream Self-Forcing part needs a checkout (env GENKV_SELF_FORCING or .peers/Self-Forcing, see the script's
docstring); CI has none, so that test is skipped there and the ratio is checked against a merged upstream row.
"""

import json
import os
import re
from pathlib import Path

import pytest

from . import EVAL, import_eval_script


def _bench_peers():
    return import_eval_script("bench_peers")


def _tiny_rows(tmp_path, *systems: str) -> dict[str, dict]:
    """The rows of a 9-frame ``bench_peers`` run of ``systems`` at tiny shapes on the CPU (no warm-up), by system."""
    out = tmp_path / "peers.json"
    _bench_peers().main(["--tiny", "--systems", *systems, "--frames", "9", "--warmup-frames", "0", "--json", str(out),
                         "--device", "cpu"])
    return {row["system"]: row for row in json.loads(out.read_text())["rows"]}


def test_upstream_makes_whole_three_frame_blocks():
    bench_peers = _bench_peers()
    assert bench_peers.latent_frames_for(2000) == 501 and bench_peers.output_frames_for(501) == 2001
    assert bench_peers.latent_frames_for(33) == 9 and bench_peers.output_frames_for(9) == 33
    assert bench_peers.latent_frames_for(81) == 21
    assert bench_peers.latent_frames_for(34) == 12  # 10 latents round up to a whole block


def test_ratios_are_against_the_upstream_row_wherever_it_is():
    bench_peers = _bench_peers()
    rows = [
        dict(system="genkv", settings="s", frames=24, fps_total=5.0, fps_steady=6.0, ms_per_12_frames=2000.0,
             peak_memory_bytes=2**30),
        dict(system="flashdreams", settings="s", skipped="flashdreams: not here"),
        dict(system="upstream", settings="s", frames=25, fps_total=2.0, fps_steady=4.0, ms_per_12_frames=3000.0,
             peak_memory_bytes=None),
    ]
    bench_peers.add_ratios(rows)
    assert rows[0]["ratio_total"] == pytest.approx(2.5) and rows[0]["ratio_steady"] == pytest.approx(1.5)
    assert rows[2]["ratio_total"] == pytest.approx(1.0)
    assert "ratio_total" not in rows[1]
    table = bench_peers.format_table(rows)
    genkv_line = next(line for line in table.splitlines() if line.startswith("genkv"))
    assert genkv_line.split()[-2:] == ["2.50", "1.50"] and "1.00" in genkv_line  # peak: 1 GiB
    assert re.search(r"^flashdreams +skipped: flashdreams: not here$", table, re.M)

    alone = bench_peers.add_ratios([dict(rows[0])])  # no upstream row: no ratio
    assert alone[0]["ratio_total"] is None and alone[0]["ratio_steady"] is None


def test_genkv_rows_at_tiny_shapes_merged_with_an_upstream_row(tmp_path, capsys):
    bench_peers = _bench_peers()
    out = tmp_path / "peers.json"
    upstream = dict(system="upstream", settings="earlier run", frames=33, seconds_total=33.0, fps_total=1.0,
                    fps_steady=0.5, ms_per_12_frames=24000.0, peak_memory_bytes=None, notes=[])
    out.write_text(json.dumps({"rows": [upstream, dict(system="genkv", settings="stale", skipped="old")]}))
    bench_peers.main(["--tiny", "--systems", "genkv", "flashdreams", "--frames", "33",
                      "--warmup-frames", "0", "--merge", "--json", str(out), "--device", "cpu"])
    rows = {row["system"]: row for row in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == ["flashdreams", "genkv", "upstream"]  # the stale genkv row replaced

    genkv = rows["genkv"]
    assert genkv["frames"] == 33 and genkv["chunks"] == 3 and len(genkv["chunk_ms"]) == 3  # 9 + 12 + 12 frames
    assert genkv["fps_total"] == pytest.approx(33 / genkv["seconds_total"])
    assert genkv["ms_per_12_frames"] == pytest.approx(genkv["chunk_ms"][1])  # the one steady chunk
    assert genkv["fps_steady"] == pytest.approx(12 / (genkv["chunk_ms"][1] / 1000))
    assert genkv["ratio_total"] == pytest.approx(genkv["fps_total"] / 1.0)
    assert genkv["ratio_steady"] == pytest.approx(genkv["fps_steady"] / 0.5)
    assert rows["upstream"]["ratio_total"] == pytest.approx(1.0)

    assert rows["flashdreams"]["skipped"].startswith("flashdreams: ")
    printed = capsys.readouterr().out
    assert re.search(r"^flashdreams +skipped: flashdreams: ", printed, re.M) and "json: " in printed


def test_a_genkv_system_at_fastar_runs_fastar_and_says_so(tmp_path):
    bench_peers = _bench_peers()
    out = tmp_path / "peers.json"
    bench_peers.main(["--tiny", "--systems", "genkv@fastar", "genkv-taehv@rolling", "--frames", "21",
                      "--warmup-frames", "0", "--json", str(out), "--device", "cpu"])
    rows = {row["system"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["genkv@fastar"]["settings"] == "fastar, eager" and rows["genkv@fastar"]["frames"] == 21
    assert rows["genkv-taehv@rolling"]["settings"] == "rolling:window_frames=21 --decoder taehv"
    assert "skipped" not in rows["genkv@fastar"] and "skipped" not in rows["genkv-taehv@rolling"]
    for bad in ("genkv@full", "upstream@fastar", "genkv-fast"):
        with pytest.raises(SystemExit):
            bench_peers.main(["--tiny", "--systems", bad, "--frames", "9", "--device", "cpu"])


def test_fastar_int4_stores_its_history_as_codes_in_less_than_half_the_bytes(tmp_path):
    """@fastar-int4 is fastar with an int4 history (issue 22 beside the peers, in one run): same frames, and the
    cache's bytes at the end (codes + scales) under half of fastar's full-precision ones at the same tokens."""
    bench_peers = _bench_peers()
    out = tmp_path / "peers.json"
    bench_peers.main(["--tiny", "--systems", "genkv@fastar", "genkv@fastar-int4", "--frames", "21",
                      "--warmup-frames", "0", "--json", str(out), "--device", "cpu"])
    rows = {row["system"]: row for row in json.loads(out.read_text())["rows"]}
    plain, int4 = rows["genkv@fastar"], rows["genkv@fastar-int4"]
    assert int4["settings"] == "fastar:kv_dtype=int4, eager" and int4["frames"] == plain["frames"] == 21
    assert 0 < int4["kv_bytes"] < 0.5 * plain["kv_bytes"]
    # the committed history alone (no staging buffer, no records): codes and scales against bf16's K/V
    assert plain["kv_history_bytes"] < plain["kv_bytes"] and 0 < int4["kv_history_bytes"] < int4["kv_bytes"]
    assert int4["kv_history_bytes"] < 0.3 * plain["kv_history_bytes"]  # (the tiny model's history is fp32: ~0.19)


def test_a_folder_that_is_no_checkout_is_a_skipped_row_not_a_crash(tmp_path):
    bench_peers = _bench_peers()
    args = bench_peers.argparse.Namespace(self_forcing=tmp_path, frames=33, warmup_frames=0)
    row = bench_peers.run_system("upstream", bench_peers.make_shapes(True), args, bench_peers.torch.device("cpu"))
    assert row["skipped"] == (f"upstream: {tmp_path.resolve()} is not a Self-Forcing checkout "
                              "(no pipeline/causal_inference.py)")
    assert "fps_total" not in row


def _checkout():
    env = os.environ.get("GENKV_SELF_FORCING")
    path = Path(env) if env else EVAL.parent / ".peers" / "Self-Forcing"
    return path if (path / "pipeline" / "causal_inference.py").is_file() else None


@pytest.mark.skipif(_checkout() is None, reason="no upstream Self-Forcing checkout (set GENKV_SELF_FORCING or export "
                    "one to .peers/Self-Forcing as eval/bench_peers.py says); CI has none")
def test_upstream_inference_at_tiny_shapes(tmp_path):
    bench_peers = _bench_peers()
    out = tmp_path / "peers.json"
    bench_peers.main(["--tiny", "--self-forcing", str(_checkout()), "--systems", "upstream", "--frames", "33",
                      "--warmup-frames", "0", "--json", str(out), "--device", "cpu"])
    (upstream,) = json.loads(out.read_text())["rows"]
    assert "skipped" not in upstream, upstream.get("skipped")
    assert upstream["frames"] == 33 and upstream["blocks"] == 3 and len(upstream["block_ms"]) == 3
    assert upstream["fps_total"] == pytest.approx(33 / upstream["seconds_total"])
    assert upstream["ratio_total"] == pytest.approx(1.0)
    assert upstream["decode_s"] > 0 and upstream["fps_steady"] > 0


def test_a_genkv_video_drains_the_device_only_before_and_after_it(tmp_path, monkeypatch):
    """A chunk comes out of stream() as host frames, with the next chunk's work possibly queued behind it (the
    overlapped decode): the timed loop reads the wall clock per chunk and synchronises only at the video's start and
    end, as a user of stream() would run it. @fastar-sdpa (the split read) renders its frames too."""
    bench_peers = _bench_peers()
    drains = []
    original = bench_peers.Clock.now
    monkeypatch.setattr(bench_peers.Clock, "now", lambda self: drains.append(1) or original(self))
    out = tmp_path / "peers.json"
    bench_peers.main(["--tiny", "--systems", "genkv@fastar-sdpa", "--frames", "33", "--warmup-frames", "0",
                      "--json", str(out), "--device", "cpu"])
    row = json.loads(out.read_text())["rows"][0]
    assert row["system"] == "genkv@fastar-sdpa" and row["frames"] == 33 and row["chunks"] >= 3
    assert len(drains) == 2 and len(row["chunk_ms"]) == row["chunks"]


def test_the_torch_quantization_variant_turns_the_row_kernel_off_and_says_so(tmp_path, monkeypatch):
    from genkv.pipelines.self_forcing.pipeline import SelfForcingPipeline

    calls = []
    original = SelfForcingPipeline.enable_fp8

    def recording(self, *args, **kwargs):
        calls.append(kwargs.get("row_kernel"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SelfForcingPipeline, "enable_fp8", recording)
    monkeypatch.setattr(SelfForcingPipeline, "enable_compile", lambda self, *a, **k: self)  # a CPU compile: minutes
    rows = _tiny_rows(tmp_path, "genkv-compile-fp8torch-taehv@fastar", "genkv-compile-fp8-taehv@fastar")
    assert calls == [False, None]  # None: enable_fp8's default, the row kernel on
    assert rows["genkv-compile-fp8torch-taehv@fastar"]["settings"] == (
        "fastar --compile --fp8 (GENKV_FP8_ROW_KERNEL=0) --decoder taehv")
    assert rows["genkv-compile-fp8-taehv@fastar"]["settings"] == "fastar --compile --fp8 --decoder taehv"


def test_the_unfused_variants_turn_the_three_changes_off_and_the_others_on(tmp_path, monkeypatch):
    import genkv.keep.tempcache as tempcache
    from genkv.kernels import pair_scores
    from genkv.pipelines.self_forcing.pipeline import SelfForcingPipeline

    seen = []

    def compile_stub(self, *args, **kwargs):  # what each row runs with, as it would compile (a CPU compile: minutes)
        seen.append((self.fused_blocks, tempcache._PAIR_SCORES_KERNEL, self.taehv.channels_last))
        return self

    monkeypatch.setattr(SelfForcingPipeline, "enable_compile", compile_stub)
    monkeypatch.setattr(tempcache, "_PAIR_SCORES_KERNEL", None)  # as GENKV_PAIR_SCORES_KERNEL=0: the rows decide
    rows = _tiny_rows(tmp_path, "genkv-compile-fp8-taehv@fastar", "genkv-compile-fp8-taehv-unfused@fastar")
    (blocks_on, kernel_on, nhwc_on), (blocks_off, kernel_off, nhwc_off) = seen
    assert blocks_on > 0 and kernel_on is pair_scores and nhwc_on
    assert blocks_off == 0 and kernel_off is None and not nhwc_off
    assert rows["genkv-compile-fp8-taehv-unfused@fastar"]["settings"] == (
        "fastar --compile --fp8 (GENKV_FUSED_ADALN=0 GENKV_PAIR_SCORES_KERNEL=0 GENKV_TAEHV_CHANNELS_LAST=0) "
        "--decoder taehv")
    assert rows["genkv-compile-fp8-taehv@fastar"]["settings"] == "fastar --compile --fp8 --decoder taehv"


def test_a_switch_suffix_turns_that_kernel_off_for_its_row_alone(tmp_path, monkeypatch):
    import genkv.keep.tempcache as tempcache
    import genkv.processors as processors
    from genkv.kernels import pair_scores, qk_norm_rope
    from genkv.pipelines.self_forcing.pipeline import SelfForcingPipeline

    seen = []

    def compile_stub(self, *args, **kwargs):  # what each row runs with, as it would compile (a CPU compile: minutes)
        seen.append((self.fused_blocks > 0, tempcache._PAIR_SCORES_KERNEL is pair_scores, self.taehv.channels_last,
                     processors._NORM_ROPE is qk_norm_rope))
        return self

    monkeypatch.setattr(SelfForcingPipeline, "enable_compile", compile_stub)
    monkeypatch.setattr(tempcache, "_PAIR_SCORES_KERNEL", None)  # as if the environment turned them off: rows decide
    monkeypatch.setattr(processors, "_NORM_ROPE", None)
    systems = ["genkv-compile-fp8-taehv@fastar", "genkv-compile-fp8-taehv@fastar~adaln",
               "genkv-compile-fp8-taehv@fastar~pairs", "genkv-compile-fp8-taehv@fastar~taehv-cl",
               "genkv-compile-fp8-taehv@fastar~normrope~adaln"]
    rows = _tiny_rows(tmp_path, *systems)
    assert seen == [(True, True, True, True), (False, True, True, True), (True, False, True, True),
                    (True, True, False, True), (False, True, True, False)]
    assert rows[systems[-1]]["settings"] == (
        "fastar --compile --fp8 (GENKV_FUSED_ADALN=0 GENKV_FUSED_NORM_ROPE=0) --decoder taehv")
    bench_peers = _bench_peers()
    with pytest.raises(Exception, match="~rope is not a switch"):
        bench_peers.system_name("genkv-compile@fastar~rope")
    with pytest.raises(Exception, match="not a switch of a genkv row"):
        bench_peers.system_name("upstream~adaln")


def test_the_eager_graphs_variant_turns_graphs_on_without_compiling(tmp_path, monkeypatch):
    from genkv.pipelines.self_forcing.pipeline import SelfForcingPipeline

    seen = []
    original = SelfForcingPipeline.stream

    def recording(self, *args, **kwargs):
        seen.append(self.cuda_graphs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SelfForcingPipeline, "stream", recording)
    monkeypatch.setattr(SelfForcingPipeline, "enable_compile",
                        lambda self, *a, **k: pytest.fail("the eager variants must not compile"))
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):  # a CPU: said once, then eagerly
        rows = _tiny_rows(tmp_path, "genkv-graphs@fastar", "genkv@fastar")
    assert seen == [True, False]
    assert rows["genkv-graphs@fastar"]["settings"] == "fastar --cuda-graphs"
    assert rows["genkv-graphs@fastar"]["frames"] == rows["genkv@fastar"]["frames"] == 9


def test_the_fast_eager_variant_turns_on_the_fast_decoder_and_graphs_without_compiling(tmp_path, monkeypatch):
    from genkv.pipelines.self_forcing.pipeline import SelfForcingPipeline

    seen = []
    original = SelfForcingPipeline.stream

    def recording(self, *args, **kwargs):
        seen.append((self.cuda_graphs, [getattr(self, flag) for flag in self.FAST_DECODE_FLAGS]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SelfForcingPipeline, "stream", recording)
    monkeypatch.setattr(SelfForcingPipeline, "enable_compile",
                        lambda self, *a, **k: pytest.fail("the eager variants must not compile"))
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        rows = _tiny_rows(tmp_path, "genkv-graphs-fast@fastar", "genkv-graphs@fastar")
    (graphs_fast, flags_fast), (graphs_plain, flags_plain) = seen
    assert graphs_fast and graphs_plain
    assert all(flags_fast) and not any(flags_plain)
    assert rows["genkv-graphs-fast@fastar"]["settings"] == "fastar --cuda-graphs (fast decode)"
    assert rows["genkv-graphs-fast@fastar"]["frames"] == rows["genkv-graphs@fastar"]["frames"] == 9
