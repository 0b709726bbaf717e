"""genkv against its peers at the same shapes, in one process on one GPU: frames/s, ms per 12 frames, peak memory.

Systems (``--systems``, default all):
    upstream           upstream Self-Forcing's own loop (``pipeline/causal_inference.py``,
                       ``CausalInferencePipeline.inference``) from the checkout given by ``--self-forcing DIR``
                       (or env ``GENKV_SELF_FORCING``, or ``.peers/Self-Forcing``), imported at run time; nothing of it
                       is copied into genkv. Random weights at the Wan2.1-1.3B shapes, bf16, the text encoder replaced
                       by a fixed random embedding (1 x 512 x 4096), its own Wan VAE wrapper with random weights.
                       Settings: its ``configs/self_forcing_dmd.yaml`` over ``configs/default_config.yaml`` (4 steps
                       1000/750/500/250 warped, 3-frame blocks, context_noise 0, timestep_shift 5) with the rolling
                       cache its model offers for long videos: ``local_attn_size=21``, ``sink_size=0`` (the yaml
                       leaves the default -1: a fixed 21-frame cache without eviction, which fails past 21 latent
                       frames, 81 output frames).
    flashdreams        NVIDIA FlashDreams' Self-Forcing recipe: not runnable here, the row says why.
    genkv              ``rolling:window_frames=21``, eager, the pipeline's defaults (no CUDA graphs, the reference
                       Wan decoder).
    genkv-graphs, genkv-taehv-graphs   eager blocks with each chunk's repeated forwards replayed from CUDA graphs
                       (``--cuda-graphs`` without ``--compile``): the eager paths are launch-bound, host time equal
                       to GPU time (BENCHMARKS, 2026-12-01), which graphs take off the host.
    genkv-graphs-fast, genkv-taehv-graphs-fast   the same, still without ``torch.compile`` on the blocks, with the
                       compiled path's Wan decoder (``pipe.enable_fast_decode()``): what ``genkv render`` runs on
                       CUDA without ``--compile`` (since 2026-12-06), fast without a compile warm-up.
    genkv-compile      the same with ``--compile`` (compiled blocks, CUDA graphs, fused Wan VAE decoder).
    genkv-compile-fp8  ``--compile --fp8``.
    genkv-taehv        ``--decoder taehv`` (TAEHV at its published shapes, random weights, fp16).
    genkv-compile-taehv, genkv-compile-fp8-taehv   those flags together.
    genkv-compile-fp8torch-taehv   the last with FP8's activation quantization left to Inductor (torch ops;
                       ``enable_fp8(row_kernel=False)``), not genkv's one-pass kernel and fused GELU.
    genkv-compile-unfused, genkv-compile-fp8-taehv-unfused   ``genkv-compile`` / ``genkv-compile-fp8-taehv``
                       without the three changes made default on 2026-12-06 (the "-trial" rows of earlier runs
                       measured them on): the blocks' residual + LayerNorm + modulation in one pass
                       (``GENKV_FUSED_ADALN``; with FP8 the pass also writes the codes q/k/v, the cross-attention
                       query and the FFN read), TempCache's merge scores in one pass (``GENKV_PAIR_SCORES_KERNEL``)
                       and a channels-last TAEHV (``GENKV_TAEHV_CHANNELS_LAST``). Every other row runs them on,
                       whatever the environment says.
    NAME@fastar        any genkv system with ``fastar`` (TempCache merges + routed block-sparse reads) instead of
                       upstream's rolling window: genkv's fastest method, a different cache from upstream's.
                       On CUDA its read is split (``chunk_attention="auto"``, the default): the chunk's own keys by
                       cuDNN SDPA, the block-sparse kernel resuming over the routed history (the same attention).
    NAME@fastar-sdpa   the split read named (``chunk_attention=sdpa``), on any device.
    NAME@fastar-kernel the one-kernel read (``chunk_attention=kernel``, the default before 2026-12-05).
    NAME@fastar-int8, NAME@fastar-int4   ``fastar`` with its committed history stored as int8 / int4 codes
                       (``kv_dtype``, issue 22), read by the kernel without a full-precision copy.
    NAME[@METHOD]~SWITCH[~SWITCH...]   the row with some of the default-on kernels turned off, for a per-change
                       A/B inside one process (each row builds and compiles its own pipeline): ``adaln`` (the fused
                       block stretches, ``GENKV_FUSED_ADALN``), ``pairs`` (the merge-score kernel,
                       ``GENKV_PAIR_SCORES_KERNEL``), ``taehv-cl`` (channels-last TAEHV, ``GENKV_TAEHV_CHANNELS_LAST``),
                       ``normrope`` (the q/k norm + RoPE kernel, ``GENKV_FUSED_NORM_ROPE``). The ``-unfused`` rows
                       are ``~adaln~pairs~taehv-cl``.

Shapes: 480x832, 21-latent-frame rolling window, 3-latent-frame chunks, 4 denoising steps, ``--frames`` output
frames (upstream makes whole 3-latent blocks: 2001 frames for 2000). Every run is timed whole (wall clock,
synchronised): frames/s over the run includes the decode for both; upstream decodes all frames at the end of
``inference()`` (and its inference.py then copies them to the host, timed too), genkv decodes per chunk.
"steady" leaves out the first chunk (genkv also the last: a flush); upstream's per-block times come from hooks on
its generator module, and its end-of-run decode is spread evenly over its blocks for the steady numbers.
A warm-up video of ``--warmup-frames`` runs before each timed one (compilation, CUDA graphs, cuDNN autotune).

On the GPU machine, carrying [".whl", ".peers"] (one line):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . ; export TRITON_INTERPRET=0; python3 eval/bench_peers.py --self-forcing .peers/Self-Forcing --frames 2000 --json $OUT/peers.json

Several systems at 2000 frames pass a 10-minute limit per command: split them over commands that each run
``upstream`` first, so every ratio is within one run, e.g. ``--systems upstream genkv-compile genkv-compile@fastar``
then ``--systems upstream genkv-compile-taehv@fastar genkv-compile-fp8-taehv@fastar genkv-compile-fp8@fastar``
(docs/BENCHMARKS.md, 2026-12-04). ``--merge`` instead keeps the JSON's rows of the systems not run again, and the
ratios then use an upstream row from another run.

``--tiny`` runs tiny shapes (64x64, a 2-layer model) on the CPU in under a minute: plumbing only, for tests.

Run-time adaptations of upstream (its files are untouched, see ``UpstreamImport``): its package ``__init__`` files
are not run (they import the T5 tokenizer, ftfy, easydict, ...): bare packages stand in for ``wan``, ``wan.modules``,
``utils``, ``pipeline`` and ``demo_utils``, and ``wan.modules.t5`` / ``wan.modules.tokenizers`` are stubs (the text
encoder is replaced); without flash_attn its cross-attention (which calls ``flash_attention`` directly, and that
asserts flash_attn) is pointed at its own ``attention`` function, whose fallback is torch SDPA (the self-attention
already goes through it); ``from_pretrained`` and the VAE checkpoint load are swapped for random initialisation
while the pipeline is built. On a CPU-only torch ``demo_utils.memory`` (which asks CUDA for a device at import) is a
stub, and at ``--tiny`` the pipeline's KV caches are made at the tiny shapes (upstream sizes them for 12 x 128 heads).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

EVAL = Path(__file__).resolve().parent
ROOT = EVAL.parent
sys.path.insert(0, str(EVAL))
from bench_json import write_result  # noqa: E402
from bench_rollout import WAN_1_3B, build_pipeline, parse_spec  # noqa: E402

SYSTEMS = ("upstream", "flashdreams", "genkv", "genkv-compile", "genkv-compile-fp8", "genkv-taehv",
           "genkv-compile-taehv", "genkv-compile-fp8-taehv", "genkv-compile-fp8torch-taehv", "genkv-compile-unfused",
           "genkv-compile-fp8-taehv-unfused", "genkv-graphs", "genkv-taehv-graphs", "genkv-graphs-fast",
           "genkv-taehv-graphs-fast")
WINDOW_FRAMES = 21  # latent frames a chunk attends to, its own included (upstream: local_attn_size)
CHUNK_FRAMES = 3  # latent frames per chunk (upstream: num_frame_per_block)
GENKV_METHOD = f"rolling:window_frames={WINDOW_FRAMES}"  # upstream's setting; a system "NAME@METHOD" runs another
#: the methods a genkv system can run instead of upstream's rolling window ("genkv-compile@fastar")
GENKV_METHODS = {"rolling": GENKV_METHOD, "fastar": "fastar", "fastar-sdpa": "fastar:chunk_attention=sdpa",
                 "fastar-kernel": "fastar:chunk_attention=kernel", "fastar-int8": "fastar:kv_dtype=int8",
                 "fastar-int4": "fastar:kv_dtype=int4"}
STEADY_FRAMES = 12  # output frames of a 3-latent chunk after the first (4 per latent frame)
ROPE_FRAMES = 1024  # upstream's RoPE table: latent positions are absolute and never rebased

# What upstream's inference.py reads from configs/self_forcing_dmd.yaml merged over configs/default_config.yaml
# (checked against the checkout's files when pyyaml is there), plus the rolling cache for long videos.
UPSTREAM_SETTINGS = dict(
    denoising_step_list=[1000, 750, 500, 250],
    warp_denoising_step=True,
    num_frame_per_block=CHUNK_FRAMES,
    independent_first_frame=False,
    context_noise=0,
)
UPSTREAM_MODEL_KWARGS = dict(timestep_shift=5.0, local_attn_size=WINDOW_FRAMES, sink_size=0)

FLASHDREAMS_REASON = (
    "flashdreams: PyPI has flashdreams 0.1.0 (the framework), but its Self-Forcing recipe is the "
    "flashdreams-self-forcing plugin (integrations/self_forcing in github.com/NVIDIA/flashdreams), which is not on "
    "PyPI"
)
# flashdreams 0.1.0's required packages beyond torch, einops, numpy, tqdm, filelock (its wheel's METADATA)
FLASHDREAMS_NEEDS = {"transformers": "transformers>=5", "tyro": "tyro", "loguru": "loguru", "boto3": "boto3",
                     "pynvml": "nvidia-ml-py", "huggingface_hub": "huggingface-hub", "ftfy": "ftfy",
                     "safetensors": "safetensors"}

GENKV_VARIANTS: dict[str, dict[str, Any]] = {
    "genkv": dict(compile=False, fp8=False, decoder="wan"),
    "genkv-graphs": dict(compile=False, fp8=False, decoder="wan", graphs=True),
    "genkv-taehv-graphs": dict(compile=False, fp8=False, decoder="taehv", graphs=True),
    "genkv-graphs-fast": dict(compile=False, fp8=False, decoder="wan", graphs=True, fast_decode=True),
    "genkv-taehv-graphs-fast": dict(compile=False, fp8=False, decoder="taehv", graphs=True),
    "genkv-compile": dict(compile=True, fp8=False, decoder="wan"),
    "genkv-compile-fp8": dict(compile=True, fp8=True, decoder="wan"),
    "genkv-taehv": dict(compile=False, fp8=False, decoder="taehv"),
    "genkv-compile-taehv": dict(compile=True, fp8=False, decoder="taehv"),
    "genkv-compile-fp8-taehv": dict(compile=True, fp8=True, decoder="taehv"),
    "genkv-compile-fp8torch-taehv": dict(compile=True, fp8=True, decoder="taehv", row_kernel=False),
    "genkv-compile-unfused": dict(compile=True, fp8=False, decoder="wan", unfused=True),
    "genkv-compile-fp8-taehv-unfused": dict(compile=True, fp8=True, decoder="taehv", unfused=True),
}


#: the default-on kernels a row can turn off with ``~NAME`` (a per-change A/B in one process)
SWITCHES = ("adaln", "pairs", "taehv-cl", "normrope")
SWITCH_ENV = {"adaln": "GENKV_FUSED_ADALN", "pairs": "GENKV_PAIR_SCORES_KERNEL",
              "taehv-cl": "GENKV_TAEHV_CHANNELS_LAST", "normrope": "GENKV_FUSED_NORM_ROPE"}


def split_system(system: str) -> tuple[str, str]:
    """``genkv-compile@fastar`` -> (``genkv-compile``, the fastar method spec); a bare name runs upstream's window.

    Example:
        >>> split_system("genkv-compile@fastar"), split_system("genkv")
        (('genkv-compile', 'fastar'), ('genkv', 'rolling:window_frames=21'))
        >>> split_system("genkv-compile@fastar~adaln")
        ('genkv-compile', 'fastar')
    """
    name, _, method = system.split("~")[0].partition("@")
    return name, GENKV_METHODS[method or "rolling"]


def switches_off(system: str) -> set[str]:
    """The default-on kernels a row runs without: its ``~NAME`` suffixes, plus all but ``normrope`` for ``-unfused``.

    Example:
        >>> sorted(switches_off("genkv-compile@fastar~adaln~normrope")), sorted(switches_off("genkv-compile-unfused"))
        (['adaln', 'normrope'], ['adaln', 'pairs', 'taehv-cl'])
    """
    name, *off = system.split("~")
    if GENKV_VARIANTS.get(name.partition("@")[0], {}).get("unfused", False):
        off += ["adaln", "pairs", "taehv-cl"]
    return set(off)


def system_name(text: str) -> str:
    """argparse type of ``--systems``: a known system, genkv ones optionally ``@METHOD`` and ``~SWITCH`` suffixes."""
    head, *off = text.split("~")
    name, at, method = head.partition("@")
    if name not in SYSTEMS or (at and (name not in GENKV_VARIANTS or method not in GENKV_METHODS)):
        raise argparse.ArgumentTypeError(
            f"{text!r}: pick one of {', '.join(SYSTEMS)}; a genkv one may end in @{' or @'.join(GENKV_METHODS)}")
    bad = [switch for switch in off if switch not in SWITCHES or name not in GENKV_VARIANTS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"{text!r}: ~{bad[0]} is not a switch of a genkv row; pick from ~{' ~'.join(SWITCHES)}")
    return text


class Skip(Exception):
    """A system that cannot run here; its message goes into the table and the JSON."""


# ---------------------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Shapes:
    """One benchmark size, seen by both code bases: genkv's model name and upstream's constructor arguments."""

    genkv_model: str  # bench_rollout.build_pipeline's --model
    height: int
    width: int
    text_len: int
    transformer: dict  # upstream CausalWanModel(**transformer)
    vae: dict = field(default_factory=dict)  # overrides of upstream _video_vae's config ({}: Wan2.1's VAE)

    @property
    def frame_tokens(self) -> int:
        """Transformer tokens per latent frame (8x VAE, 2x2 patches)."""
        return (self.height // 16) * (self.width // 16)


def upstream_transformer_kwargs(diffusers_config: dict, text_len: int) -> dict:
    """Upstream CausalWanModel arguments for a diffusers WanTransformer3DModel config (one source for the shapes)."""
    return dict(
        model_type="t2v",
        patch_size=tuple(diffusers_config["patch_size"]),
        text_len=text_len,
        in_dim=diffusers_config["in_channels"],
        dim=diffusers_config["num_attention_heads"] * diffusers_config["attention_head_dim"],
        ffn_dim=diffusers_config["ffn_dim"],
        freq_dim=diffusers_config["freq_dim"],
        text_dim=diffusers_config["text_dim"],
        out_dim=diffusers_config["out_channels"],
        num_heads=diffusers_config["num_attention_heads"],
        num_layers=diffusers_config["num_layers"],
        qk_norm=True,
        cross_attn_norm=diffusers_config["cross_attn_norm"],
        eps=diffusers_config.get("eps", 1e-6),
    )


def make_shapes(tiny: bool) -> Shapes:
    """Wan2.1-T2V-1.3B at 480x832 with 512 x 4096 text embeddings, or genkv's tiny test model at 64x64."""
    if not tiny:
        return Shapes("wan-1.3b", 480, 832, 512, upstream_transformer_kwargs(WAN_1_3B, 512))
    from genkv.testing import tiny_wan_transformer, tiny_wan_vae

    vae = tiny_wan_vae().config  # the same tiny VAE genkv's tiny pipeline decodes with
    return Shapes(
        "tiny", 64, 64, 64, upstream_transformer_kwargs(dict(tiny_wan_transformer().config), 64),
        vae=dict(dim=vae["base_dim"], dim_mult=list(vae["dim_mult"]), num_res_blocks=vae["num_res_blocks"],
                 temperal_downsample=list(vae["temperal_downsample"])),
    )


