"""``genkv render``: validate everything first, then stream each prompt's video into an mp4."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..zoo import DEFAULT_MODEL
from .errors import CLIError, Terminated
from .stages import check_pipeline_gpus, launched_world
from .stages import launch as launch_stages

#: ``genkv render`` without --method/--config: a bounded cache. ``full`` grows with every chunk (out of memory at
#: frame ~900-1350 at Wan2.1-1.3B shapes); rolling keeps Self-Forcing's trained context (21 latent frames, its own
#: chunk included: upstream's local attention) plus the first frame as an attention sink (LongLive, StreamingLLM):
#: flat memory at any length, and up to 21 latent frames (81 video frames) nothing is evicted, so it renders what
#: ``full`` renders.
DEFAULT_METHOD = "rolling"
DEFAULT_SETTINGS = {"sink_frames": "1", "window_frames": "21"}
METHOD_HELP = (
    "Cache method (see `genkv methods`). Default: rolling with sink_frames=1, window_frames=21 (Self-Forcing's "
    "trained 21-latent-frame context plus the first frame as a sink): memory stays flat at any length and videos "
    "up to 81 frames keep every frame, as full does; full's memory grows without bound."
)
#: the longest video ``genkv render`` accepts (~1.7 h at 16 frames/s)
MAX_FRAMES = 100_000
#: a note longer than this shows the prompt shortened
PROMPT_NOTE_CHARS = 80
#: --recache as the pipeline's ``recache=`` takes it
RECACHE = {"on": True, "off": False, "flush": "flush"}


@dataclass(frozen=True)
class Switch:
    """A prompt file's ``@FRAME prompt`` line: from output frame ``frame`` the video follows ``text``."""

    frame: int
    text: str
    line: int  # its line number in the prompt file (errors name it)


@dataclass
class RenderOptions:
    prompt_file: Path
    frames: int = 81
    model: str = DEFAULT_MODEL
    checkpoint: Path | None = None
    method: str | None = None
    settings: list[str] = field(default_factory=list)
    config: str | None = None
    kv_memory: str | None = None  # --kv-memory SIZE: the method's budget_bytes
    out: Path = Path("videos")
    seed: int = 0
    fps: float = 16.0
    height: int | None = None
    width: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    guidance_scale: float | None = None  # None: the model's default
    overwrite: bool = False
    compile: bool = False
    cuda_graphs: bool | None = None  # None: what --compile chooses (on for CUDA)
    profile: bool = False
    progress_every: int = 10  # chunks between progress lines when stderr is not a terminal
    ema: bool = True  # the checkpoint's generator_ema weights (False: generator)
    image: Path | None = None  # image-to-video: every prompt starts from this image
    extend: Path | None = None  # video extension: every prompt continues this clip
    contexts: list[dict] = field(default_factory=list)  # per prompt: {"image"|"video": array, "source": path}
    decoder: str = "wan"  # or "taehv" (with decoder_weights)
    decoder_weights: Path | None = None
    fp8: bool = False
    fp8_scaling: str | None = None  # --fp8-scaling row | tensor (None: genkv.fp8's default, per row)
    recache: str = "on"  # a key of RECACHE: what a prompt switch does to the self-attention cache
    switches: list[list[Switch]] = field(default_factory=list)  # per prompt, from its "@FRAME prompt" lines
    switch_notes: dict[int, list[str]] = field(default_factory=dict)  # per prompt index: the pipeline's notes
    vae_device: str | None = None  # --vae-device: decode on this device (SelfForcingPipeline.set_vae_device)
    pipeline_gpus: int | None = None  # --pipeline-gpus N: the blocks split over N processes (genkv.cli.stages)
    launch_argv: list[str] | None = None  # the command line, for the stages --pipeline-gpus starts


# -- validation (cheap, before any model is loaded) -----------------------------------------------------
def check_numbers(options: RenderOptions) -> None:
    """Frame count, frame size, frame rate and progress interval: checked before torch is imported."""
    if options.frames <= 0:
        raise CLIError(f"--frames must be a positive number of frames, got {options.frames}")
    if options.frames > MAX_FRAMES:
        hours = MAX_FRAMES / max(options.fps, 1e-9) / 3600
        raise CLIError(f"--frames {options.frames} is over the limit of {MAX_FRAMES} frames per video "
                       f"({hours:.1f} h at --fps {options.fps:g}); ask for at most {MAX_FRAMES} and join the videos")
    if options.fps <= 0:
        raise CLIError(f"--fps must be positive, got {options.fps}")
    for name, value in (("--height", options.height), ("--width", options.width)):
        if value is not None and value <= 0:
            raise CLIError(f"{name} must be a positive number of pixels, got {value}; or leave it out for the "
                           "model's size")
    if options.progress_every <= 0:
        raise CLIError(f"--progress-every must be a positive number of chunks, got {options.progress_every}")
    if options.recache not in RECACHE:
        raise CLIError(f"--recache {options.recache!r} is not one of {', '.join(RECACHE)}")
    check_decoder(options)
    if options.fp8_scaling is not None:
        if options.fp8_scaling not in ("row", "tensor"):
            raise CLIError(f"--fp8-scaling {options.fp8_scaling!r} is not one of row, tensor")
        if not options.fp8:
            raise CLIError("--fp8-scaling is for --fp8; add --fp8 or drop --fp8-scaling")


