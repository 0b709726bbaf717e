"""A block split over two processes (``torchrun``, gloo on the CPU) gives the one-process rollout exactly (issue 25).

Each process holds half of the tiny transformer's blocks (the other half on the ``meta`` device) and only those
blocks' caches; the hidden states cross by send/recv. The reference is the same pipeline in one process.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from genkv.pipelines.self_forcing.block_split import even_boundaries
from genkv.testing import tiny_self_forcing_pipeline

WORKER = textwrap.dedent('''
    import sys
    import numpy as np
    import torch
    import torch.distributed as dist
    import genkv
    from genkv.pipelines.self_forcing.block_split import apply_block_split, is_decoding_stage
    from genkv.testing import tiny_self_forcing_pipeline

    method, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)

    def run(kind, split):
        pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=0), method)
        if split:
            apply_block_split(pipe)
            kind = "np" if is_decoding_stage(pipe) else "latent"
        chunks = list(pipe.stream("a red circle moving left", num_frames=33, output_type=kind,
                                  generator=torch.Generator().manual_seed(3)))
        return pipe, np.concatenate([np.asarray(c) for c in chunks], axis=0 if kind == "np" else 2)

    if mode == "reference":  # one process, no split: the same pipeline, threads and seed
        np.save(f"{out}/reference_frames.npy", run("np", False)[1])
        np.save(f"{out}/reference_latents.npy", run("latent", False)[1])
    else:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        pipe, result = run(None, True)
        owned = [i for i, b in enumerate(pipe.transformer.blocks) if next(b.parameters()).device.type != "meta"]
        cached = [i for i, layer in enumerate(genkv.get_store(pipe).caches["cond"]) if layer.nbytes() > 0]
        np.save(f"{out}/rank{rank}.npy", result)
        np.save(f"{out}/rank{rank}_owned.npy", np.array(owned))
        np.save(f"{out}/rank{rank}_cached.npy", np.array(cached))
        dist.destroy_process_group()
''')


def _run(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("method", ["full", "rolling", "fastar"])
def test_two_stages_give_the_one_process_rollout(tmp_path, method):
    # Both sides run in fresh processes with one thread each, so the reference's float reductions are the same
    # (a reference in the test process would depend on what earlier tests left set).
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), method, str(tmp_path),
          "split"])
    _run([str(script), method, str(tmp_path), "reference"])
    frames, latents = np.load(tmp_path / "reference_frames.npy"), np.load(tmp_path / "reference_latents.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "rank1.npy"), frames)  # the last stage decodes
    np.testing.assert_array_equal(np.load(tmp_path / "rank0.npy"), latents)  # the first gets the same latents
    blocks = len(tiny_self_forcing_pipeline(seed=0).transformer.blocks)
    half = even_boundaries(blocks, 2)[1]
    assert np.load(tmp_path / "rank0_owned.npy").tolist() == list(range(half))
    assert np.load(tmp_path / "rank1_owned.npy").tolist() == list(range(half, blocks))
    # a stage holds only its own layers' caches (fastar's one stacked allocation too)
    assert np.load(tmp_path / "rank0_cached.npy").tolist() == list(range(half))
    assert np.load(tmp_path / "rank1_cached.npy").tolist() == list(range(half, blocks))


def test_boundaries_and_refusals():
    from genkv.pipelines.self_forcing.block_split import apply_block_split

    assert even_boundaries(30, 2) == (0, 15, 30) and even_boundaries(40, 3) == (0, 14, 27, 40)
    with pytest.raises(ValueError, match="cannot split 1 transformer blocks into 2 stages"):
        even_boundaries(1, 2)
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        apply_block_split(tiny_self_forcing_pipeline(seed=0))
