"""Does a sprite model draw what its prompts ask? A fixed set of grammar prompts x seeds, rendered and measured by
colour tracking (``genkv.metrics.prompt_following``), next to the data's own videos of the same prompts.

    python eval/prompt_following.py --out runs/prompt_following.json                 # sprites-tiny, 32 x 2, 96 frames
    python eval/prompt_following.py --model tiny-random --prompts 2 --seeds 1 --frames 9 --out /tmp/pf.json

The prompts are the scenes of data seeds 0, 1, ... (one or two sprites each: ``genkv.data.sample_scene``), so
every render has a reference video of the data with the same prompt; the data's figures are the ceiling the
metric allows (its sprites bounce off walls, so even the data moves against the prompt's sign sometimes).
Prints per colour word the share of frames it is present where asked (and shown where not asked), two-sprite
prompts' share of frames with both present, the share of sprites moving along the asked axis and the asked way,
and edge energy (sharpness) against the data's; writes every video's report to JSON.
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


def even_steps(steps: int, train_timesteps: int = 1000) -> list[int]:
    """``steps`` denoising steps from ``train_timesteps`` down, evenly spaced (the scheduler warps them by its shift).

    Example:
        >>> even_steps(4), even_steps(16)[:3]
        ([1000, 750, 500, 250], [1000, 938, 875])
    """
    return [round(train_timesteps * (steps - i) / steps) for i in range(steps)]


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
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be a positive number of denoising steps")

    import genkv
    from genkv.data import make_video
    from genkv.metrics.prompt_following import prompt_following, summarize

    pipe = load_pipeline(args.model, torch.device(args.device))
    if args.steps is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, denoising_step_list=even_steps(
            args.steps, pipe.scheduler.config.num_train_timesteps))
    genkv.apply_genkv(pipe, args.method)
    size = pipe.config.default_height
    data = [make_video(seed=s, num_frames=args.frames, max_objects=2, size=size) for s in range(args.prompts)]
    rendered, references = [], []
    start = time.perf_counter()
    for video in data:
        references.append(dict(prompt=video.prompt, **prompt_following(video.frames, video.prompt)))
        for seed in range(args.seeds):
            frames = pipe(video.prompt, num_frames=args.frames, output_type="uint8",
                          generator=torch.Generator().manual_seed(seed)).frames[0]
            rendered.append(dict(prompt=video.prompt, seed=seed, **prompt_following(frames, video.prompt)))
        print(f"{len(rendered)}/{args.prompts * args.seeds} videos, {time.perf_counter() - start:.0f} s", flush=True)
    result = {"model": args.model, "method": args.method, "frames": args.frames, "prompts": args.prompts,
              "denoising_step_list": [int(t) for t in pipe.scheduler.config.denoising_step_list],
              "seeds": args.seeds, "model_summary": summarize(rendered), "data_summary": summarize(references),
              "videos": rendered, "data_videos": references}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    model, ref = result["model_summary"], result["data_summary"]
    print(f"\n{'':34s} {'model':>8s} {'data':>8s}")
    for colour in ref["colour_present"]:
        print(f"{colour + ' present where asked':34s} {model['colour_present'].get(colour, float('nan')):8.3f} "
              f"{ref['colour_present'][colour]:8.3f}")
    for colour in ref["colour_shown_unasked"]:
        print(f"{colour + ' shown where not asked':34s} {model['colour_shown_unasked'].get(colour, float('nan')):8.3f} "
              f"{ref['colour_shown_unasked'][colour]:8.3f}")
    for key, label in (("two_sprites_both_present", "two sprites: both present"),
                       ("axis_matches", "sprites moving along the asked axis"),
                       ("direction_matches", "sprites moving the asked way"), ("edge_energy", "edge energy")):
        value = model[key]
        print(f"{label:34s} {value if value is not None else float('nan'):8.3f} "
              f"{ref[key] if ref[key] is not None else float('nan'):8.3f}")
    print(f"json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