def apply_speed_options(pipe, options: "RenderOptions", device: "torch.device", staged: bool = False) -> None:
    """--compile, --cuda-graphs and the CUDA defaults without them: a CUDA render that does not compile still takes
    what needs no compiled blocks, the compiled path's Wan decoder (``pipe.enable_fast_decode()``) and CUDA graphs
    (34.0 frames/s for ``fastar`` over 2000 frames on an H200, 2.14x upstream Self-Forcing in the same run, against
    23.0 with graphs alone; ``--compile`` 36.2). A pipeline split over GPUs (``staged``) runs eagerly, without
    graphs.

    Example:
        >>> import torch
        >>> from genkv.testing import tiny_self_forcing_pipeline
        >>> pipe = tiny_self_forcing_pipeline(seed=0)  # on the CPU: only the flags are set here
        >>> apply_speed_options(pipe, RenderOptions(Path("prompts.txt")), torch.device("cuda"))
        >>> pipe.cuda_graphs, pipe.decode_fused_blocks
        (True, True)
    """
    if options.compile:
        pipe.enable_compile()
    elif device.type == "cuda":
        pipe.enable_fast_decode()
        pipe.cuda_graphs = not staged
    if options.cuda_graphs is not None:
        pipe.cuda_graphs = options.cuda_graphs


def _fp8_scaling(pipe) -> str | None:
    """The scaling of the transformer's FP8 layers (None without FP8)."""
    from genkv.fp8 import FP8Linear

    return next((m.scaling for m in pipe.transformer.modules() if isinstance(m, FP8Linear)), None)


def check_decoder(options: RenderOptions) -> None:
    """--decoder and --decoder-weights agree, and the weights file is there (its contents are checked at load)."""
    if options.decoder not in ("wan", "taehv"):
        raise CLIError(f"--decoder {options.decoder!r} is not one of wan, taehv")
    if options.decoder == "taehv" and options.decoder_weights is None:
        raise CLIError("--decoder taehv needs --decoder-weights PATH (taew2_1.safetensors or taew2_1.pth from "
                       "github.com/madebyollin/taehv; genkv never downloads weights)")
    if options.decoder == "wan" and options.decoder_weights is not None:
        raise CLIError("--decoder-weights is for --decoder taehv; add --decoder taehv or drop --decoder-weights")
    if options.decoder_weights is not None and not options.decoder_weights.is_file():
        raise CLIError(f"--decoder-weights {str(options.decoder_weights)!r} not found; pass the taew2_1 file "
                       "(genkv never downloads weights)")


_CONTEXT_PREFIX = re.compile(r"^\[(image|extend)=([^\]]+)\]\s*(.*)$")


def split_context_prefixes(prompts: list[str], options: RenderOptions) -> tuple[list[str], list[tuple[str, Path] | None]]:
    """Each prompt line's own ``[image=PATH]`` / ``[extend=PATH]`` prefix (paths relative to the prompt file), else
    --image / --extend, else nothing: (prompts without prefixes, per prompt (kind, path) or None). Paths are only
    checked to exist here (before torch loads); :func:`load_contexts` reads them."""
    if options.image is not None and options.extend is not None:
        raise CLIError("--image and --extend both given; an image starts a video, --extend continues one: pick one")
    default = ("image", options.image) if options.image is not None else (
        ("extend", options.extend) if options.extend is not None else None)
    texts, sources = [], []
    for line in prompts:
        match = _CONTEXT_PREFIX.match(line)
        source = default
        if match:
            kind, path, line = match.group(1), Path(match.group(2).strip()), match.group(3).strip()
            source = (kind, path if path.is_absolute() else options.prompt_file.parent / path)
            if not line:
                raise CLIError(f"prompt line [{kind}=...] has no prompt after it; write '[{kind}=PATH] your prompt'")
        if source is not None and not source[1].is_file():
            flag = "--image" if source[0] == "image" else "--extend"
            raise CLIError(f"{flag} {str(source[1])!r} not found; pass an image (png, jpg) for --image or a video "
                           "(mp4) for --extend")
        texts.append(line)
        sources.append(source)
    return texts, sources


