"""Does a sprite model draw what its prompts ask? A fixed set of grammar prompts x seeds, rendered and measured by
colour tracking (``genkv.metrics.prompt_following``), next to the data's own videos of the same prompts.

    python eval/prompt_following.py --out runs/prompt_following.json                 # sprites-tiny, 32 x 2, 96 frames
    python eval/prompt_following.py --model tiny-random --prompts 2 --seeds 1 --frames 9 --out /tmp/pf.json

The prompts are the scenes of data seeds 0, 1, ... (one or two sprites each: ``genkv.data.sample_scene``), so
every render has a reference video of the data with the same prompt; the data's figures are the ceiling the
metric allows (its sprites bounce off walls, so even the data moves against the prompt's sign sometimes;
``--room-frames 16`` draws them as ``train_tiny --room-frames 16`` does, each with a second's room). The reference
videos are drawn like the sprite model's training clips (``--backgrounds plain --radius 0.13 0.21``,
train_tiny's defaults), so edge energy compares like with like; the prompts do not depend on either. Before
2026-12-05 the reference used the generator's defaults (all backgrounds, radius 0.09-0.16).
Prints per colour word the share of frames it is present where asked (and shown where not asked), two-sprite
prompts' share of frames with both present, the share of sprites moving along the asked axis and the asked way,
and edge energy (sharpness) against the data's; writes every video's report to JSON. The renders are also
measured over their first ``--split-at`` frames and the rest apart (default 45: the training clips' length), so
a model that holds a prompt only as long as its training clips shows it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_rollout import load_pipeline  # noqa: E402
from train_tiny import TRAINING_BACKGROUNDS, TRAINING_RADIUS  # noqa: E402


def even_steps(steps: int, train_timesteps: int = 1000) -> list[int]:
    """``steps`` denoising steps from ``train_timesteps`` down, evenly spaced (the scheduler warps them by its shift).

    Example:
        >>> even_steps(4), even_steps(16)[:3]
        ([1000, 750, 500, 250], [1000, 938, 875])
    """
    return [round(train_timesteps * (steps - i) / steps) for i in range(steps)]


def use_even_steps(pipe, steps: int) -> None:
    """Give ``pipe``'s scheduler :func:`even_steps` ``steps`` denoising steps, its sampler, shift and the pipeline's
    guidance kept (``--steps`` here, ``distill_tiny --teacher-steps``)."""
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, denoising_step_list=even_steps(
        steps, pipe.scheduler.config.num_train_timesteps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sprites-tiny", help="a bundled model, a model folder, or tiny-random")
    parser.add_argument("--method", default="full", help="the cache method renders use (default full)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None,
                        help="sample with N evenly spaced denoising steps (4: Self-Forcing's 1000/750/500/250) instead "
                        "of the model's own schedule, same sampler")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the model's own default_guidance_scale)")
    parser.add_argument("--split-at", type=int, default=45,
                        help="also measure frames before and from this frame apart (45: the sprite model's training "
                        "clips; later frames are beyond anything it trained on); 0: no split")
    parser.add_argument("--backgrounds", nargs="+", default=list(TRAINING_BACKGROUNDS),
                        help="backgrounds of the data's reference videos (the training clips': plain)")
    parser.add_argument("--radius", type=float, nargs=2, default=list(TRAINING_RADIUS), metavar=("LOW", "HIGH"),
                        help="sprite radius range of the reference videos, fractions of the frame (the training "
                        "clips')")
    parser.add_argument("--room-frames", type=int, default=0,
                        help="the reference videos' sprites start with this many frames of room the asked way "
                             "(train_tiny's --room-frames; the prompts do not change)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.seeds < 0:
        parser.error("--seeds must be >= 0 (0: the data's reference alone)")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be a positive number of denoising steps")
    if args.guidance is not None and args.guidance < 1:
        parser.error("--guidance must be >= 1 (1: no guidance)")
    if args.split_at < 0:
        parser.error("--split-at must be a frame index (0: no split)")
    split = args.split_at if 0 < args.split_at < args.frames else None

    import genkv
    from genkv.data import make_video
    from genkv.metrics.prompt_following import prompt_following, summarize

    pipe = load_pipeline(args.model, torch.device(args.device))
    if args.steps is not None:
        use_even_steps(pipe, args.steps)
    genkv.apply_genkv(pipe, args.method)
    size = pipe.config.default_height
    try:
        data = [make_video(seed=s, num_frames=args.frames, max_objects=2, size=size,
                           backgrounds=tuple(args.backgrounds), radius=tuple(args.radius), room_frames=args.room_frames)
                for s in range(args.prompts)]
    except ValueError as error:  # an unknown background, a radius outside (0, 0.5), a negative room
        parser.error(str(error))
    rendered, references = [], []
    spans = {"before": [], "from": []}  # the renders measured over frames [0, split) and [split, end)
    start = time.perf_counter()
    for video in data:
        references.append(dict(prompt=video.prompt, **prompt_following(video.frames, video.prompt)))
        for seed in range(args.seeds):
            frames = pipe(video.prompt, num_frames=args.frames, output_type="uint8", guidance_scale=args.guidance,
                          generator=torch.Generator().manual_seed(seed)).frames[0]
            rendered.append(dict(prompt=video.prompt, seed=seed, **prompt_following(frames, video.prompt)))
            if split is not None:
                spans["before"].append(prompt_following(frames[:split], video.prompt))
                spans["from"].append(prompt_following(frames[split:], video.prompt))
        print(f"{len(rendered)}/{args.prompts * args.seeds} videos, {time.perf_counter() - start:.0f} s", flush=True)
    result = {"model": args.model, "method": args.method, "frames": args.frames, "prompts": args.prompts,
              "denoising_step_list": [int(t) for t in pipe.scheduler.config.denoising_step_list],
              "seeds": args.seeds, "guidance_scale": args.guidance, "backgrounds": args.backgrounds,
              "radius": args.radius, "room_frames": args.room_frames, "model_summary": summarize(rendered),
              "data_summary": summarize(references),
              "videos": rendered, "data_videos": references}
    if split is not None:
        result["split_at"] = split
        result["model_summary_before_split"] = summarize(spans["before"])
        result["model_summary_from_split"] = summarize(spans["from"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    model, ref = result["model_summary"], result["data_summary"]
    columns = [("model", model), ("data", ref)]
    if split is not None:
        columns[1:1] = [(f"<{split}", result["model_summary_before_split"]),
                        (f">={split}", result["model_summary_from_split"])]
    nan = float("nan")

    def cell(value) -> str:
        return f"{value if value is not None else nan:8.3f}"

    print(f"\n{'':34s} " + " ".join(f"{name:>8s}" for name, _ in columns))
    for colour in ref["colour_present"]:
        print(f"{colour + ' present where asked':34s} "
              + " ".join(cell(summary["colour_present"].get(colour)) for _, summary in columns))
    for colour in ref["colour_shown_unasked"]:
        print(f"{colour + ' shown where not asked':34s} "
              + " ".join(cell(summary["colour_shown_unasked"].get(colour)) for _, summary in columns))
    for key, label in (("two_sprites_both_present", "two sprites: both present"),
                       ("axis_matches", "sprites moving along the asked axis"),
                       ("direction_matches", "sprites moving the asked way"),
                       ("axis_matches_quarter", "along the axis, quarter-second moves"),
                       ("direction_matches_quarter", "the asked way, quarter-second moves"),
                       ("edge_energy", "edge energy")):
        print(f"{label:34s} " + " ".join(cell(summary[key]) for _, summary in columns))
    print(f"json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
