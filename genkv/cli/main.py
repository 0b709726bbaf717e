"""The ``genkv`` command line."""

from __future__ import annotations

import sys
from contextvars import ContextVar
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from ..zoo import DEFAULT_MODEL
from .errors import CLIError, Terminated
from .render import METHOD_HELP

# Nothing here imports torch or diffusers: each command imports them after checking its arguments and files, so
# a usage error or a missing file is reported in well under a second.

#: the command line :func:`main` was given (render --pipeline-gpus starts each stage as the same command)
_LAUNCH_ARGV: ContextVar[list[str] | None] = ContextVar("genkv_launch_argv", default=None)

app = typer.Typer(
    name="genkv",
    help="KV-cache compression and sparse attention for autoregressive video and image generators.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


class Recache(str, Enum):
    """--recache's choices (a click choice: a typo is a one-line usage error)."""

    on = "on"
    off = "off"
    flush = "flush"


def _version() -> str:
    """The installed distribution's version (the source tree's when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genkv")
    except PackageNotFoundError:
        from genkv import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"genkv {_version()}")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """KV-cache compression and sparse attention for autoregressive video and image generators."""


@app.command()
def render(
    prompt_file: Path = typer.Argument(
        ..., help="Text file with one prompt per non-empty line ('#' lines skipped), one video each. A line '@FRAME "
        "prompt' (e.g. '@160 a blue square moving right') switches the video of the prompt line above it to that "
        "prompt from FRAME (at the chunk boundary at or after it)."),
    frames: int = typer.Option(81, "--frames", "-n", help="Video frames per prompt."),
    model: str = typer.Option(
        DEFAULT_MODEL,
        "--model",
        "-m",
        help="A diffusers model folder (SelfForcingPipeline, or Wan2.1 T2V with --checkpoint); 'sprites-tiny', the "
        "bundled 64x64 sprite model (prompts like 'a red circle moving left'); or 'tiny-random', an untrained "
        "random-weight smoke model.",
    ),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Self-Forcing .pt to load into the model."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="The checkpoint's generator_ema weights (default) or its "
                             "generator weights; a file without the ones asked for is an error."),
    method: Optional[str] = typer.Option(None, "--method", help=METHOD_HELP),
    settings: List[str] = typer.Option([], "--set", help="Method setting key=value (repeatable)."),
    config: Optional[str] = typer.Option(None, "--config", help="Preset name or YAML file (configs/NAME.yaml)."),
    kv_memory: Optional[str] = typer.Option(
        None, "--kv-memory", help="Memory for the self-attention KV cache instead of a frame budget, e.g. 6GiB or "
        "512MiB: a bounded method (rolling, tempcache, fastar) keeps the most frames that fit (more with --set "
        "kv_dtype=int8 or int4)."),
    out: Path = typer.Option(Path("videos"), "--out", "-o", help="Output folder for the mp4 files."),
    seed: int = typer.Option(0, "--seed", help="Random seed (prompt i uses seed + i)."),
    fps: float = typer.Option(16.0, "--fps", help="Frame rate written to the mp4."),
    height: Optional[int] = typer.Option(None, "--height", help="Video height (default: the model's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Video width (default: the model's)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32."),
    guidance_scale: Optional[float] = typer.Option(
        None, "--guidance-scale", help="CFG scale (default: the model's; Self-Forcing samples without)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    compile: bool = typer.Option(
        False, "--compile", help="The fastest path: compiled transformer blocks (CUDA; the first chunk pays ~15 s of "
        "compilation). Without it a CUDA render still replays CUDA graphs and decodes with the fast Wan VAE path "
        "(channels-last, per-tap 2-D convolutions, fused norms, one-pass tap sums, transposed up-samplers)."
    ),
    cuda_graphs: Optional[bool] = typer.Option(
        None, "--cuda-graphs/--no-cuda-graphs", help="Record each chunk's second transformer forward as a CUDA graph "
        "and replay it for the chunk's later forwards (default: on for CUDA renders, with or without --compile; if "
        "recording fails the render says why and goes on without graphs)."
    ),
    profile: bool = typer.Option(
        False, "--profile", help="Print where each chunk's time goes (denoise, KV commit, decode, host copy, write); "
        "synchronises once per chunk and turns off the decode overlap."
    ),
    image: Optional[Path] = typer.Option(
        None, "--image", help="Image-to-video: every video starts from this image (resized and centre-cropped to the "
        "render size, its VAE reconstruction is frame 0). A prompt line '[image=PATH] prompt' gives that line its "
        "own image (paths relative to the prompt file)."
    ),
    extend: Optional[Path] = typer.Option(
        None, "--extend", help="Video extension: every video continues this clip (its last whole chunks are the "
        "context and open the output; --frames counts them). A line '[extend=PATH] prompt' gives that line its own."
    ),
    decoder: str = typer.Option(
        "wan", "--decoder", help="What turns latents into frames: wan (the model's VAE, the reference) or taehv "
        "(the TAEHV tiny streaming decoder: ~11x cheaper per chunk, softer frames; needs --decoder-weights)."
    ),
    decoder_weights: Optional[Path] = typer.Option(
        None, "--decoder-weights", help="taew2_1.safetensors or taew2_1.pth (github.com/madebyollin/taehv) for "
        "--decoder taehv; genkv never downloads weights."
    ),
    fp8: bool = typer.Option(
        False, "--fp8", help="FP8 (e4m3) linear layers in the transformer blocks (CUDA compute capability 8.9+); "
        "changes the output slightly (docs/BENCHMARKS.md); pays only with --compile."
    ),
    fp8_scaling: Optional[str] = typer.Option(
        None, "--fp8-scaling", help="With --fp8: row (the default: a scale per token and output channel) or tensor "
        "(one per activation and weight: 1.8% faster renders on an H100, but outlier tokens cost the others "
        "precision; measure your checkpoint)."
    ),
    recache: Recache = typer.Option(
        Recache.on, "--recache", help="What a prompt switch ('@FRAME prompt' line) does to the cached frames: on "
        "re-computes their K/V under the new prompt (LongLive's re-cache); off keeps them as they are; flush keeps "
        "only the sink frames and the newest (∞-RoPE). Token-merging methods (tempcache, fastar) re-cache the frames "
        "their budget holds unmerged (README, Prompt switching)."
    ),
    vae_device: Optional[str] = typer.Option(
        None, "--vae-device", help="Decode on another GPU (e.g. cuda:1) while --device denoises the next chunk: the "
        "same frames, the VAE's time off the denoising GPU. Not with several processes (each has its own GPU)."
    ),
    pipeline_gpus: Optional[int] = typer.Option(
        None, "--pipeline-gpus", help="Split the transformer's blocks over N GPUs, one process each (started for you "
        "through torch.distributed's launcher): each GPU holds 1/N of the weights and of the KV cache, for a model "
        "larger than one GPU; the stages take turns, so it is not faster (README). Not with --compile or "
        "--vae-device."
    ),
    progress_every: int = typer.Option(
        10, "--progress-every", help="When the output is not a terminal (a log file), print a progress line after "
        "the first chunk and then every N chunks."
    ),
) -> None:
    """Render one video per prompt line, streaming frames into mp4 files as chunks are decoded."""
    from .render import RenderOptions, run_render  # light: torch is imported after the arguments are checked

    options = RenderOptions(
        prompt_file=prompt_file,
        frames=frames,
        model=model,
        checkpoint=checkpoint,
        ema=ema,
        method=method,
        settings=settings,
        config=config,
        kv_memory=kv_memory,
        out=out,
        seed=seed,
        fps=fps,
        height=height,
        width=width,
        device=device,
        dtype=dtype,
        guidance_scale=guidance_scale,
        overwrite=overwrite,
        compile=compile,
        cuda_graphs=cuda_graphs,
        profile=profile,
        progress_every=progress_every,
        image=image,
        extend=extend,
        decoder=decoder,
        decoder_weights=decoder_weights,
        fp8=fp8,
        fp8_scaling=fp8_scaling,
        recache=recache.value,
        vae_device=vae_device,
        pipeline_gpus=pipeline_gpus,
        launch_argv=_LAUNCH_ARGV.get(),
    )
    raise typer.Exit(run_render(options))


@app.command()
def methods() -> None:
    """List the cache methods with their settings (defaults and meaning), video and image methods apart, then
    the shipped presets."""
    from .methods import describe_methods

    for line in describe_methods():
        typer.echo(line)


@app.command()
def calibrate(
    model: str = typer.Argument(..., help="VAR checkpoint (var_d16.pth ... var_d36.pth), or 'tiny-random'."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="The VQ-VAE checkpoint (vae_ch160v4096z32.pth)."),
    out: Path = typer.Option(Path("budgets.json"), "--out", "-o", help="Budgets JSON to write."),
    budget: float = typer.Option(0.1, "--budget", help="Fraction of the full KV cache to keep, in (0, 1]."),
    classes: str = typer.Option("207,360,387,974,88,979,417,279", "--classes",
                                help="Class ids sampled during calibration (comma separated)."),
    drafter_fraction: float = typer.Option(0.1, "--drafter-fraction", help="Share of layers made drafters."),
    method: str = typer.Option("scalekv", "--method", help="scalekv (layer budgets) or hack (head roles)."),
    alpha: float = typer.Option(0.5, "--alpha", help="hack: fraction of heads classified contextual."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Calibrate a VAR model offline and write JSON: ScaleKV budgets (drafter vs refiner layers per scale, for
    `apply_genkv(pipe, "scalekv", budgets=FILE)`) or HACK head roles (`apply_genkv(pipe, "hack", roles=FILE)`)."""
    from .calibrate import run_calibrate

    raise typer.Exit(run_calibrate(model, vae, out, budget, classes, device, drafter_fraction, seed, method, alpha))


from .eval import eval_app  # noqa: E402

app.add_typer(eval_app, name="eval")


def _click_types(name: str) -> tuple[type, ...]:
    """``name`` from typer's bundled click and from click itself (typer 0.29 raises its own copies)."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _usage_line(err: Exception) -> str:
    """A click/typer usage error as one line: what is wrong, and where the usage is."""
    message = " ".join(str(err.format_message()).split())
    ctx = getattr(err, "ctx", None)
    command = ctx.command_path if ctx is not None else "genkv"
    if type(err).__name__ == "NoArgsIsHelpError" or not message:
        return f"no command given; pick one of the commands listed above (`{command} --help`)"
    return f"{message.rstrip('.')}; see `{command} --help`"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``genkv`` console script: every user error is one line on stderr, exit code 2; an
    interruption (Ctrl-C: 130, SIGTERM: 143) keeps what was rendered."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _LAUNCH_ARGV.set([str(arg) for arg in argv])  # `render --pipeline-gpus` starts its stages with it
    try:
        # Without standalone mode click returns (not raises) the exit code of typer.Exit.
        result = app(args=argv, prog_name="genkv", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except CLIError as err:
        print(f"genkv: error: {err}", file=sys.stderr)
        return err.exit_code
    except Terminated:
        print("genkv: terminated", file=sys.stderr)
        return Terminated.exit_code
    except KeyboardInterrupt:
        print("genkv: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if isinstance(err, _click_types("Exit")):
            return int(getattr(err, "exit_code", 0) or 0)
        if isinstance(err, _click_types("Abort")):
            print("genkv: interrupted", file=sys.stderr)
            return 130
        if isinstance(err, _click_types("ClickException")):  # usage errors: bad option, missing value, ...
            print(f"genkv: error: {_usage_line(err)}", file=sys.stderr)
            return int(getattr(err, "exit_code", 2) or 2)
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