def load_contexts(sources: list[tuple[str, Path] | None]) -> list[dict]:
    """Read every image / clip once before the model loads: a bad file is one line, and nothing is written."""
    from genkv.pipelines import SelfForcingPipeline

    loaded: dict[tuple[str, Path], dict] = {}
    contexts = []
    for source in sources:
        if source is None:
            contexts.append({})
            continue
        if source not in loaded:
            kind, path = source
            try:
                if kind == "image":
                    loaded[source] = {"image": SelfForcingPipeline.load_image(path), "source": str(path)}
                else:
                    loaded[source] = {"video": SelfForcingPipeline.load_video(path), "source": str(path)}
            except ValueError as err:
                flag = "--image" if kind == "image" else "--extend"
                raise CLIError(f"{flag}: {err}") from None
        contexts.append(loaded[source])
    return contexts


def read_prompts(path: Path) -> list[tuple[int, str]]:
    """The prompt file's non-empty, non-``#`` lines as (line number, stripped text)."""
    if not path.exists():
        raise CLIError(f"prompt file {str(path)!r} not found; pass a text file with one prompt per line")
    if path.is_dir():
        raise CLIError(f"prompt file {str(path)!r} is a directory; pass a text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise CLIError(f"cannot read prompt file {str(path)!r} ({reason}); check its permissions and encoding")
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)]
    lines = [(number, line) for number, line in lines if line and not line.startswith("#")]
    if not lines:
        raise CLIError(f"prompt file {str(path)!r} has no prompts; write one prompt per non-empty line")
    return lines


_SWITCH = re.compile(r"^@(\S*)\s*(.*)$")
_SWITCH_EXAMPLE = "'@160 a blue square moving right'"


def split_switches(lines: list[tuple[int, str]], options: RenderOptions) -> tuple[list[str], list[list[Switch]]]:
    """Prompt lines apart from ``@FRAME prompt`` switch lines, each switch given to the nearest prompt line above
    it: (prompt lines, per prompt its switches). Checked here, before torch loads, so a typo costs no model load;
    whether a switch lands on a chunk boundary needs the model (:func:`check_switch_chunks`)."""
    prompts: list[str] = []
    switches: list[list[Switch]] = []
    for number, line in lines:
        match = _SWITCH.match(line)
        if match is None:
            prompts.append(line)
            switches.append([])
            continue
        where = f"{options.prompt_file} line {number}"
        if not prompts:
            raise CLIError(f"{where}: switch {_short(line)} comes before any prompt; put the video's first prompt "
                           "on a line above its switches")
        switch = _parse_switch(match.group(1), match.group(2).strip(), number, where, options.frames)
        if switches[-1] and switch.frame <= switches[-1][-1].frame:
            raise CLIError(f"{where}: switch frame {switch.frame} is not after the previous switch's frame "
                           f"{switches[-1][-1].frame}; order a video's switch lines by increasing frame")
        switches[-1].append(switch)
    return prompts, switches


def _parse_switch(frame: str, text: str, number: int, where: str, frames: int) -> Switch:
    """One ``@FRAME prompt`` line, its frame a whole number in 1 .. frames - 1 (frame 0 is the prompt line's)."""
    if not re.fullmatch(r"-?[0-9]+", frame):
        what = f"'@{frame}' is not a whole frame number" if frame else "'@' has no frame number after it"
        raise CLIError(f"{where}: {what}; write '@FRAME prompt', e.g. {_SWITCH_EXAMPLE}")
    value = int(frame)
    if value <= 0:
        raise CLIError(f"{where}: switch frame {value} must be > 0 (frame 0 is the prompt line's); write e.g. "
                       f"{_SWITCH_EXAMPLE}")
    if value >= frames:
        raise CLIError(f"{where}: switch frame {value} is not inside the video (--frames {frames}: frames 0 to "
                       f"{frames - 1}); switch earlier or raise --frames")
    if not text:
        raise CLIError(f"{where}: switch '@{value}' has no prompt; write the new prompt after the frame, e.g. "
                       f"{_SWITCH_EXAMPLE}")
    prefix = _CONTEXT_PREFIX.match(text)
    if prefix:
        raise CLIError(f"{where}: a switch cannot take [{prefix.group(1)}=...]; an image or clip starts a video, so "
                       "put it on the video's prompt line")
    return Switch(value, text, number)


