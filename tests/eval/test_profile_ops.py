"""eval/profile_ops.py's copy accounting: a device copy counts the same whether the profiler reports it as a CUPTI
copy record or as the kernel a CUDA graph runs it as, and host ops or fused Inductor kernels named "copy" do not
count."""

from dataclasses import dataclass

import torch

from . import import_eval_script


def _profile_ops():
    return import_eval_script("profile_ops")


@dataclass
class _Row:
    key: str
    count: int
    self_device_time_total: float  # microseconds, as torch.profiler reports
    device_type: torch.autograd.DeviceType = torch.autograd.DeviceType.CUDA


class _Profile:
    def __init__(self, rows):
        self.rows = rows

    def key_averages(self):
        return self.rows


def test_graph_copy_kernels_and_copy_records_count_alike_and_other_rows_do_not():
    profile_ops = _profile_ops()
    others = [
        _Row("aten::copy_", 600, 10_000.0, torch.autograd.DeviceType.CPU),  # a host op: its device time is its kernels'
        _Row("triton_poi_fused__to_copy_add_mul_split_view_7", 450, 8_000.0),
        _Row("_block_sparse_fwd", 450, 177_000.0),
        _Row("Memset (Device)", 12, 50.0),
    ]
    # The same 300 copies (2.8 ms): once reported as copy records, once as the graph's copy kernels.
    as_records = _Profile([_Row("Memcpy DtoD (Device -> Device)", 441 + 300, 28_300.0 + 2_800.0), *others])
    as_kernels = _Profile([_Row("Memcpy DtoD (Device -> Device)", 441, 28_300.0), _Row("memcpy128", 200, 2_000.0),
                           _Row("memcpy32_post", 100, 800.0), *others])
    for profile in (as_records, as_kernels):
        calls, ms = profile_ops.device_copies(profile)
        assert calls == 741
        assert abs(ms - 31.1) < 1e-9