def latent_frames_for(frames: int) -> int:
    """Upstream's latent frames for at least ``frames`` output frames: whole 3-frame blocks (1 + 4 (T - 1) frames)."""
    latents = 1 + math.ceil(max(frames - 1, 0) / 4)
    return CHUNK_FRAMES * math.ceil(latents / CHUNK_FRAMES)


def output_frames_for(latents: int) -> int:
    """Frames the Wan VAE decodes from ``latents`` latent frames (the first latent is one frame, the others four)."""
    return 1 + 4 * (latents - 1)


# ---------------------------------------------------------------------------------------------------------------
# Timing helpers


class Clock:
    """Wall-clock seconds after the device's queued work is done (the only way to time a whole eager run)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resident_at_reset: int | None = None

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def reset_peak(self) -> None:
        """Start a peak; also note what is already allocated (weights, a cache kept from the warm-up video, other
        systems' leftovers), so a row's peak can be read against it."""
        self.resident_at_reset = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.resident_at_reset = int(torch.cuda.memory_allocated(self.device))

    def peak_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None


class BlockClock:
    """Timestamps at upstream's block boundaries from forward hooks on its generator module (its loop untouched).

    ``inference()`` calls the generator ``calls_per_block`` times per block (each denoising step, then the clean
    pass that writes the KV cache), so every ``calls_per_block``-th call ends a block. Synchronising in the hook
    costs upstream nothing it does not already pay: its attention reads cache indices with ``.item()`` per layer.
    """

    def __init__(self, module: torch.nn.Module, calls_per_block: int, clock: Clock) -> None:
        self.calls_per_block, self.clock = calls_per_block, clock
        self.calls = 0
        self.marks: list[float] = []
        self.handles = [module.register_forward_pre_hook(self._before), module.register_forward_hook(self._after)]

    def _before(self, module: torch.nn.Module, args: tuple) -> None:
        if self.calls == 0:
            self.marks.append(self.clock.now())

    def _after(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.calls += 1
        if self.calls % self.calls_per_block == 0:
            self.marks.append(self.clock.now())

    def block_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def median_ms(seconds: list[float]) -> float | None:
    return 1000 * statistics.median(seconds) if seconds else None


# ---------------------------------------------------------------------------------------------------------------
# Upstream Self-Forcing, imported from the user's checkout


def find_checkout(arg: Path | None) -> Path | None:
    """``--self-forcing``, else env ``GENKV_SELF_FORCING``, else ``.peers/Self-Forcing`` beside eval/ if present."""
    if arg is not None:
        return arg
    if os.environ.get("GENKV_SELF_FORCING"):
        return Path(os.environ["GENKV_SELF_FORCING"])
    default = ROOT / ".peers" / "Self-Forcing"
    return default if default.is_dir() else None


def _stub_function(name: str) -> Callable:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"bench_peers: upstream's {name} is stubbed (the benchmark passes random text embeddings)")

    return unavailable


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``owner.name`` for the block and put back what was there (or nothing, for an inherited attribute)."""
    had = name in vars(owner)
    old = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, old)
        else:
            delattr(owner, name)


