"""eval/bench_rollout.py --switch-every on the tiny random model: the switches really run through the pipeline's
prompt-switch path, with the asked --recache mode, and the JSON counts them."""

import json
from pathlib import Path

import pytest

from . import import_eval_script

# 69 frames = chunks of 9, 12, 12, 12, 12, 12 frames; a switch every 24 frames lands on the chunks that start at
# frames 21 (latent frame 6, holding output frames 21-24) and 45 (latent 12); 72 is past the end.
ARGS = ["--model", "tiny", "--device", "cpu", "--frames", "69", "--switch-every", "24", "--no-mp4",
        "--methods", "rolling:window_frames=6,sink_frames=1"]


def _bench_rollout():
    return import_eval_script("bench_rollout")


@pytest.fixture
def switch_calls(monkeypatch):
    """Every call of the pipeline's own switch, recorded at the class: (mode, latent frames it re-cached)."""
    from genkv.pipelines import SelfForcingPipeline

    calls: list[tuple] = []
    original = SelfForcingPipeline._switch_prompt

    def recording(self, store, embeds, negative_embeds, mode, *args, **kwargs):
        self.last_recached_frames = None
        original(self, store, embeds, negative_embeds, mode, *args, **kwargs)
        calls.append((mode, self.last_recached_frames))

    monkeypatch.setattr(SelfForcingPipeline, "_switch_prompt", recording)
    return calls


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    assert _bench_rollout().main([*ARGS, *extra, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert len(results["runs"]) == 1
    return results["runs"][0]


def test_switches_with_recache_on_run_the_recache(tmp_path, switch_calls):
    run = _run(tmp_path)  # --recache on is the default
    assert run["switch_every"] == 24 and run["switch_frames"] == [21, 45]
    assert run["switches"] == 2 and run["recaches"] == 2 and run["switch_modes"] == [True, True]
    # the pipeline itself switched twice and re-committed held frames each time (the sink + window at most)
    assert [mode for mode, _ in switch_calls] == [True, True]
    assert all(frames for _, frames in switch_calls)
    assert run["recached_latent_frames"] == [len(frames) for _, frames in switch_calls]
    assert max(run["recached_latent_frames"]) <= 1 + 6
    # each switch is charged to exactly one chunk interval, and the cost is measured
    assert sum(chunk["switches"] for chunk in run["chunks"]) == 2
    assert isinstance(run["switch_chunk_median_s"], float) and isinstance(run["switch_cost_s"], float)
    assert run["frames"] == 69


def test_recache_off_switches_without_recaching(tmp_path, switch_calls):
    run = _run(tmp_path, "--recache", "off")
    assert run["switches"] == 2 and run["recaches"] == 0 and run["recached_latent_frames"] == [0, 0]
    assert [mode for mode, frames in switch_calls] == [False, False]
    assert all(frames is None for _, frames in switch_calls)


def test_switch_every_shorter_than_a_chunk_is_refused():
    with pytest.raises(SystemExit, match="at least a chunk's 12 frames"):
        _bench_rollout().main([*ARGS[:6], "--switch-every", "5", "--no-mp4"])


def test_the_json_records_the_kernel_switches_and_a_contradiction_does_not_stop_the_run(monkeypatch):
    """bench_rollout writes what its bf16 reads on Hopper take; switches that contradict each other (the Gluon
    kernel's ping-pong asked for with warp specialisation off) are recorded, not raised: the run may never read
    through that kernel (a CPU, another GPU, GENKV_HOPPER_KERNEL=0)."""
    from genkv.kernels import block_sparse, block_sparse_hopper

    bench = _bench_rollout()
    monkeypatch.setenv("GENKV_HOPPER_WS", "0")
    monkeypatch.setenv("GENKV_HOPPER_PINGPONG", "1")
    monkeypatch.setenv("GENKV_HOPPER_KERNEL", "0")
    state = bench.hopper_kernel_state(block_sparse, block_sparse_hopper)
    assert state["variant"].startswith("error: pingpong") and state["switched_on"] is False
    assert state["triton_builds_it"] == block_sparse_hopper.gluon_supported()
    monkeypatch.delenv("GENKV_HOPPER_WS")
    monkeypatch.delenv("GENKV_HOPPER_KERNEL")
    assert bench.hopper_kernel_state(block_sparse, block_sparse_hopper)["variant"] == "pingpong"
