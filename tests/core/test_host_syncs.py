"""No host synchronisation inside the chunk loop: a chunk's forwards and its commit never read a device value.

On a GPU every host read of a tensor value (``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``, ...) waits for
all queued work, so the host cannot run ahead and launch the next chunk or the decode. On the CPU such reads cost
nothing, so the property is checked by recording every one made from genkv's code during a steady chunk and
allowing only reads of tensors that live on the CPU on every device: the processors' identifiers (kept on the
CPU so compiled graphs can take them as inputs), the scheduler's sigmas, and the CPU-only gather kernel path.
"""

import collections
import os
import traceback

import pytest
import torch

import genkv
from genkv.testing import tiny_self_forcing_pipeline

_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")
# (file, function): host reads that stay on the host on a GPU too
_ALLOWED = {
    ("genkv/processors.py", "_processor"),  # CPU identifier tensor
    ("pipelines/self_forcing/scheduler.py", "next_sample"),  # the scheduler's sigmas are CPU tensors
    ("kernels/gather.py", "block_sparse_attention_gather"),  # the CPU kernel path (CUDA runs Triton)
}


def _package_roots() -> dict[str, str]:
    """Where genkv's three rooms live on disk, wherever the checkout or install is (a checkout folder named
    ``genkv`` holds ``genkv/genkv/...`` and ``genkv/pipelines/...``; an install holds ``genkv/pipelines/...``)."""
    import genkv.kernels
    import genkv.pipelines

    def folder(module) -> str:
        return os.path.dirname(os.path.abspath(module.__file__)) + os.sep

    return {folder(genkv.pipelines): "pipelines/", folder(genkv.kernels): "kernels/", folder(genkv): "genkv/"}


def _ours(filename: str, roots: dict[str, str]) -> str | None:
    """``filename`` as a room-relative name (``pipelines/self_forcing/scheduler.py``), None outside genkv.
    The longest matching root wins: an install nests ``pipelines/`` inside ``genkv/``."""
    path = os.path.abspath(filename)
    for root in sorted(roots, key=len, reverse=True):
        if path.startswith(root):
            return roots[root] + path[len(root):].replace(os.sep, "/")
    return None


def _host_reads(fn) -> collections.Counter:
    sites: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in _READS}
    roots = _package_roots()

    def recording(name, original):
        def read(self, *args, **kwargs):
            ours = [(path, f.name) for f in traceback.extract_stack()[:-1]
                    if (path := _ours(f.filename, roots)) is not None]
            if ours:
                path, function = ours[-1]
                sites[(path, function, name)] += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, recording(name, original))
    try:
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return sites


@pytest.mark.parametrize("method, settings", [
    ("fastar", dict(top_k=2, prompt_top_k=2, block_m=16, block_n=16)),
    ("tempcache", {}),
    ("rolling", dict(window_frames=6)),
])
def test_a_steady_chunk_reads_no_device_value_on_the_host(method, settings):
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=3), method, **settings)
    rollout = pipe.rollout(pipe.encode_prompt("a red circle"), 15, 32, 32, generator=torch.Generator().manual_seed(0))
    next(rollout)
    next(rollout)  # past the first chunks: buffers allocated, budgets reached
    sites = _host_reads(lambda: next(rollout))  # 4 denoising forwards, the clean pass, the commit
    rollout.close()
    assert sites, "the probe saw no read at all: it is not wired to the code it checks"
    offending = {site: n for site, n in sites.items() if site[:2] not in _ALLOWED}
    assert not offending, f"host reads of tensor values inside the chunk loop: {offending}"
