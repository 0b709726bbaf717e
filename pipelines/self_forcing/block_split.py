"""One stream on several GPUs: the transformer's blocks split into pipeline stages (``torch.distributed``).

Every process (one per GPU, started by ``torchrun``) runs the same pipeline loop with the same inputs and seed:
the embeddings, the scheduler and the noise are cheap and computed everywhere, so no process waits for them. Only
the blocks are split: stage ``s`` runs blocks ``[b_s, b_{s+1})`` and holds only their weights and their KV
caches (the other blocks' weights go to the ``meta`` device; their attention processors never run, so their caches
are never filled). The hidden states cross between stages by point-to-point ``send``/``recv``, and the last stage
sends the final hidden states back to every other stage, so all of them finish the forward and the step with the
same tensor (bit for bit: it is the same tensor, sent).

What overlaps and what cannot: a chunk's next denoising step needs its previous step's output through every
stage, and the next chunk's first step needs this chunk's clean commit in every layer, so in one stream the stages
take turns (a split buys memory, for a model larger than one GPU, not speed). What can overlap is the decode:
:func:`apply_block_split` names the stage that decodes (the last by default), and the others ask for latents only
(``output_type="latent"``), so the first stage starts the next chunk while the last decodes.

From the command line: ``genkv render prompts.txt --pipeline-gpus 2`` starts the processes itself (through
``torch.distributed``'s launcher; see :mod:`genkv.cli.stages`).

Example (two processes on a CPU; ``torchrun --nproc-per-node 2 script.py`` on two GPUs)::

    import torch.distributed as dist
    from genkv.testing import tiny_self_forcing_pipeline
    dist.init_process_group("gloo")
    pipe = apply_block_split(tiny_self_forcing_pipeline(seed=0))
    frames = list(pipe.stream("a red circle", num_frames=21,
                              output_type="np" if is_decoding_stage(pipe) else "latent"))
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockSplit:
    """This process's part of a split: its stage, the stage boundaries (block indices) and the decoding stage."""

    stage: int
    boundaries: tuple[int, ...]  # b_0 = 0 < b_1 < ... < b_S = number of blocks
    decode_stage: int

    @property
    def stages(self) -> int:
        return len(self.boundaries) - 1

    def owns(self, block: int) -> bool:
        return self.boundaries[self.stage] <= block < self.boundaries[self.stage + 1]


def even_boundaries(blocks: int, stages: int) -> tuple[int, ...]:
    """Stage boundaries that give each stage ``blocks // stages`` blocks (the first ones one more if uneven).

    Example:
        >>> even_boundaries(30, 2), even_boundaries(5, 2)
        ((0, 15, 30), (0, 3, 5))
    """
    if stages < 1 or blocks < stages:
        raise ValueError(f"cannot split {blocks} transformer blocks into {stages} stages")
    per, extra = divmod(blocks, stages)
    bounds = [0]
    for stage in range(stages):
        bounds.append(bounds[-1] + per + (1 if stage < extra else 0))
    return tuple(bounds)


def apply_block_split(pipe, rank: int | None = None, world: int | None = None,
                      boundaries: tuple[int, ...] | None = None, decode_stage: int | None = None):
    """Split ``pipe.transformer``'s blocks over the processes of the default ``torch.distributed`` group (stage =
    rank), in place; returns ``pipe``. The process group must be up (``torchrun`` + ``init_process_group``), one
    process per stage, each calling this on its own copy of the pipeline (on its own device) and then running the
    same ``stream`` / ``__call__`` with the same arguments. ``boundaries`` defaults to :func:`even_boundaries`.
    Not with ``enable_compile`` / CUDA graphs (a one-line error): the hand-over between stages is eager.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("apply_block_split needs torch.distributed initialised (run under torchrun and call "
                           "torch.distributed.init_process_group first)")
    rank = dist.get_rank() if rank is None else rank
    world = dist.get_world_size() if world is None else world
    if world < 2:
        raise ValueError("a block split needs at least 2 processes (one per GPU); with one GPU leave it out")
    if getattr(pipe, "cuda_graphs", False):
        raise ValueError("a block split runs eagerly: turn CUDA graphs off (no --compile) with --pipeline-gpus")
    blocks = pipe.transformer.blocks
    boundaries = tuple(boundaries) if boundaries is not None else even_boundaries(len(blocks), world)
    if (len(boundaries) != world + 1 or boundaries[0] != 0 or boundaries[-1] != len(blocks)
            or any(a >= b for a, b in zip(boundaries, boundaries[1:]))):
        raise ValueError(f"boundaries {boundaries} must rise from 0 to {len(blocks)} in {world} stages")
    split = BlockSplit(rank, boundaries, world - 1 if decode_stage is None else decode_stage)
    # the KV caches of this stage's layers only (a stacked cache allocates just those; see KVCacheStore)
    pipe.transformer.genkv_run_layers = range(boundaries[rank], boundaries[rank + 1])  # read by apply_genkv
    import genkv

    try:  # genkv applied before the split: its store learns now
        genkv.get_store(pipe).run_layers = pipe.transformer.genkv_run_layers
    except ValueError:
        pass
    for index, block in enumerate(blocks):
        if split.owns(index):
            role = "run"
        else:
            block.to("meta")  # this stage never runs it: its weights are another stage's
            role = "skip"
        block.forward = types.MethodType(_stage_forward(split, index, role, block.forward), block)
    pipe.block_split = split
    return pipe


def move_stage(pipe, device: "str | torch.device"):
    """``pipe.to(device)`` for a split pipeline: every tensor moves except the ``meta`` ones (the blocks another
    stage holds), so a process loads the model on the CPU, splits it, and only its stage reaches its GPU (a model
    larger than one GPU never has to fit on one). Returns ``pipe``."""
    device = torch.device(device)

    def move(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.device.type == "meta" else tensor.to(device)

    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module._apply(move)  # Module.to without the meta tensors, which have no data to copy
    return pipe


def is_decoding_stage(pipe) -> bool:
    """Whether this process decodes (the others ask ``stream`` for latents only)."""
    split = getattr(pipe, "block_split", None)
    return split is None or split.stage == split.decode_stage


def _stage_forward(split: BlockSplit, index: int, role: str, original):
    import torch.distributed as dist

    last_block = split.boundaries[-1] - 1
    first_own, end_own = split.boundaries[split.stage], split.boundaries[split.stage + 1]
    last_stage = split.stages - 1

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if role == "run":
            if index == first_own and split.stage > 0:  # the previous stage's output, not this process's input
                received = torch.empty_like(hidden_states)
                dist.recv(received, src=split.stage - 1)
                hidden_states = received
            out = original(hidden_states, *args, **kwargs)
            if index == end_own - 1:
                if split.stage < last_stage:
                    dist.send(out.contiguous(), dst=split.stage + 1)
                else:  # the final hidden states, to every other stage: all finish the forward alike
                    for other in range(last_stage):
                        dist.send(out.contiguous(), dst=other)
            return out
        if index == last_block:  # a stage before the last: the final hidden states come from the last stage
            final = torch.empty_like(hidden_states)
            dist.recv(final, src=last_stage)
            return final
        return hidden_states  # another stage's block: nothing to do here

    return forward