@dataclass
class UpstreamImport:
    """Upstream's modules, loaded from ``root`` without running its package ``__init__`` files."""

    root: Path
    notes: list[str]
    attention: types.ModuleType
    model: types.ModuleType
    causal_model: types.ModuleType
    vae: types.ModuleType
    wan_wrapper: types.ModuleType
    causal_inference: types.ModuleType

    @classmethod
    def load(cls, root: Path) -> "UpstreamImport":
        root = root.resolve()
        if not (root / "pipeline" / "causal_inference.py").is_file():
            raise Skip(f"upstream: {root} is not a Self-Forcing checkout (no pipeline/causal_inference.py)")
        notes: list[str] = []
        cls._bare_packages(root)
        # wan_wrapper imports the T5 encoder and its tokenizer (transformers, ftfy); the benchmark replaces the text
        # encoder, so their names only have to exist.
        for name, attr in (("wan.modules.t5", "umt5_xxl"), ("wan.modules.tokenizers", "HuggingfaceTokenizer")):
            stub = types.ModuleType(name)
            setattr(stub, attr, _stub_function(attr))
            sys.modules.setdefault(name, stub)
        cls._memory_helpers(notes)
        attention = importlib.import_module("wan.modules.attention")
        model = importlib.import_module("wan.modules.model")
        if not (attention.FLASH_ATTN_2_AVAILABLE or attention.FLASH_ATTN_3_AVAILABLE):
            # Its cross-attention calls flash_attention() directly, which asserts flash_attn; its own attention()
            # takes the same arguments and falls back to torch SDPA (context_lens is None in the causal path).
            model.flash_attention = attention.attention
            notes.append("no flash_attn: cross-attention rebound to upstream's attention() (torch SDPA)")
        return cls(
            root=root, notes=notes, attention=attention, model=model,
            causal_model=importlib.import_module("wan.modules.causal_model"),
            vae=importlib.import_module("wan.modules.vae"),
            wan_wrapper=importlib.import_module("utils.wan_wrapper"),
            causal_inference=importlib.import_module("pipeline.causal_inference"),
        )

    @staticmethod
    def _bare_packages(root: Path) -> None:
        """Stand-ins for upstream's packages: their ``__init__`` imports everything (T5, CLIP, training code)."""
        for name in ("wan", "wan.modules", "utils", "pipeline", "demo_utils"):
            folder = root.joinpath(*name.split("."))
            loaded = sys.modules.get(name)
            if loaded is not None:
                paths = [Path(p).resolve() for p in getattr(loaded, "__path__", [])]
                if folder.resolve() not in paths:
                    raise Skip(f"upstream: a module named {name!r} from elsewhere is already imported")
                continue
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
            if "." in name:
                parent, _, child = name.rpartition(".")
                setattr(sys.modules[parent], child, package)

    @staticmethod
    def _memory_helpers(notes: list[str]) -> None:
        """``demo_utils.memory`` asks CUDA for the current device at import; only its low_memory path uses it."""
        try:
            importlib.import_module("demo_utils.memory")
        except (AssertionError, RuntimeError):
            stub = types.ModuleType("demo_utils.memory")
            stub.gpu = torch.device("cpu")
            for name in ("get_cuda_free_memory_gb", "DynamicSwapInstaller",
                         "move_model_to_device_with_memory_preservation"):
                setattr(stub, name, _stub_function(name))
            sys.modules["demo_utils.memory"] = stub
            notes.append("no CUDA: demo_utils.memory stubbed (used only with low_memory=True)")


