"""``genkv render --pipeline-gpus N``: one video's transformer blocks split over N processes (one per GPU).

The command the user typed starts the stages itself, through ``torch.distributed``'s own launcher (the engine
behind ``torchrun``, with a local rendezvous), as N copies of the same ``genkv render`` command line; each copy
sees ``WORLD_SIZE=N`` and becomes stage ``RANK``. A command already started by ``torchrun --nproc-per-node N``
skips the launch. Every stage loads the model on the CPU, keeps its share of the blocks
(:func:`~genkv.pipelines.self_forcing.block_split.apply_block_split`) and moves only that share to its GPU; the
last stage decodes, writes the mp4 and the JSON summary and prints the progress, the others run the same loop for
latents only and print nothing but their own errors.

What users get over one GPU is memory (each GPU holds half the weights and half the KV cache), not speed: in one
stream a denoising step needs the previous step through every block, so the stages take turns (see
:mod:`genkv.pipelines.self_forcing.block_split`); the decode on the last stage overlaps the first stage's next
chunk.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from typing import TYPE_CHECKING

from .errors import CLIError

if TYPE_CHECKING:
    import torch

    from .render import RenderOptions


def launched_world() -> int:
    """How many processes a launcher (``torchrun``, or :func:`launch`) started this one among; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_pipeline_gpus(options: "RenderOptions", device: "torch.device") -> None:
    """--pipeline-gpus against the other options and the machine, before anything is loaded or launched."""
    stages = options.pipeline_gpus
    if stages is None:
        return
    if stages < 2:
        raise CLIError(f"--pipeline-gpus {stages}: a split needs at least 2 GPUs (one per stage); with one GPU "
                       "drop --pipeline-gpus")
    if options.compile or options.cuda_graphs:
        raise CLIError("--pipeline-gpus runs eagerly (the hand-over between stages is not in a CUDA graph); drop "
                       "--compile / --cuda-graphs")
    if options.vae_device is not None:
        raise CLIError("--pipeline-gpus decodes on the last stage's GPU; drop --vae-device")
    import torch

    if device.type == "cuda":
        if device.index is not None:
            raise CLIError(f"--device {device} with --pipeline-gpus: stage s runs on cuda:s; pass --device cuda (or "
                           "auto) and pick the GPUs with CUDA_VISIBLE_DEVICES")
        visible = torch.cuda.device_count()
        if visible < stages:
            fix = "drop --pipeline-gpus" if visible < 2 else f"ask for at most {visible}"
            raise CLIError(f"--pipeline-gpus {stages}: only {visible} CUDA device(s) visible, and each stage needs "
                           f"its own; {fix}")
    elif options.device == "auto":
        raise CLIError(f"--pipeline-gpus {stages}: no CUDA device is visible here; drop --pipeline-gpus, or pass "
                       "--device cpu to run the stages as CPU processes (for testing)")
    world = launched_world()
    if world > 1 and world != stages:
        raise CLIError(f"--pipeline-gpus {stages} under a launcher of {world} processes; start {stages} processes "
                       f"(torchrun --nproc-per-node {stages}) or let genkv start them (run it without torchrun)")


def launch(options: "RenderOptions", argv: list[str]) -> int:
    """Start ``options.pipeline_gpus`` copies of this ``genkv render`` command as stages and wait for them: the
    exit code is the decoding stage's (0, 130 interrupted, 143 terminated, 1 failed), or, where the launcher
    stopped it because another stage failed, that stage's.
    The launcher's own log lines are kept quiet: the stages print what the user needs."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.Logger.manager.loggerDict):  # each of its loggers has its own level set; a
        if name.startswith("torch.distributed.elastic"):  # stage's failure is logged as an error: the stage said it
            logging.getLogger(name).setLevel(logging.CRITICAL)
    stages = options.pipeline_gpus
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=stages, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    try:
        elastic_launch(config, sys.executable)("-m", "genkv.cli.main", *argv)
    except SignalException as stop:  # Ctrl-C / SIGTERM: the launcher stopped the stages, which kept their frames
        return 128 + int(stop.sigval)
    except ChildFailedError as failed:
        codes = {rank: failure.exitcode for rank, failure in failed.failures.items()}
        code = codes.get(stages - 1)  # the decoding stage's
        if code is None or code < 0:  # it ran on, or the launcher stopped it (SIGTERM: -15) after another failed
            code = next((c for c in codes.values() if c > 0), code if code is not None else -15)
        return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it
    return 0


def init_stage(device: "torch.device") -> "torch.device":
    """This stage's process group (NCCL between GPUs, gloo on CPUs) and device: ``cuda:LOCAL_RANK`` on GPUs."""
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Both backends, each for its tensors: CPU stages on a machine with CUDA still hand over by gloo (one
        # backend named after the device type would leave CPU tensors without one there).
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return device


def gather_stage_memory(peak_bytes: int, kv_bytes: int) -> tuple[list[int], list[int]]:
    """Every stage's peak memory and KV bytes, in stage order (called by every stage after each video)."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (int(peak_bytes), int(kv_bytes)))
    return [peak for peak, _ in gathered], [kv for _, kv in gathered]


def close_stage() -> None:
    """Leave the stages' process group (after every video finished on every stage)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
