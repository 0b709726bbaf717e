"""eval/bench_var.py: the tiny CPU run reports images/s at each method's largest batch (VAR and Infinity, the
authors' ScaleKV/HACK rules), and the GPU largest-batch prediction verifies its guess and respects its caps."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

EVAL = Path(__file__).resolve().parents[2] / "eval"
METHODS = ("full", "scalekv-0.1", "hack-0.3")


def _bench_var():
    """eval/bench_var.py as a module (loaded once)."""
    if "bench_var" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_var", EVAL / "bench_var.py")
        sys.modules["bench_var"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["bench_var"])
    return sys.modules["bench_var"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench_var") / "bench.json"
    threads = torch.get_num_threads()
    assert _bench_var().main(["--tiny", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the tiny run's single thread is given back
    return json.loads(out.read_text())


def test_tiny_run_times_every_method_at_its_largest_batch(tiny_run):
    for model in ("tiny", "tiny-infinity"):
        for method in METHODS:
            key = f"{model}/{method}"
            t = tiny_run["throughput"][key]
            assert t["batch"] == tiny_run["largest_batch"][key] > 0
            assert t["images_per_s"] == pytest.approx(t["batch"] / t["seconds"])
            assert t["images_per_s_vs_full"] > 0
        # full's best images/s is taken over its own rows and its largest batch
        assert tiny_run["throughput"][f"{model}/full"]["images_per_s_vs_full"] <= 1.0
        rows = [r for r in tiny_run["rows"] if r["model"] == model]
        assert {(r["method"], r["batch"]) for r in rows} == {(m, b) for m in METHODS for b in (1, 2)}
        assert all(r["seconds_per_image"] > 0 for r in rows)


def test_tiny_run_uses_the_official_rules_and_compresses_infinity(tiny_run):
    assert tiny_run["methods"]["tiny-infinity/scalekv-0.1"]["mode"] == "official"
    assert tiny_run["methods"]["tiny/hack-0.3"]["mode"] == "official"
    kv = {r["method"]: r["kv_bytes"] for r in tiny_run["rows"] if r["model"] == "tiny-infinity" and r["batch"] == 2}
    assert kv["scalekv-0.1"] < kv["hack-0.3"] < kv["full"]


class _FakeSample:
    decode_batch = 8


def _rows(batches=(1, 8)):
    """Sampling peaks 10 + 2b, held at decode 10 + b, decoding adds 5 (at 8 images)."""
    return [{"batch": b, "seconds_per_image": 0.01, "pre_decode_peak_bytes": 10 + 2 * b,
             "decode_start_bytes": 10 + b, "peak_memory_bytes": 10 + b + 5 * min(b, 8) / 8} for b in batches]


@pytest.fixture
def fits_up_to(monkeypatch):
    bench_var = _bench_var()
    tried: list[int] = []

    def fake_try(sample, batch, device):
        tried.append(batch)
        return (0.01 * batch, 0) if batch <= 36 else None

    monkeypatch.setattr(bench_var, "try_run", fake_try)
    return bench_var, tried


def test_prediction_models_sampling_and_decoding_apart():
    bench_var = _bench_var()
    assert bench_var.predict_batch(_rows(), 110, 8) == 50  # sampling bound (110 - 10) / 2; decoding allows 95
    # a decoder that holds 40 bytes at 8 images binds first: (100 - 10 - 40) / 1, where sampling allows 90;
    # measured at 4 images, its activations count twice (decode_batch 8)
    rows = [{**r, "pre_decode_peak_bytes": 10 + r["batch"], "peak_memory_bytes": 50 + r["batch"]} for r in _rows()]
    assert bench_var.predict_batch(rows, 100, 8) == 50
    rows = [{**r, "pre_decode_peak_bytes": 10 + r["batch"], "peak_memory_bytes": 30 + r["batch"]}
            for r in _rows((1, 4))]
    assert bench_var.predict_batch(rows, 100, 8) == 50
    assert bench_var.predict_batch(_rows((1,)), 110, 8) is None  # one batch is not a line


def test_predicted_batch_is_verified_and_stepped_down(fits_up_to):
    bench_var, tried = fits_up_to
    found = bench_var.predicted_largest(_FakeSample(), None, _rows(), 110 / 0.95, 1024, seconds_left=100)
    assert found["predicted"] == 50 and found["capped"] is None
    assert found["batch"] == 36 and tried == [50, 45, 40, 36]  # 10% lower at each out-of-memory


def test_predicted_batch_respects_the_limit_and_the_time_left(fits_up_to):
    bench_var, tried = fits_up_to
    found = bench_var.predicted_largest(_FakeSample(), None, _rows(), 110 / 0.95, 16, seconds_left=100)
    assert (found["batch"], found["capped"]) == (16, "limit")
    # 0.01 s per image, a verification and a timed run: 0.4 s leave 20 images
    found = bench_var.predicted_largest(_FakeSample(), None, _rows(), 110 / 0.95, 1024, seconds_left=0.4)
    assert (found["batch"], found["capped"]) == (20, "time")


def test_prediction_from_one_batch_starts_at_the_weights():
    """When batch 8 ran out of memory, batch 1 and the memory held before sampling (10) still give the line."""
    rows = [{**r, "base_memory_bytes": 10} for r in _rows((1,))] + [{"batch": 8, "oom": True}]
    assert _bench_var().predict_batch(rows, 110, 8) == 50