def check_upstream_config(root: Path) -> list[str]:
    """Differences between ``UPSTREAM_SETTINGS`` and the checkout's yaml files (empty: they agree)."""
    try:
        import yaml
    except ImportError:
        return ["pyyaml missing: settings not checked against the checkout's configs/"]
    merged: dict = {}
    for name in ("default_config.yaml", "self_forcing_dmd.yaml"):  # inference.py merges the dmd file over default
        merged.update(yaml.safe_load((root / "configs" / name).read_text()) or {})
    wanted = {**UPSTREAM_SETTINGS, "timestep_shift": UPSTREAM_MODEL_KWARGS["timestep_shift"]}
    found = {**merged, "timestep_shift": (merged.get("model_kwargs") or {}).get("timestep_shift")}
    return [f"configs/ say {key}={found.get(key)!r}, benchmark uses {value!r}"
            for key, value in wanted.items() if found.get(key) != value]


class RandomTextEncoder(torch.nn.Module):
    """Stands in for upstream's WanTextEncoder (UMT5-XXL): the same fixed random embedding for every prompt."""

    def __init__(self, embeds: torch.Tensor) -> None:
        super().__init__()
        self.embeds = embeds  # a plain attribute: pipeline.to(dtype) must not touch it

    def forward(self, text_prompts: list[str]) -> dict:
        return {"prompt_embeds": self.embeds.expand(len(text_prompts), -1, -1)}


