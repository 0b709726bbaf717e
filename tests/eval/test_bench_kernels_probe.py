"""eval/bench_kernels.py probes the Gluon variants in child processes before timing them: a variant whose probe
crashes or hangs is left out with the reason, the variants after it are still probed (a fresh process), and a slow
one may use the time its followers were given."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "eval" / "bench_kernels.py"

# Stands in for the kernel probe: names "crash" and "hang" die and hang as a faulting or deadlocked kernel would.
FAKE_PROBE = """
import sys, time
for name in sys.argv[1:]:
    if name == "crash":
        import atexit
        atexit.register(lambda: print("UserWarning: printed after the traceback", file=sys.stderr))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    if name == "hang":
        time.sleep(120)
    if name == "slow":  # a compile longer than one variant's share: the process has the shares of those after it
        time.sleep(5)
    print("ok", name, flush=True)
"""


def _bench_kernels():
    spec = importlib.util.spec_from_file_location("bench_kernels_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_crashing_or_hanging_variant_is_left_out_and_the_rest_still_probed():
    bench = _bench_kernels()
    names = ["plain", "crash", "after_crash", "hang", "after_hang"]
    broken = bench.probe_variants(names, timeout_s=4, command=[sys.executable, "-c", FAKE_PROBE])
    assert set(broken) == {"crash", "hang"}
    assert broken["crash"].startswith("probe exited 1: RuntimeError: CUDA error: an illegal memory access")
    assert "timed out" in broken["hang"]
    assert bench.probe_variants(["slow", "a", "b"], timeout_s=4, command=[sys.executable, "-c", FAKE_PROBE]) == {}