def parse_settings(pairs: list[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--set {pair!r} is not key=value; e.g. --set window_frames=21")
        settings[key.strip()] = value.strip()
    return settings


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``6GiB``, ``512MiB``, ``1.5GB`` or ``2000000`` (``--kv-memory``); a one-line
    :class:`CLIError` for anything else.

    Example:
        >>> parse_size("6GiB"), parse_size("1.5 GB"), parse_size("4096")
        (6442450944, 1500000000, 4096)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) * _SIZE_UNITS[unit] < 1:
        raise CLIError(f"--kv-memory {text!r} is not a size; e.g. 6GiB, 512MiB, 1.5GB or 2000000000 (bytes)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def resolve_method(options: RenderOptions):
    import genkv

    settings = parse_settings(options.settings)
    if options.kv_memory is not None:
        settings["budget_bytes"] = str(parse_size(options.kv_memory))
    if options.method is None and options.config is None:
        settings = {**DEFAULT_SETTINGS, **settings}
    try:
        if options.config is not None:
            cfg = genkv.load_preset(options.config)
            if options.method is not None and options.method != cfg.name:
                raise CLIError(f"--method {options.method} conflicts with --config {options.config} ({cfg.name})")
            cfg = cfg.replace(**settings) if settings else cfg
        else:
            cfg = genkv.get_method(options.method or DEFAULT_METHOD, **settings)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if hasattr(cfg, "build_scale_cache"):
        raise CLIError(f"--method {cfg.name} is for next-scale (VAR) image models; genkv render takes the video "
                       "methods (see `genkv methods`)")
    return cfg


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: no CUDA device is visible; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0")
    elif device.type != "cpu":
        raise CLIError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def check_vae_device(options: RenderOptions, device) -> None:
    """--vae-device names a device that exists, and one process renders (each of several has its own GPU)."""
    if options.vae_device is None:
        return
    from genkv.pipelines.self_forcing.vae_device import resolve_vae_device

    _, world, _ = process_rank()
    if world > 1:
        raise CLIError(f"--vae-device with {world} processes: each process renders on its own GPU; run one process "
                       "to decode on a second GPU, or drop --vae-device")
    try:
        resolve_vae_device(options.vae_device)
    except ValueError as err:
        raise CLIError(str(err).replace("vae_device", "--vae-device").replace("leave --vae-device out",
                                                                              "drop --vae-device")) from None


def resolve_dtype(name: str, device):
    import torch

    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise CLIError(f"--dtype {name!r} is not one of auto, bf16, fp16, fp32")
    return table[name]


def video_name(index: int, prompt: str) -> str:
    """``007-a-corgi-surfing-a-wave``: no underscores (VBench groups clips by the text before ``_``)."""
    slug = "-".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:48].strip("-") or "video"
    return f"{index:03d}-{slug}"


def prepare_outputs(out: Path, names: list[str], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a file; pass a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".genkv-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CLIError(f"cannot write to --out {str(out)!r} ({err.strerror or err}); choose a writable folder")
    existing = [n + ".mp4" for n in names if (out / f"{n}.mp4").exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise CLIError(f"{out / existing[0]}{more} already exists; pass --overwrite to replace")


def load_pipeline(options: RenderOptions, device, dtype):
    import torch

    from genkv.pipelines import CheckpointError, SelfForcingPipeline

    if options.model == "tiny-random":
        from genkv.testing import tiny_self_forcing_pipeline

        if options.checkpoint is not None:
            raise CLIError("--checkpoint needs a real --model folder; 'tiny-random' has random weights")
        return tiny_self_forcing_pipeline(seed=0, device=device, dtype=dtype)
    from genkv.zoo import SHIPPED, shipped_model_path

    path = Path(options.model)
    if options.model in SHIPPED and not path.exists():  # a bundled model by name (a folder of that name wins)
        if options.checkpoint is not None:
            raise CLIError(
                f"--checkpoint needs a Wan2.1 --model folder; {options.model!r} is a model bundled with genkv")
        path = shipped_model_path(options.model)
        if not (path / "model_index.json").is_file():
            raise CLIError(f"the bundled model {options.model!r} is missing from this install; reinstall genkv")
    if not path.exists():
        bundled = "".join(f", {name!r}" for name in SHIPPED)
        raise CLIError(f"--model {options.model!r} not found; pass a diffusers model folder{bundled} or 'tiny-random'")
    if not (path / "model_index.json").is_file():
        raise CLIError(f"--model {options.model!r} has no model_index.json; pass a diffusers model folder")
    if options.checkpoint is not None and not options.checkpoint.is_file():
        raise CLIError(f"--checkpoint {str(options.checkpoint)!r} not found; pass Self-Forcing's .pt file")
    try:
        pipe = SelfForcingPipeline.from_pretrained(path, checkpoint=options.checkpoint, torch_dtype=dtype,
                                                   use_ema=options.ema)
    except CheckpointError as err:
        # the library's option names as the command line spells them
        raise CLIError(str(err).replace("use_ema=False", "--no-ema").replace("use_ema=True", "--ema")) from None
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIError(f"cannot load --model {options.model!r}: {first}") from None
    with torch.no_grad():
        return pipe.to(device)


def unknown_words(pipe, prompt: str) -> list[str]:
    """The prompt's words that the pipeline's tokenizer maps to its unknown token (none for a subword tokenizer
    such as UMT5's, which spells any word; many for the sprite model's word-level one)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tokenizer is None or unk is None:
        return []
    words = dict.fromkeys(re.findall(r"[\w']+", prompt.lower()))
    return [w for w in words if unk in tokenizer(w, add_special_tokens=False).input_ids]


def _profile_table(phases: list[dict], console) -> dict:
    """Median milliseconds per chunk of each phase (chunk 0, which carries warm-up, left out); printed as a table."""
    import statistics

    from rich.table import Table

    steady = phases[1:] or phases
    keys = [k for k in steady[0] if k.endswith("_ms")]
    medians = {k: statistics.median(p.get(k, 0.0) for p in steady) for k in keys}
    table = Table(title=f"time per chunk, median of {len(steady)} chunks (ms)")
    table.add_column("phase")
    table.add_column("GPU")
    table.add_column("host")
    names = dict.fromkeys(k.rsplit("_", 2)[0] for k in keys)
    for name in names:
        gpu, host = medians.get(f"{name}_gpu_ms"), medians.get(f"{name}_host_ms")
        table.add_row(name, "-" if gpu is None else f"{gpu:.1f}", "-" if host is None else f"{host:.1f}")
    console.print(table)
    return medians


def _peak_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def process_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) under ``accelerate launch`` / ``torchrun`` / MPI; (0, 1, 0) otherwise."""
    try:
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes > 1:
            return state.process_index, state.num_processes, state.local_process_index
    except (ImportError, RuntimeError, ValueError):
        pass
    # accelerate reports a single process for CPU runs started by torchrun; the launcher's variables still hold.
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


# -- the render -----------------------------------------------------------------------------------------
def run_render(options: RenderOptions) -> int:
    """Validate, load, render; returns the process exit code (SIGTERM stops it as Ctrl-C does, exit 143)."""
    check_numbers(options)
    prompts, options.switches = split_switches(read_prompts(options.prompt_file), options)
    prompts, sources = split_context_prefixes(prompts, options)
    parse_settings(options.settings)
    names = [video_name(i, p) for i, p in enumerate(prompts)]
    method = resolve_method(options)  # the first torch import (the method registry builds torch modules)
    options.contexts = load_contexts(sources)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    check_pipeline_gpus(options, device)
    check_vae_device(options, device)
    prepare_outputs(options.out, names, options.overwrite)
    if options.pipeline_gpus is not None and launched_world() == 1:  # start the stages, each this command again
        if options.launch_argv is None:
            raise CLIError("--pipeline-gpus needs the command line to start its stages; run it as `genkv render`")
        with _sigterm_as_interrupt():
            return launch_stages(options, options.launch_argv)
    with _sigterm_as_interrupt():
        code = _run_loaded(options, prompts, names, method, device, dtype)
    if options.pipeline_gpus is not None and code == 0:  # a stage: leave the process group as every stage does
        from .stages import close_stage

        close_stage()
    return code


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) in the main thread while rendering."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _short(text: str, limit: int = PROMPT_NOTE_CHARS) -> str:
    """``text`` quoted, cut to ``limit`` characters with its length said when longer."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _run_loaded(options: RenderOptions, prompts, names, method, device, dtype) -> int:
    """Load the model and render every prompt given to this process."""

    import torch
    from rich.console import Console

    import genkv

    console = Console(stderr=True)
    jobs = list(enumerate(zip(prompts, names)))
    stage = None  # --pipeline-gpus: this process's stage; every stage renders every prompt
    if options.pipeline_gpus is not None:  # its process group first (accelerate would set up one of its own)
        from .stages import init_stage

        device = init_stage(device)
        stage = int(os.environ.get("RANK", "0"))
    rank, world, local_rank = process_rank()
    rank_label = ""
    if stage is None and world > 1:
        # Each process takes a contiguous share of the prompts; names carry the global index, so no two
        # processes ever write the same file.
        per, extra = divmod(len(jobs), world)
        first = rank * per + min(rank, extra)
        jobs = jobs[first : first + per + (1 if rank < extra else 0)]
        rank_label = f"rank {rank}: "
        if options.device == "auto" and device.type == "cuda":
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        if not jobs:
            return 0

    if stage is None:
        pipe = load_pipeline(options, device, dtype)
    else:  # on the CPU first: only this stage's blocks ever reach its GPU
        from genkv.pipelines.self_forcing.block_split import apply_block_split, move_stage

        pipe = move_stage(apply_block_split(load_pipeline(options, torch.device("cpu"), dtype)), device)
    decodes = stage is None or stage == pipe.block_split.decode_stage
    height = options.height if options.height is not None else pipe.config.default_height
    width = options.width if options.width is not None else pipe.config.default_width
    try:
        pipe.check_inputs(options.frames, height, width)
        method.build_keeper().check_chunk(pipe.config.num_frames_per_chunk)
    except ValueError as err:
        raise CLIError(str(err).replace("height", "--height").replace("width", "--width")) from None
    for context in {id(c): c for c in options.contexts if "video" in c}.values():
        try:  # a clip too short for one chunk is refused here, before any file is written
            latents, _ = pipe.prepare_context(video=context["video"], height=height, width=width)
        except ValueError as err:
            raise CLIError(f"--extend {context['source']}: {err}") from None
        context["latent_frames"] = latents.shape[2]
    options.switch_notes = {index: check_switch_chunks(pipe, options, index) for index, _ in jobs}
    genkv.apply_genkv(pipe, method)
    if options.decoder == "taehv":
        try:
            pipe.set_decoder("taehv", weights=options.decoder_weights)
        except (FileNotFoundError, ValueError) as err:
            raise CLIError(str(err)) from None
    if options.vae_device is not None:
        pipe.set_vae_device(options.vae_device)  # checked in run_render
    if options.fp8:  # before compiling, so Inductor fuses the activation quantization
        try:
            # a render never goes back: the bf16 layers are freed
            pipe.enable_fp8(keep_originals=None, scaling=options.fp8_scaling)
        except RuntimeError as err:
            raise CLIError(str(err)) from None
    apply_speed_options(pipe, options, device, staged=stage is not None)
    if not decodes:  # a stage before the last: the same loop for latents, silent but for its own errors
        return _follow(pipe, options, jobs, height, width, device, stage)
    if options.model == "tiny-random":
        console.print("[yellow]note:[/] --model tiny-random has random, untrained weights: the videos are noise.")

    summaries = []
    with _genkv_warnings_as_notes(console, rank_label):
        for index, (prompt, name) in jobs:
            for text in (prompt, *(switch.text for switch in _video_switches(options, index))):
                unknown = unknown_words(pipe, text)
                if unknown:  # the sprite model's word-level tokenizer reads them as <unk>: say so, not ignore them
                    words = ", ".join(map(repr, unknown[:8])) + (
                        f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
                    console.print(f"[yellow]note:[/] {rank_label}the model does not know {_escape(words)} (read as "
                                  f"unknown) in {_escape(_short(text))}", soft_wrap=True)
            summary = _render_one(pipe, options, method, prompt, name, index, height, width, device, console,
                                  rank_label)
            summaries.append(summary)
            if summary.get("terminated"):
                return Terminated.exit_code
            if summary.get("interrupted") or summary.get("error"):
                return 130 if summary.get("interrupted") else 1
    return 0


def _follow(pipe, options: RenderOptions, jobs, height: int, width: int, device, stage: int) -> int:
    """A non-decoding stage of --pipeline-gpus: every video's loop with ``output_type="latent"`` (its blocks' part
    of each forward, the hidden states handed on), then its memory to the decoding stage's summary."""
    import torch

    import genkv
    from .stages import gather_stage_memory

    for index, (prompt, _) in jobs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the decoding stage says them once
            try:
                for _ in pipe.stream(prompt, options.frames, height, width, output_type="latent",
                                     **_stream_arguments(options, index, device)):  # the decoding stage's noise
                    pass
            except KeyboardInterrupt as stop:
                return Terminated.exit_code if isinstance(stop, Terminated) else 130
            except Exception as err:
                text = str(err).strip().splitlines()[0] if str(err).strip() else ""
                print(f"genkv: error: stage {stage}: {type(err).__name__}: {text}", file=sys.stderr)
                return 1
        gather_stage_memory(_peak_memory(device), genkv.get_store(pipe).memory_bytes())
    return 0


def _stream_arguments(options: RenderOptions, index: int, device) -> dict[str, Any]:
    """What ``stream`` takes for prompt ``index`` beyond the prompt and size: its seeded generator, guidance,
    switches, re-cache mode and context image / clip (the same on every stage of --pipeline-gpus)."""
    import torch

    switches = _video_switches(options, index)
    context = options.contexts[index] if options.contexts else {}
    return dict(generator=torch.Generator(device=device).manual_seed(options.seed + index),
                guidance_scale=options.guidance_scale,
                prompt_switches=[(s.frame, s.text) for s in switches] or None, recache=RECACHE[options.recache],
                **{k: v for k, v in context.items() if k in ("image", "video")})


def check_switch_chunks(pipe, options: RenderOptions, index: int) -> list[str]:
    """Prompt ``index``'s switches as the loaded model places them (each at the first chunk starting at or after
    its frame), checked before any file is written: a switch with no chunk after it, or two on one chunk, is a
    CLIError naming its line. Returns the pipeline's notes (a switch moved to a chunk boundary), which the render
    prints with the video's switches: the pipeline's own warning would show once per process, not per video."""
    switches = _video_switches(options, index)
    context = options.contexts[index] if options.contexts else {}
    context_frames = context.get("latent_frames", 1 if "image" in context else 0)  # an image is one latent frame
    notes: list[str] = []
    for count, switch in enumerate(switches, start=1):  # one switch more each time: the first that fails is named
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                pipe._switch_frames([(s.frame, s.text) for s in switches[:count]], options.frames, context_frames)
            except ValueError as err:
                chunk = pipe.vae_scale_factor_temporal * pipe.config.num_frames_per_chunk
                raise CLIError(f"{options.prompt_file} line {switch.line}: {err}; keep switches at least {chunk} "
                               "frames (one chunk) apart and before the last chunk") from None
        notes = [str(w.message).removeprefix("genkv: ") for w in caught if str(w.message).startswith("genkv: ")]
    return notes


def _video_switches(options: RenderOptions, index: int) -> list[Switch]:
    """Prompt ``index``'s switches (none when ``options`` was built without a prompt file's)."""
    return options.switches[index] if options.switches else []


def _report_switches(console, rank_label: str, name: str, options: RenderOptions, index: int) -> None:
    """One line per prompt switch of the video about to render, then the pipeline's notes on them."""
    for switch in _video_switches(options, index):
        console.print(f"{_escape(rank_label + name[:32])}: switch at frame {switch.frame}: "
                      f"{_escape(_short(switch.text))} (recache {options.recache})", soft_wrap=True)
    for note in options.switch_notes.get(index, []):
        console.print(f"[yellow]note:[/] {_escape(rank_label + note)}", soft_wrap=True)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


@contextlib.contextmanager
def _genkv_warnings_as_notes(console, rank_label: str):
    """genkv's own warnings (a fast path falling back, ...) print as one-line notes, not Python warning text."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text.startswith("genkv: running without CUDA graphs"):
            return  # said once per video in its summary line (_render_one)
        if text.startswith("genkv: prompt switches apply at chunk boundaries"):
            return  # said with the video's switches (check_switch_chunks, _report_switches)
        if text.startswith("genkv: "):
            console.print(f"[yellow]note:[/] {rank_label}{text[len('genkv: '):]}")
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _render_one(pipe, options, method, prompt, name, index, height, width, device, console, rank_label) -> dict:
    import torch
    import genkv
    from genkv.video import Mp4Writer

    path = options.out / f"{name}.mp4"
    for old in (path, path.with_suffix(".json")):  # --overwrite: no stale summary outlives its video
        if old.exists():
            old.unlink()
    switches = _video_switches(options, index)
    for used in {device, getattr(pipe, "vae_device", None) or device}:
        if used.type == "cuda":
            torch.cuda.reset_peak_memory_stats(used)
    summary: dict[str, Any] = {
        "prompt": prompt,
        "video": str(path),
        "model": options.model,
        "method": method.to_dict(),
        "decoder": options.decoder,
        "context": ({("image" if "image" in options.contexts[index] else "extend"): options.contexts[index]["source"]}
                    if options.contexts and options.contexts[index] else None),
        "fp8_layers": getattr(pipe, "fp8_layers", 0),
        "fp8_scaling": _fp8_scaling(pipe),
        "seed": options.seed + index,
        "height": height,
        "width": width,
        "fps_video": options.fps,
        "device": str(device),
        "vae_device": str(pipe.vae_device) if getattr(pipe, "vae_device", None) is not None else None,
        "pipeline_gpus": options.pipeline_gpus,
        "frames_requested": options.frames,
        "prompt_switches": [{"frame": s.frame, "prompt": s.text} for s in switches],
        "recache": options.recache,
    }
    start = time.perf_counter()
    chunk_times: list[float] = []
    phases: list[dict] = []
    writer = Mp4Writer(path, fps=options.fps)
    status = "done"
    _report_switches(console, rank_label, name, options, index)
    try:
        with _progress(console, f"{rank_label}{name[:32]}", options, writer, start) as report:
            last = start
            for frames in pipe.stream(prompt, options.frames, height, width, profile=options.profile,
                                      on_chunk=phases.append, **_stream_arguments(options, index, device)):
                before_write = time.perf_counter()
                writer.append(frames)
                now = time.perf_counter()
                if options.profile and phases:
                    phases[-1]["write_host_ms"] = 1000 * (now - before_write)
                chunk_times.append(now - last)
                last = now
                report(len(frames), genkv.get_store(pipe).memory_bytes())  # no device sync in the render loop
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated)
        status = "terminated" if isinstance(stop, Terminated) else "interrupted"
    except Exception as err:  # e.g. out of memory mid-render: keep what was produced
        status = "error"
        summary["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    finally:
        try:
            writer.close()
        except KeyboardInterrupt as stop:  # a second signal while flushing: finish the flush anyway, then stop
            status = "terminated" if isinstance(stop, Terminated) else "interrupted"
            writer.close()
    wall = time.perf_counter() - start
    stats = genkv.cache_stats(pipe)
    summary.update(
        frames=writer.frames_written,
        seconds=round(wall, 3),
        fps=round(writer.frames_written / wall, 3) if wall > 0 else 0.0,
        chunk_seconds=[round(t, 4) for t in chunk_times],
        peak_memory_bytes=_peak_memory(device),
        **({"vae_peak_memory_bytes": _peak_memory(pipe.vae_device)}  # the decoding GPU's, flat as the other
           if getattr(pipe, "vae_device", None) is not None and pipe.vae_device != device else {}),
        kv_bytes=stats["bytes"],
        kv_tokens=stats["tokens"],
        **({"kv_budget": stats["budget"]} if "budget" in stats else {}),  # what --kv-memory became
        interrupted=status in ("interrupted", "terminated"),
        terminated=status == "terminated",
    )
    if options.profile and phases:
        summary["profile_ms"] = _profile_table(phases, console)
    if options.pipeline_gpus is not None and status == "done":  # every stage's GPU, flat as the decoding one's
        from .stages import gather_stage_memory

        summary["stage_peak_memory_bytes"], summary["stage_kv_bytes"] = gather_stage_memory(
            summary["peak_memory_bytes"], summary["kv_bytes"])
    graphs = getattr(pipe, "last_graphs", None)
    if graphs is not None:
        summary["cuda_graphs"] = {"recorded": graphs.captures, "replays": graphs.replays, "off_reason": graphs.reason}
        if graphs.reason is not None:  # never a silent fallback: the render says why it ran without graphs
            console.print(f"[yellow]note:[/] {rank_label}rendered without CUDA graphs: {graphs.reason}")
    _report_end(summary, status, path, wall, console, rank_label)
    return summary


def _report_end(summary: dict, status: str, path: Path, wall: float, console, rank_label: str) -> None:
    """Write the JSON summary next to the video and say how the video ended (nothing is claimed that is not on
    disk: stopped before the first chunk, there is neither a video nor a summary)."""
    kept = summary["frames"]
    if kept:
        path.with_suffix(".json").write_text(json.dumps(summary, indent=2))
        where = f"kept {kept} frames in {path}"
    else:
        where = f"nothing was written for {path.name} (stopped before its first chunk)"
    if status == "done":
        console.print(
            f"{rank_label}{path}: {kept} frames in {wall:.1f} s ({summary['fps']:.1f} frames/s), peak memory "
            f"{_human(summary['peak_memory_bytes'])}, KV {_human(summary['kv_bytes'])}"
        )
    elif status in ("interrupted", "terminated"):
        console.print(f"[yellow]{status}:[/] {rank_label}{where}")
    else:
        print(f"genkv: error: {summary['error']} ({where})", file=sys.stderr)


@contextlib.contextmanager
def _progress(console, label: str, options: RenderOptions, writer, start: float):
    """Yield ``report(frames, kv_bytes)``, called after each chunk: a live bar on a terminal; otherwise (a log
    file, a pipe) one line after the first chunk and then every ``options.progress_every`` chunks."""
    if console.is_terminal:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (
            TextColumn(_escape(label)),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} frames"),
            TextColumn("{task.fields[rate]:.1f} frames/s"),
            TextColumn("KV {task.fields[kv]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("render", total=options.frames, rate=0.0, kv="0 B")

            def bar(frames: int, kv: int) -> None:
                rate = writer.frames_queued / max(time.perf_counter() - start, 1e-9)
                progress.update(task, advance=frames, rate=rate, kv=_human(kv))

            yield bar
        return
    chunks = 0

    def line(frames: int, kv: int) -> None:
        nonlocal chunks
        chunks += 1
        if chunks == 1 or chunks % options.progress_every == 0:
            elapsed = time.perf_counter() - start
            print(f"{label}: {writer.frames_queued}/{options.frames} frames ({writer.frames_written} in the mp4), "
                  f"{writer.frames_queued / max(elapsed, 1e-9):.1f} frames/s, KV {_human(kv)}, {elapsed:.0f} s",
                  file=console.file, flush=True)

    yield line