def build_upstream(up: UpstreamImport, shapes: Shapes, device: torch.device, dtype: torch.dtype) -> Any:
    """Upstream's CausalInferencePipeline with random weights, on ``device`` in ``dtype`` as its inference.py does."""
    args = types.SimpleNamespace(**UPSTREAM_SETTINGS, model_kwargs=dict(UPSTREAM_MODEL_KWARGS))
    model_class = up.causal_model.CausalWanModel
    vae_class, video_vae = up.vae.WanVAE_, up.vae._video_vae

    def random_transformer(cls: type, path: str, **kwargs: Any) -> torch.nn.Module:  # for from_pretrained(wan_models/)
        with torch.device(device):
            return cls(**shapes.transformer, **kwargs)

    def random_vae_model(**config: Any) -> torch.nn.Module:  # built inside _video_vae's meta-device block
        with torch.device(device):
            model = vae_class(**config)
        model.load_state_dict = lambda *a, **k: None  # keep the random init: the "checkpoint" is an empty file
        return model

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)

        def random_video_vae(pretrained_path: str | None = None, **kwargs: Any) -> torch.nn.Module:
            model = video_vae(pretrained_path=str(empty), **{**kwargs, **shapes.vae})
            del model.load_state_dict
            return model

        embeds = torch.randn(1, shapes.text_len, shapes.transformer["text_dim"],
                             generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
        with contextlib.ExitStack() as patches:
            patches.enter_context(_patched(model_class, "from_pretrained", classmethod(random_transformer)))
            patches.enter_context(_patched(up.wan_wrapper, "_video_vae", random_video_vae))
            patches.enter_context(_patched(up.vae, "WanVAE_", random_vae_model))
            patches.enter_context(contextlib.redirect_stdout(io.StringIO()))  # its "KV inference with ..." line
            pipe = up.causal_inference.CausalInferencePipeline(
                args, device=device, text_encoder=RandomTextEncoder(embeds))
    pipe = pipe.to(dtype=dtype)  # as inference.py: the whole pipeline in bf16, then generator and VAE on the GPU
    pipe.generator.to(device=device)
    pipe.vae.to(device=device)
    fit_upstream_caches(pipe, shapes, device, dtype)
    return pipe


def fit_upstream_caches(pipe: Any, shapes: Shapes, device: torch.device, dtype: torch.dtype) -> None:
    """Upstream hard-codes the 1.3B cache layout (30 blocks, 1560 tokens a frame, 12 x 128 heads); tiny shapes need
    their own caches, made before ``inference()`` (which then only resets them, as on its second call)."""
    layers, heads = shapes.transformer["num_layers"], shapes.transformer["num_heads"]
    head_dim = shapes.transformer["dim"] // heads
    upstream_layout = (pipe.num_transformer_blocks, pipe.frame_seq_length, 12, 128)
    if upstream_layout == (layers, shapes.frame_tokens, heads, head_dim):
        return  # the real shapes: upstream's own caches
    pipe.num_transformer_blocks, pipe.frame_seq_length = layers, shapes.frame_tokens
    size = pipe.local_attn_size * shapes.frame_tokens

    def zeros(length: int) -> torch.Tensor:
        return torch.zeros(1, length, heads, head_dim, device=device, dtype=dtype)

    index = lambda: torch.zeros(1, dtype=torch.long, device=device)  # noqa: E731
    pipe.kv_cache1 = [dict(k=zeros(size), v=zeros(size), global_end_index=index(), local_end_index=index())
                      for _ in range(layers)]
    pipe.crossattn_cache = [dict(k=zeros(shapes.text_len), v=zeros(shapes.text_len), is_init=False)
                            for _ in range(layers)]


def upstream_video(pipe: Any, shapes: Shapes, latents: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One call of upstream's inference() on fresh noise, its per-step prints swallowed; frames on the host."""
    noise = torch.randn(1, latents, 16, shapes.height // 8, shapes.width // 8, device=device, dtype=dtype)
    with contextlib.redirect_stdout(io.StringIO()):
        video = pipe.inference(noise=noise, text_prompts=["benchmark"])
    return video


def run_upstream(root: Path, shapes: Shapes, frames: int, warmup_frames: int, device: torch.device) -> dict:
    """Time one whole upstream video (plus a warm-up one): wall clock, per-block times, decode, host copy."""
    latents = latent_frames_for(frames)
    if latents > ROPE_FRAMES:
        raise Skip(f"upstream: {latents} latent frames exceed its {ROPE_FRAMES}-position RoPE table")
    up = UpstreamImport.load(root)
    notes = up.notes + check_upstream_config(up.root)
    dtype = torch.bfloat16  # upstream's inference dtype; its attention casts to bf16 whatever the model's
    pipe = build_upstream(up, shapes, device, dtype)
    clock = Clock(device)
    if warmup_frames:
        upstream_video(pipe, shapes, latent_frames_for(warmup_frames), device, dtype)
    clock.reset_peak()
    blocks = BlockClock(pipe.generator, len(pipe.denoising_step_list) + 1, clock)
    start = clock.now()
    video = upstream_video(pipe, shapes, latents, device, dtype)
    decoded = clock.now()
    host = video.cpu()  # its inference.py moves the frames to the host before writing them
    end = clock.now()
    blocks.remove()
    block_s = blocks.block_seconds()
    decode_s = decoded - blocks.marks[-1]
    steady = block_s[1:]
    steady_s = sum(steady) + decode_s * len(steady) / len(block_s)  # the end-of-run decode, spread over blocks
    row = dict(
        frames=int(host.shape[1]),
        seconds_total=end - start,
        decode_s=decode_s,
        host_copy_s=end - decoded,
        blocks=len(block_s),
        block_ms_median=median_ms(steady),
        block_ms=[1000 * s for s in block_s],
        ms_per_12_frames=median_ms(steady) + 1000 * decode_s / len(block_s) if steady else None,
        fps_steady=STEADY_FRAMES * len(steady) / steady_s if steady else None,
        peak_memory_bytes=clock.peak_bytes(),
        resident_memory_bytes_at_start=clock.resident_at_reset,
        notes=notes,
    )
    if steady:
        notes.append(f"median block {row['block_ms_median']:.1f} ms without decode; decode at the end "
                     f"{decode_s:.2f} s, frames to the host {row['host_copy_s']:.2f} s")
    del pipe, video, host
    return row


# ---------------------------------------------------------------------------------------------------------------
# genkv


def run_genkv(system: str, shapes: Shapes, frames: int, warmup_frames: int, device: torch.device) -> dict:
    """Time one whole genkv video (plus a warm-up one) on a fresh random-weight pipeline set up as ``genkv render``."""
    import genkv
    import genkv.keep.tempcache as tempcache
    import genkv.processors as processors

    name, method = split_system(system)
    variant = GENKV_VARIANTS[name]
    off = switches_off(system)
    pair_scores_kernel = norm_rope_kernel = None
    if "pairs" not in off:
        from genkv.kernels import pair_scores as pair_scores_kernel
    if "normrope" not in off:
        from genkv.kernels import qk_norm_rope as norm_rope_kernel
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe, embeds = build_pipeline(shapes.genkv_model, device, dtype)
    genkv.apply_genkv(pipe, parse_spec(method))
    if variant["decoder"] == "taehv":  # TAEHV's architecture at random weights, in the dtype genkv runs it in
        from genkv.pipelines.self_forcing.taehv import TAEHVDecoder

        taehv_dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe.set_decoder(TAEHVDecoder().to(device=device, dtype=taehv_dtype).eval()
                         .use_channels_last("taehv-cl" not in off))
    if variant["fp8"]:
        try:  # before compiling, as `genkv render --fp8 --compile`: Inductor fuses the activation quantization
            pipe.enable_fp8(keep_originals=None, row_kernel=variant.get("row_kernel"))
        except RuntimeError as err:
            raise Skip(f"{system}: {err}") from None
    # the default-on kernels, per row whatever the environment says (a row's ~SWITCH turns one off: diffusers'
    # block forward, the compiled merge scores, an NCHW TAEHV, the unfused q/k norm + RoPE)
    pipe.enable_fused_blocks("adaln" not in off)
    tempcache._PAIR_SCORES_KERNEL = pair_scores_kernel
    processors._NORM_ROPE = norm_rope_kernel
    if variant["compile"]:
        pipe.enable_compile()
    elif variant.get("fast_decode", False):
        pipe.enable_fast_decode()  # the compiled path's decoder, eager blocks
    if not variant["compile"] and variant.get("graphs", False):
        pipe.cuda_graphs = True  # as `genkv render --cuda-graphs` (a CPU says why not, once, and renders eagerly)
    clock = Clock(device)
    if warmup_frames:
        for _ in pipe.stream(prompt_embeds=embeds, num_frames=warmup_frames,
                             generator=torch.Generator(device=device).manual_seed(1)):
            pass
    clock.reset_peak()
    chunks: list[tuple[int, float]] = []  # (frames, seconds) per yielded chunk
    start = last = clock.now()
    for video in pipe.stream(prompt_embeds=embeds, num_frames=frames,
                             generator=torch.Generator(device=device).manual_seed(0)):
        # stream() hands over host frames, so the chunk's GPU work is done: read the wall clock without draining
        # the device. With the overlapped decode the next chunk's denoising is already queued when a chunk comes
        # out; a synchronize here would idle the GPU while the host refills the queue, a cost no user of
        # stream() pays (it made this row ~3% slower than bench_rollout's, 2026-12-05).
        now = time.perf_counter()
        chunks.append((len(video), now - last))
        last = now
    end = clock.now()
    # The first chunk is shorter (9 frames) and warms the window; the last may be partial or only the flush of the
    # overlapped decode.
    steady = chunks[1:-1] if len(chunks) > 2 else chunks[1:]
    row = dict(
        frames=sum(n for n, _ in chunks),
        seconds_total=end - start,
        chunks=len(chunks),
        chunk_ms=[1000 * s for _, s in chunks],
        ms_per_12_frames=median_ms([s for n, s in steady if n == STEADY_FRAMES]),
        fps_steady=sum(n for n, _ in steady) / sum(s for _, s in steady) if steady else None,
        peak_memory_bytes=clock.peak_bytes(),
        resident_memory_bytes_at_start=clock.resident_at_reset,
        notes=[],
    )
    stats = genkv.cache_stats(pipe)
    row["kv_bytes"] = stats["bytes"]  # the self-attention cache's buffers at the end (codes + scales, staging)
    row["kv_history_bytes"] = stats["used_bytes"]  # the committed tokens' K/V alone (compare across kv_dtype)
    genkv.remove_genkv(pipe)
    del pipe, embeds
    if variant["compile"]:
        torch._dynamo.reset()
    return row


# ---------------------------------------------------------------------------------------------------------------
# Rows, table, JSON


def settings_of(system: str, shapes: Shapes) -> str:
    """The settings column: what each system ran with beyond the shared shapes."""
    if system == "upstream":
        return f"causal_inference, local_attn {WINDOW_FRAMES} sink 0, SDPA, decode at end"
    if system == "flashdreams":
        return "self-forcing-wan2.1-t2v-1.3b recipe"
    name, method = split_system(system)
    variant = GENKV_VARIANTS[name]
    flags = [flag for flag, on in (("--compile", variant["compile"]), ("--cuda-graphs", variant.get("graphs", False)),
                                   ("(fast decode)", variant.get("fast_decode", False)),
                                   ("--fp8", variant["fp8"]),
                                   ("(GENKV_FP8_ROW_KERNEL=0)", variant.get("row_kernel") is False),
                                   ("(" + " ".join(f"{SWITCH_ENV[switch]}=0" for switch in SWITCHES
                                                   if switch in switches_off(system)) + ")",
                                    bool(switches_off(system))),
                                   ("--decoder taehv", variant["decoder"] == "taehv")) if on]
    return " ".join([method, *flags]) if flags else f"{method}, eager"


def _has(module: str, requirement: str) -> bool:
    """Whether ``module`` imports here at the major version ``requirement`` asks for (``name>=N``, else any)."""
    if importlib.util.find_spec(module) is None:
        return False
    if ">=" not in requirement:
        return True
    name, _, least = requirement.partition(">=")
    return int(importlib.metadata.version(name).split(".")[0]) >= int(least)


def flashdreams_status() -> str:
    """Why FlashDreams' Self-Forcing recipe has no row here, with what this machine has installed."""
    if importlib.util.find_spec("flashdreams") is not None and importlib.util.find_spec("self_forcing") is not None:
        return "flashdreams: the framework and a self_forcing plugin are installed, but bench_peers has no adapter yet"
    missing = [wheel for module, wheel in FLASHDREAMS_NEEDS.items() if not _has(module, wheel)]
    installed = "installed" if importlib.util.find_spec("flashdreams") is not None else "not installed"
    return (f"{FLASHDREAMS_REASON}; flashdreams {installed} here"
            + (f", and it would need {', '.join(missing)}, absent here" if missing else ""))


def run_system(system: str, shapes: Shapes, args: argparse.Namespace, device: torch.device) -> dict:
    """One row: the system's measurements, or ``skipped`` with the reason."""
    row: dict[str, Any] = dict(system=system, settings=settings_of(system, shapes), frames_requested=args.frames)
    try:
        if system == "flashdreams":
            raise Skip(flashdreams_status())
        if system == "upstream":
            checkout = find_checkout(args.self_forcing)
            if checkout is None:
                raise Skip("upstream: no Self-Forcing checkout (--self-forcing DIR, env GENKV_SELF_FORCING or "
                           ".peers/Self-Forcing)")
            row.update(run_upstream(checkout, shapes, args.frames, args.warmup_frames, device))
        else:
            row.update(run_genkv(system, shapes, args.frames, args.warmup_frames, device))
        row["fps_total"] = row["frames"] / row["seconds_total"]
    except Skip as reason:
        row["skipped"] = str(reason)
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> list[dict]:
    """Each measured row's frames/s over upstream's (whole run and steady); None where upstream did not run."""
    upstream = next((r for r in rows if r["system"] == "upstream" and "skipped" not in r), None)
    for row in rows:
        if "skipped" in row:
            continue
        for key, fps in (("ratio_total", "fps_total"), ("ratio_steady", "fps_steady")):
            ok = upstream is not None and row.get(fps) and upstream.get(fps)
            row[key] = row[fps] / upstream[fps] if ok else None
    return rows


def _num(value: float | None, fmt: str, width: int) -> str:
    return f"{value:{width}{fmt}}" if value is not None else f"{'-':>{width}s}"


def format_table(rows: list[dict]) -> str:
    """One line per system: frames, frames/s (run, steady), ms per 12 frames, peak GiB, genkv's KV cache GiB,
    x upstream (run, steady)."""
    header = (f"{'system':30s} {'settings':60s} {'frames':>6s} {'fps run':>8s} {'fps steady':>10s} "
              f"{'ms/12 fr':>8s} {'peak GiB':>8s} {'KV GiB':>7s} {'x up run':>8s} {'x up st.':>8s}")
    lines = [header, "-" * len(header)]
    for row in rows:
        if "skipped" in row:
            lines.append(f"{row['system']:30s} skipped: {row['skipped']}")
            continue
        peak, kv = row.get("peak_memory_bytes"), row.get("kv_bytes")
        lines.append(
            f"{row['system']:30s} {row['settings']:60s} {row['frames']:6d} {_num(row['fps_total'], '.2f', 8)} "
            f"{_num(row.get('fps_steady'), '.2f', 10)} {_num(row.get('ms_per_12_frames'), '.1f', 8)} "
            f"{_num(peak / 2**30 if peak else None, '.2f', 8)} {_num(kv / 2**30 if kv else None, '.2f', 7)} "
            f"{_num(row.get('ratio_total'), '.2f', 8)} "
            f"{_num(row.get('ratio_steady'), '.2f', 8)}"
        )
        for note in row.get("notes", []):
            lines.append(f"{'':30s}   note: {note}")
    return "\n".join(lines)


def previous_rows(path: Path | None, running: list[str]) -> list[dict]:
    """``--merge``: the rows of an earlier run's JSON for the systems this run does not redo."""
    if path is None or not path.is_file():
        return []
    return [row for row in json.loads(path.read_text()).get("rows", []) if row["system"] not in running]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--self-forcing", type=Path, default=None, help="upstream Self-Forcing checkout")
    parser.add_argument("--frames", type=int, default=2000, help="output frames per timed video")
    parser.add_argument("--warmup-frames", type=int, default=120, help="frames of the warm-up video (0: none)")
    parser.add_argument("--systems", nargs="+", type=system_name, default=list(SYSTEMS),
                        help="which systems, in order; a genkv one may end in @fastar (genkv's sparse method) "
                        "instead of upstream's rolling window (@rolling, the default)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here (after each system)")
    parser.add_argument("--merge", action="store_true", help="keep --json's rows of systems not run this time")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (64x64, 2 layers): CPU plumbing test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.frames < 1 or args.warmup_frames < 0:
        parser.error("--frames must be positive and --warmup-frames not negative")

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as bench_rollout, for every system alike
    # (a context, not torch.set_grad_enabled(False): tests call main() in-process, and a process-wide switch
    # left autograd off for every later test)
    with torch.no_grad():
        return _run(args, device)


def _run(args: argparse.Namespace, device: torch.device) -> int:
    """Every system in turn; the table and JSON (see :func:`main`)."""
    shapes = make_shapes(args.tiny)
    kept = previous_rows(args.json, args.systems) if args.merge else []
    rows: list[dict] = []
    for system in args.systems:
        rows.append(run_system(system, shapes, args, device))
        add_ratios(kept + rows)  # against an upstream row run earlier, this time or in the merged JSON
        print(format_table(rows[-1:]), flush=True)
        if args.json is not None:
            write_json(args.json, device, shapes, kept + rows)
    rows = add_ratios(kept + rows)
    print()
    print(f"{shapes.height}x{shapes.width}, {WINDOW_FRAMES}-latent-frame window, {CHUNK_FRAMES}-frame chunks, "
          f"{len(UPSTREAM_SETTINGS['denoising_step_list'])} steps, {args.frames} frames requested")
    print(format_table(rows))
    if args.json is not None:
        write_json(args.json, device, shapes, rows)
    return 0


def write_json(path: Path, device: torch.device, shapes: Shapes, rows: list[dict]) -> None:
    write_result(path, device, model=shapes.genkv_model, height=shapes.height, width=shapes.width,
                 window_frames=WINDOW_FRAMES, chunk_frames=CHUNK_FRAMES,
                 denoising_steps=UPSTREAM_SETTINGS["denoising_step_list"], rows=rows)


if __name__ == "__main__":
    sys.exit(main())
