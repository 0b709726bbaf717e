"""Distil the sprite model into Self-Forcing's regime: 4 denoising steps, no guidance (issue 24).

    python eval/distill_tiny.py --teacher runs/v6 --out /tmp/d --clips 3072 --minutes 4 --tar $OUT/d.tar   # one GPU
    python eval/distill_tiny.py --teacher-steps 16 --out /tmp/d --smoke   # seconds on a CPU (plumbing check)

``sprites-tiny`` v7 is this script's student of v6 (16 steps of DPM-Solver++(2M), guidance 4.5; v6 is the folder
``genkv/assets/sprites-tiny`` at commit c36a601: ``git archive c36a601 genkv/assets/sprites-tiny | tar -x -C
runs/v6 --strip-components=3``), so the bundled model is a 4-step model: distil from v6, or pass
``--teacher-steps 16``, which re-samples a teacher at 16 steps with its own sampler and guidance (for v7 Euler
without guidance: a plumbing check, not v6's trajectory).

Trajectory regression, the first stage of CausVid's and Self-Forcing's own distillations (their DMD stage is not
done here):

1. The teacher, with its own sampler (v6: DPM-Solver++(2M), 16 steps, guidance 4.5), renders
   ``--clips`` videos of grammar prompts (``genkv.data``: one or two sprites) in batches through the cached
   pipeline, chunk by chunk. Each chunk's sample is recorded at the student's steps, timesteps 1000 / 750 / 500 /
   250 (steps 0, 4, 8, 12 of the teacher's 16: the same warped noise levels), with its clean latents: points on
   the teacher's own ODE trajectory, and where it ends.
2. The student, a copy of the teacher's transformer (text encoder and VAE frozen), learns to jump from the
   recorded sample at step k straight to the teacher's clean chunk: loss on ``x0 = x - sigma * flow``, with the
   teacher's clean chunks before it as context under the block-causal mask and RoPE positions of the cached
   rollout (``train_tiny``'s teacher forcing). The target is the guided result, so the student runs one forward
   per step, not two.
3. Saved with a 4-step Euler scheduler (an Euler step from the student's x0 lands back on the trajectory it was
   trained on) and guidance 1; training log and a tar as ``train_tiny``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny import AUTOCAST, CHUNK, BlockCausalSelfAttn, block_of_frame, end_training, finish  # noqa: E402

STUDENT_STEPS = (1000, 750, 500, 250)  # Self-Forcing's denoising_step_list


def load_teacher(source: str, device: torch.device):
    """A saved SelfForcingPipeline (folder, tar, or a bundled model's name) in float32 on ``device``."""
    from genkv.pipelines import SelfForcingPipeline
    from genkv.zoo import SHIPPED, shipped_model_path
    from train_tiny import unpack

    path = shipped_model_path(source) if source in SHIPPED and not Path(source).exists() else Path(source)
    folder = unpack(path, "model_index.json", "--teacher")
    return SelfForcingPipeline.from_pretrained(folder, torch_dtype=torch.float32).to(device)


def student_step_indices(teacher_steps: list[int]) -> list[int]:
    """Where the student's timesteps sit in the teacher's list (both warped by the same shift)."""
    missing = [t for t in STUDENT_STEPS if t not in teacher_steps]
    if missing:
        raise SystemExit(f"the teacher's denoising_step_list {teacher_steps} lacks the student's steps {missing}")
    if teacher_steps.index(STUDENT_STEPS[-1]) == len(teacher_steps) - 1:
        # The last step returns its x0 without a next sample, so nothing would be recorded there.
        raise SystemExit(f"the teacher's denoising_step_list {teacher_steps} ends at the student's last step "
                         f"{STUDENT_STEPS[-1]}: it is a 4-step model already (sprites-tiny v7 is v6's student: distil "
                         f"from v6, the folder at commit c36a601, or pass --teacher-steps 16)")
    return [teacher_steps.index(t) for t in STUDENT_STEPS]


def teacher_trajectories(pipe, prompts: list[str], frames: int, batch: int, seed: int, record: list[int]):
    """For every prompt: the teacher's clean latents (N, C, T, h, w) and each chunk's sample at the teacher steps
    ``record`` (N, chunks, len(record), C, CHUNK, h, w), in float16 on the pipeline's device."""
    sched = pipe.scheduler
    original = sched.next_sample
    states: list[torch.Tensor] = []  # this batch: one (B, C, CHUNK, h, w) per recorded step, chunk after chunk

    def recording_next_sample(sample, flow, x0, step, noise):
        if step in record:
            states.append(sample.detach().to(torch.float16))
        return original(sample, flow, x0, step, noise)

    sched.next_sample = recording_next_sample
    all_latents, all_states = [], []
    try:
        for first in range(0, len(prompts), batch):
            states.clear()
            part = prompts[first : first + batch]
            chunks = list(pipe.stream(part, num_frames=frames, output_type="latent",
                                      generator=torch.Generator(device=pipe.device).manual_seed(seed + first)))
            latents = torch.cat(chunks, dim=2)
            n_chunks = latents.shape[2] // CHUNK
            if len(states) != n_chunks * len(record):
                raise RuntimeError(f"recorded {len(states)} samples for {n_chunks} chunks x {len(record)} steps")
            per_chunk = torch.stack(states).view(n_chunks, len(record), *states[0].shape)  # (chunks, K, B, ...)
            all_latents.append(latents.to(torch.float16))
            all_states.append(per_chunk.permute(2, 0, 1, 3, 4, 5, 6).contiguous())
            print(f"teacher: {first + len(part)}/{len(prompts)} clips", flush=True)
    finally:
        sched.next_sample = original
    return torch.cat(all_latents), torch.cat(all_states)


def distill(student, pipe, prompts: list[str], latents: torch.Tensor, states: torch.Tensor, args, log: list) -> None:
    """Train ``student`` in place to map each recorded sample to the teacher's clean chunk (see the docstring)."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    device = latents.device
    holder: dict = {"mask": None}
    for block in student.blocks:
        block.attn1.set_processor(BlockCausalSelfAttn(WanAttnProcessor(), holder))
    with torch.no_grad():
        embeds_all = pipe.encode_prompt(prompts, device=device, dtype=torch.float32)
    record = student_step_indices([int(t) for t in pipe.scheduler.config.denoising_step_list])
    sigmas = pipe.scheduler.sigmas[record].to(device)
    timesteps = pipe.scheduler.timesteps[record].to(device)
    params = list(student.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    averaged = [p.detach().float().clone() for p in params] if args.ema else None
    g = torch.Generator().manual_seed(args.seed)
    n_chunks, tpf = states.shape[1], (latents.shape[3] // 2) * (latents.shape[4] // 2)
    deadline, start, step = time.time() + args.minutes * 60, time.time(), 0
    student.train()
    while (time.time() < deadline or args.minutes <= 0) and (args.max_steps is None or step < args.max_steps):
        chunk = int(torch.randint(0, n_chunks, (1,), generator=g))
        idx = torch.randint(0, len(prompts), (args.batch,), generator=g).to(device)
        k = torch.randint(0, len(record), (args.batch,), generator=g).to(device)
        context = latents[idx, :, : chunk * CHUNK].float()
        noisy = states[idx, chunk, k].float()  # (B, C, CHUNK, h, w)
        target = latents[idx, :, chunk * CHUNK : (chunk + 1) * CHUNK].float()
        x = torch.cat([context, noisy], dim=2)
        frames = x.shape[2]
        chunk_of_token = block_of_frame(frames, 0).to(device).repeat_interleave(tpf)
        holder["mask"] = (chunk_of_token[None, :] <= chunk_of_token[:, None])[None, None]
        timestep = torch.zeros(args.batch, frames * tpf, device=device)
        timestep[:, (frames - CHUNK) * tpf :] = timesteps[k].view(-1, 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=AUTOCAST):
            flow = student(x, timestep, embeds_all[idx], return_dict=False)[0][:, :, -CHUNK:]
        x0 = noisy - sigmas[k].view(-1, 1, 1, 1, 1) * flow.float()
        loss = F.mse_loss(x0, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if averaged is not None:
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(averaged, [p.detach().float() for p in params], 1 - decay)
        if step % 50 == 0 or (args.max_steps is not None and step == args.max_steps - 1):
            log.append({"phase": "distill", "step": step, "time": time.time(), "loss": loss.item(), "chunk": chunk})
            print(f"distill step {step:6d} loss {loss.item():.4f} (chunk {chunk})", flush=True)
        step += 1
    log.append({"phase": "distill_done", "steps": step, "seconds": time.time() - start})
    end_training(student, params, averaged)


def student_from(pipe):
    """A trainable copy of the teacher's transformer: diffusers' own block forward and attention processors back.
    The pipeline patches its blocks with the fused inference kernels (CUDA, half precision, autocast included),
    which have no backward, and its processors read and write the rollout's cache; the teacher keeps both. The
    teacher's last rollout cache (GBs after a batch of 256 clips) is dropped first, not copied: every rollout
    starts by resetting it anyway."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from genkv.api import get_store
    from genkv.pipelines.self_forcing.fused_block import remove_fused_blocks

    get_store(pipe.transformer).reset()
    student = copy.deepcopy(pipe.transformer)
    remove_fused_blocks(student)
    for block in student.blocks:
        block.attn1.set_processor(WanAttnProcessor())
        block.attn2.set_processor(WanAttnProcessor())
    return student


def student_pipeline(pipe, student):
    """The teacher's pipeline with the student's transformer, a 4-step Euler scheduler and guidance 1."""
    from genkv.pipelines import SelfForcingPipeline, SelfForcingScheduler

    scheduler = SelfForcingScheduler(num_train_timesteps=pipe.scheduler.config.num_train_timesteps,
                                     shift=pipe.scheduler.config.shift, denoising_step_list=STUDENT_STEPS,
                                     warp_denoising_step=pipe.scheduler.config.warp_denoising_step, sampler="euler")
    config = dict(pipe.config)
    return SelfForcingPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, transformer=student,
                               vae=pipe.vae, scheduler=scheduler, default_height=config["default_height"],
                               default_width=config["default_width"],
                               max_sequence_length=config["max_sequence_length"], default_guidance_scale=1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="sprites-tiny", help="a bundled model, or a saved pipeline folder / tar")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help="sample the teacher at this many even steps instead of its own list, with its own "
                             "sampler and guidance (for v7, Euler without guidance: not v6's trajectory); a multiple of "
                             "4 above 4")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clips", type=int, default=4096, help="teacher videos (grammar prompts of data seeds)")
    parser.add_argument("--frames", type=int, default=45, help="frames per teacher video (45: 4 chunks)")
    parser.add_argument("--teacher-batch", type=int, default=256)
    parser.add_argument("--minutes", type=float, default=6.0, help="student training time")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--max-objects", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tar", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="2 clips of 21 frames, 3 steps (CPU check)")
    args = parser.parse_args(argv)
    if args.teacher_steps is not None and (args.teacher_steps <= 4 or args.teacher_steps % 4):
        parser.error(f"--teacher-steps {args.teacher_steps}: a multiple of 4 above 4 (the student's steps must be "
                     f"among the teacher's, with more after the last)")
    if args.smoke:
        args.clips, args.frames, args.teacher_batch, args.batch, args.max_steps, args.minutes = 2, 21, 2, 2, 3, 0

    from genkv.data import prompt_for, sample_scene

    t0 = time.time()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_teacher(args.teacher, device)
    if args.teacher_steps is not None:
        from prompt_following import use_even_steps

        use_even_steps(pipe, args.teacher_steps)
    record = student_step_indices([int(t) for t in pipe.scheduler.config.denoising_step_list])
    size = pipe.config.default_height
    prompts = [prompt_for(sample_scene(1_000_000 + s, size=size, max_objects=args.max_objects)[0])
               for s in range(args.clips)]  # data seeds far from the prompt-following protocol's 0..31
    log: list = [{"phase": "start", "teacher": args.teacher, "record_steps": record}]
    with torch.no_grad():
        latents, states = teacher_trajectories(pipe, prompts, args.frames, args.teacher_batch, args.seed, record)
    log.append({"phase": "teacher_done", "clips": len(prompts), "seconds": time.time() - t0,
                "latent_shape": list(latents.shape)})
    student = student_from(pipe)
    distill(student, pipe, prompts, latents, states, args, log)
    out = student_pipeline(pipe, student)
    out.to("cpu", torch.float16)
    out.text_encoder.to(torch.float32)  # as train_tiny saves it: tiny, and exact on a CPU
    args.out.mkdir(parents=True, exist_ok=True)
    out.save_pretrained(args.out, safe_serialization=True)
    finish(args, log, t0, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
