"""``SelfForcingPipeline``: chunk-causal Wan2.1 video generation with a KV cache, streamed chunk by chunk."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, WanTransformer3DModel
from diffusers.utils import BaseOutput
from torch.profiler import record_function

from genkv.api import apply_genkv, get_store, is_patched

from .checkpoint import load_self_forcing_checkpoint
from .fused_block import FUSED_ADALN, apply_fused_blocks, remove_fused_blocks
from .numerics import apply_self_forcing_numerics
from .noise import NOISE_MODES, RolloutNoise
from .scheduler import SelfForcingScheduler
from .vae_stream import StreamingVAEDecoder, to_uint8_frames


@dataclass
class SelfForcingPipelineOutput(BaseOutput):
    """``frames``: (B, T, H, W, 3) float in [0, 1] for ``"np"``, uint8 for ``"uint8"``, lists of PIL images for
    ``"pil"``, a (B, T, 3, H, W) float tensor for ``"pt"``, latents (B, C, T, h, w) for ``"latent"``."""

    frames: Any


def prompt_lengths(embeds: torch.Tensor) -> torch.Tensor:
    """Real tokens per prompt: Wan zero-pads prompt embeddings to the model's text length."""
    return (embeds.abs().amax(dim=-1) > 0).sum(dim=-1)


def _clean_prompt(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class SelfForcingPipeline(DiffusionPipeline):
    """Autoregressive Wan2.1 text-to-video as Self-Forcing / CausVid / LongLive sample it.

    The video is generated in chunks of ``num_frames_per_chunk`` latent frames. Each chunk is denoised in the
    scheduler's few steps (flow prediction → x0 → re-noise), every forward attending to the KV cache of earlier
    chunks plus the chunk itself (no mask inside a chunk). Then one forward on the clean x0 at ``t = 0`` writes
    the chunk's clean K/V into the cache. The cache is whatever genkv method is applied (``full`` if none);
    the VAE decodes each chunk as soon as it is ready, its causal cache carried from chunk to chunk.

    ``noise`` (constructor default, overridable per call): ``"chunk"`` draws each chunk's noise when the chunk
    starts, in genkv's (B, C, F, h, w) layout; ``"upstream"`` draws in upstream Self-Forcing's order, shapes and
    dtype (the whole video's (B, T, C, h, w) noise first, then each re-noise), so upstream's seed reproduces
    upstream's video (see :mod:`genkv.pipelines.self_forcing.noise` and :func:`to_upstream_layout`).

    Example:
        >>> import genkv
        >>> from genkv.testing import tiny_self_forcing_pipeline
        >>> pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=0), "rolling", window_frames=6)
        >>> chunks = [f.shape for f in pipe.stream("a blue square falling", num_frames=33)]
        >>> chunks[0], sum(s[0] for s in chunks)
        ((9, 64, 64, 3), 33)
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["tokenizer", "text_encoder"]

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        transformer: WanTransformer3DModel,
        vae: AutoencoderKLWan,
        scheduler: SelfForcingScheduler,
        num_frames_per_chunk: int = 3,
        default_height: int = 480,
        default_width: int = 832,
        max_sequence_length: int = 512,
        default_guidance_scale: float = 1.0,
        noise: str = "chunk",
        first_frame_independent: bool = False,
    ) -> None:
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
        )
        self.register_to_config(
            num_frames_per_chunk=num_frames_per_chunk,
            default_height=default_height,
            default_width=default_width,
            max_sequence_length=max_sequence_length,
            default_guidance_scale=default_guidance_scale,
            noise=noise,
            first_frame_independent=first_frame_independent,
        )
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {', '.join(map(repr, NOISE_MODES))}, got {noise!r}")
        apply_self_forcing_numerics(transformer)
        #: How many blocks run their norm stretches fused (``fused_block``: residual + LayerNorm + modulation, and
        #: the FP8 codes, in one pass each; CUDA, half precision; elsewhere diffusers' forward runs). On unless
        #: ``GENKV_FUSED_ADALN=0``; :meth:`enable_fused_blocks` turns it on or off.
        self.fused_blocks = apply_fused_blocks(transformer) if FUSED_ADALN else 0
        #: Decode with channels-last 3-D convolutions (cuDNN tensor-core path): 259 vs 312 ms per chunk on an
        #: H100 at 480x832, same output up to bf16 rounding. Off by default so the default path is the reference.
        self.decode_channels_last = False
        #: Latent frames per VAE decoder call (None: a chunk's frames in one call; 1: one at a time, as upstream).
        #: Same pixels (exactly, in float64); 3x faster for the sprite model's VAE on a CPU.
        self.decode_frames_per_call: int | None = None
        #: Decode the causal 3-D convolutions as per-tap 2-D ones (``vae_conv.apply_conv2d_taps``); same output
        #: up to the order of the sum. Off by default until measured on a GPU.
        self.decode_conv2d_taps = False
        #: The decoder's RMS norms as one fused pass each (``vae_norm.apply_fused_norms``, compiled on CUDA);
        #: float32 inside with one rounding, so equal to the plain path up to bf16 rounding.
        self.decode_fused_norms = False
        #: With the per-tap convolutions: add the taps and the bias in one pass (``genkv.kernels.tap_sum``; float32,
        #: one rounding) instead of an ``add_`` per tap and a separate bias add. On in :meth:`enable_compile`.
        self.decode_fused_tap_sum = False
        #: The up-samplers' 2x nearest upsample + 3x3 conv as one stride-2 transposed conv
        #: (``vae_upsample``; 16 instead of 36 multiply-adds a pixel, same output up to the order of the sums).
        #: On in :meth:`enable_compile`.
        self.decode_transposed_upsample = False
        #: The residual blocks with each norm + SiLU as one pass and the shortcut added inside the second conv's tap
        #: sum (``vae_block``; each where its pieces are on). On in :meth:`enable_compile`.
        self.decode_fused_blocks = False
        #: Record each distinct transformer forward as a CUDA graph and replay it for every later forward that
        #: does the same (``step_graph.ChunkGraphs``): same kernels, without launching them from Python again.
        #: With a fixed-layout method (``fastar``, ``tempcache``) a whole video runs on one or two graphs.
        self.cuda_graphs = False
        #: With the decode overlapped: queue a chunk's decode as soon as its latents are final (True: it fills the
        #: GPU while the host waits on the commit) or after its commit (False: it runs under the next chunk's
        #: first, launch-bound forward and its graph recording). None: early unless ``cuda_graphs``.
        self.decode_early: bool | None = None
        self._model_dtype: torch.dtype | None = None  # the transformer's dtype, cached by rollout()
        #: The decoder of frames from latents: None for the model's own VAE, or a TAEHV tiny decoder
        #: (:meth:`set_decoder`).
        self.taehv = None
        #: The device that decodes (and encodes context frames), when it is not the one that denoises
        #: (:meth:`set_vae_device`); None: the pipeline's device.
        self.vae_device: torch.device | None = None
        self.fp8_layers = 0  # linear layers running in FP8 (:meth:`enable_fp8`)
        #: The last rollout's graph recorder (captures, replays, and why graphs were off, if they were).
        self.last_graphs = None
        self.vae_scale_factor_temporal = getattr(vae.config, "scale_factor_temporal", 4)
        self.vae_scale_factor_spatial = getattr(vae.config, "scale_factor_spatial", 8)

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        checkpoint: str | Path | None = None,
        *,
        use_ema: bool = True,
        torch_dtype: torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        scheduler: SelfForcingScheduler | None = None,
        **kwargs: Any,
    ) -> "SelfForcingPipeline":
        """Load from a saved ``SelfForcingPipeline`` or a Wan2.1 diffusers folder (+ a Self-Forcing checkpoint).

        ``checkpoint`` is upstream's ``self_forcing_dmd.pt`` (``generator_ema`` by default, ``use_ema=False``
        for ``generator``; a file without the one asked for is an error, never the other one silently); its
        weights replace the folder's transformer weights after conversion. ``scheduler``, if given, is used
        as it is and the folder's scheduler is not loaded (so a folder saved with a custom scheduler class
        loads where that class cannot be imported).

        Example::

            pipe = SelfForcingPipeline.from_pretrained(
                "Wan2.1-T2V-1.3B-Diffusers", checkpoint="self_forcing_dmd.pt", torch_dtype=torch.bfloat16
            ).to("cuda")
        """
        dtype = dtype or torch_dtype  # diffusers 0.42 renamed torch_dtype to dtype; accept both
        path = Path(pretrained_model_name_or_path)
        index_file = path / "model_index.json"
        if path.is_dir() and not index_file.is_file():
            raise FileNotFoundError(f"{str(path)!r} has no model_index.json; pass a diffusers model folder")
        class_name = json.loads(index_file.read_text()).get("_class_name") if index_file.is_file() else cls.__name__
        if class_name == cls.__name__:
            if scheduler is not None:
                # None skips the folder's scheduler entirely: diffusers would otherwise still import the class it
                # names to check the given one against it. The given scheduler is set just below.
                kwargs["scheduler"] = None
            pipe = super().from_pretrained(pretrained_model_name_or_path, dtype=dtype, **kwargs)
            if scheduler is not None:
                pipe.scheduler = scheduler
        else:
            # A Wan2.1 T2V folder (WanPipeline layout): take its components, bring our scheduler.
            from transformers import AutoTokenizer, UMT5EncoderModel

            kwargs.pop("scheduler", None)
            pipe = cls(
                tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer"),
                text_encoder=UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype),
                transformer=WanTransformer3DModel.from_pretrained(path, subfolder="transformer", dtype=dtype),
                vae=AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=dtype),
                scheduler=scheduler or SelfForcingScheduler(),
                **kwargs,
            )
        if checkpoint is not None:
            load_self_forcing_checkpoint(pipe.transformer, checkpoint, use_ema=use_ema)
        return pipe

    # -- text ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(
        self, prompt: str | list[str], device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """UMT5 embeddings (B, max_sequence_length, text_dim), zero beyond each prompt's tokens (as WanPipeline)."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder; pass prompt_embeds instead of prompt")
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [_clean_prompt(p) for p in prompts]
        length = self.config.max_sequence_length
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask
        encoder_device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(tokens.input_ids.to(encoder_device), mask.to(encoder_device)).last_hidden_state
        hidden = hidden.to(device=device, dtype=dtype or self.transformer.dtype)
        keep = mask.to(device).unsqueeze(-1).to(hidden.dtype)
        return hidden * keep

    # -- geometry ------------------------------------------------------------------------------------
    def latent_frames_for(self, num_frames: int, context_frames: int = 0) -> int:
        """Latent frames needed for ``num_frames`` video frames, rounded up to whole chunks; with
        ``context_frames`` given latent frames first (image / video context), those plus whole generated chunks.

        Example:
            >>> from genkv.testing import tiny_self_forcing_pipeline
            >>> pipe = tiny_self_forcing_pipeline()
            >>> pipe.latent_frames_for(21), pipe.latent_frames_for(21, context_frames=1)
            (6, 7)
        """
        latent = 1 + math.ceil((num_frames - 1) / self.vae_scale_factor_temporal)
        chunk = self.config.num_frames_per_chunk
        if context_frames:
            return context_frames + chunk * math.ceil(max(latent - context_frames, 0) / chunk)
        return chunk * math.ceil(latent / chunk)

    #: The decoder options :meth:`enable_compile` turns on (benchmarks set the same ones for "the fast VAE").
    FAST_DECODE_FLAGS = ("decode_channels_last", "decode_conv2d_taps", "decode_fused_norms", "decode_fused_tap_sum",
                         "decode_transposed_upsample", "decode_fused_blocks")

    def enable_compile(self, mode: str | None = None, cuda_graphs: bool | None = None) -> "SelfForcingPipeline":
        """The opt-in fast path: compiled transformer blocks; VAE decoding channels-last, a chunk per decoder call,
        causal 3-D convolutions as per-tap 2-D ones (206 ms against 272 ms a chunk for the Wan VAE at 480x832 on
        an H200, bf16; each exact in float64, docs/BENCHMARKS.md "Real time"), its RMS norms fused, each
        convolution's taps, bias and residual summed in one pass, each norm + SiLU one pass, and its up-samplers'
        upsample + 3x3 conv as one transposed conv (the last three: 114.7 against 164.5 ms a chunk on an H100).
        ``cuda_graphs``: also replay recorded forwards from CUDA graphs (:attr:`cuda_graphs`; None: on when the
        transformer is on a CUDA device); a fixed-layout method (``fastar``) then runs a whole video on two graphs.
        Over 2000 frames of ``fastar`` on an H100 the fast path made 33.45 frames/s, 2.26x upstream Self-Forcing's
        loop in the same run (docs/BENCHMARKS.md, 2026-12-05).

        The first chunk after this pays the compilation (about 15 s for Wan2.1-1.3B on an H100).
        """
        from genkv.compile import compile_transformer

        compile_transformer(self.transformer, mode=mode)
        self.enable_fast_decode()
        if cuda_graphs is None:
            cuda_graphs = self.transformer.device.type == "cuda"
        self.cuda_graphs = cuda_graphs
        return self

    def enable_fast_decode(self, enabled: bool = True) -> "SelfForcingPipeline":
        """The Wan VAE decoder's fast path without compiling the transformer (what :meth:`enable_compile` turns
        on for the decoder): channels-last, per-tap 2-D convolutions with their taps, bias and residual summed in
        one pass, fused RMS norms and norm + SiLU passes, transposed up-samplers (:attr:`FAST_DECODE_FLAGS`).
        Each equals the plain decoder in float64; in bf16 they differ by the order of their sums.
        ``enabled=False`` gives the reference decoder back.

        Example:
            >>> from genkv.testing import tiny_self_forcing_pipeline
            >>> pipe = tiny_self_forcing_pipeline(seed=0).enable_fast_decode()
            >>> all(getattr(pipe, flag) for flag in pipe.FAST_DECODE_FLAGS)
            True
        """
        for flag in self.FAST_DECODE_FLAGS:
            setattr(self, flag, enabled)
        return self

    def set_decoder(self, decoder: "str | torch.nn.Module" = "wan", weights: "str | Path | None" = None,
                    dtype: torch.dtype | None = None) -> "SelfForcingPipeline":
        """Choose what turns latents into frames: ``"wan"`` (the model's VAE, the default and the reference) or
        ``"taehv"``, the TAEHV tiny streaming decoder (``pipelines/self_forcing/taehv.py``; ~11x cheaper per
        chunk than the Wan VAE on an H200, with its own, softer reconstruction) loaded from ``weights`` (the
        published ``taew2_1.safetensors`` / ``taew2_1.pth``; genkv never downloads them), in ``dtype`` (default
        fp16 on CUDA, fp32 on the CPU). A :class:`~genkv.pipelines.self_forcing.taehv.TAEHVDecoder` instance
        is used as it is.

        Example:
            >>> from genkv.testing import tiny_self_forcing_pipeline
            >>> from genkv.pipelines.self_forcing.taehv import TAEHVDecoder
            >>> pipe = tiny_self_forcing_pipeline(seed=0)
            >>> pipe = pipe.set_decoder(TAEHVDecoder())                   # random weights: a smoke test
            >>> pipe("a red circle", num_frames=9, output_type="uint8").frames.shape[1]
            9
            >>> pipe.set_decoder("wan").taehv is None
            True
        """
        from .taehv import TAEHVDecoder

        if isinstance(decoder, TAEHVDecoder):
            self.taehv = decoder
            return self
        if decoder == "wan":
            self.taehv = None
            return self
        if decoder != "taehv":
            raise ValueError(f"decoder must be 'wan' or 'taehv' (or a TAEHVDecoder), got {decoder!r}")
        if weights is None:
            raise ValueError("decoder='taehv' needs weights=PATH (taew2_1.safetensors or taew2_1.pth from "
                             "https://github.com/madebyollin/taehv; genkv never downloads weights)")
        device = self.vae_device or self.transformer.device
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.taehv = TAEHVDecoder.from_file(Path(weights), device=device, dtype=dtype)
        return self

    def set_vae_device(self, device: "str | torch.device | None") -> "SelfForcingPipeline":
        """Decode on another device (LongLive 2.0's ``vae_device``): ``pipe.set_vae_device("cuda:1")``.

        The VAE (and a TAEHV decoder, :meth:`set_decoder`) move there; each chunk's final latents are copied over
        on a copy stream of that device and decoded on a side stream there, while the pipeline's device denoises
        the next chunk; context frames (``image=`` / ``video=``) are encoded there too. The frames are the same
        values as decoding on one device (the same kernels on the same inputs). ``output_type="pt"`` frames are
        on the VAE's device. ``None`` decodes on the pipeline's device again (the VAE stays where it is until
        :meth:`to` moves it). A device that does not exist is a one-line ``ValueError``.

        Example:
            >>> from genkv.testing import tiny_self_forcing_pipeline
            >>> pipe = tiny_self_forcing_pipeline(seed=0).set_vae_device("cpu")
            >>> pipe.vae_device, pipe("a red circle", num_frames=9, output_type="uint8").frames.shape[1]
            (device(type='cpu'), 9)
        """
        from .vae_device import resolve_vae_device

        if device is None:
            self.vae_device = None
            return self
        self.vae_device = resolve_vae_device(device)
        self._place_decoder()
        return self

    def _place_decoder(self) -> torch.device | None:
        """Put the VAE and the TAEHV decoder on :attr:`vae_device` (a later :meth:`to` may have moved them)."""
        if self.vae_device is None:
            return None
        for module in (self.vae, self.taehv):
            if module is not None and next(module.parameters()).device != self.vae_device:
                module.to(self.vae_device)
        return self.vae_device

    def enable_fp8(self, keep_originals: str | None = "cpu", *, scaling: str | None = None,
                   fast_accum: bool | None = None, row_kernel: bool | None = None) -> "SelfForcingPipeline":
        """FP8 (e4m3) linear layers in the transformer blocks (:mod:`genkv.fp8`: per-channel weight scales,
        per-token activation scales, ``torch._scaled_mm``). Opt-in: the output changes (a linear's relative error
        is ~3.7e-2). It pays only with :meth:`enable_compile` called after it, which fuses the activation
        quantization into the kernels that produce the activations. Refused in one line where the GPU has no FP8
        (compute capability below 8.9). ``keep_originals``: where the bf16 layers wait for :meth:`disable_fp8`
        ("cpu", "device", or None to free them). ``scaling`` (``"row"`` / ``"tensor"``) and ``fast_accum``: the
        GEMM's scales and accumulation (:func:`genkv.fp8.enable_fp8`; defaults: per row, exact accumulation).
        ``row_kernel`` (default on): per-row quantization of the attention outputs, and of each FFN's GELU fused
        with it, in genkv's one-pass kernel (:class:`genkv.fp8.FP8GeluFeedForward`).

        Example:
            >>> from genkv.testing import tiny_self_forcing_pipeline
            >>> pipe = tiny_self_forcing_pipeline(seed=0).enable_fp8()
            >>> pipe.fp8_layers > 0
            True
            >>> pipe.disable_fp8().fp8_layers
            0
        """
        from genkv.fp8 import enable_fp8

        self.fp8_layers = enable_fp8(self.transformer, keep_originals=keep_originals, scaling=scaling,
                                     fast_accum=fast_accum, row_kernel=row_kernel)
        return self

    def enable_fused_blocks(self, enabled: bool = True) -> "SelfForcingPipeline":
        """Run each Wan block's residual adds, LayerNorms and modulations as three fused passes (``genkv::adaln``;
        with :meth:`enable_fp8` they also write the FP8 codes the next linears read), on CUDA in half precision;
        ``enabled=False`` gives the blocks diffusers' forward back. Same arithmetic as diffusers' block, one
        rounding at each point where it rounds (:mod:`genkv.pipelines.self_forcing.fused_block`).

        Example:
            >>> from genkv.testing import tiny_self_forcing_pipeline
            >>> tiny_self_forcing_pipeline(seed=0).enable_fused_blocks().fused_blocks
            2
        """
        if enabled:
            self.fused_blocks += apply_fused_blocks(self.transformer)
        else:
            remove_fused_blocks(self.transformer)
            self.fused_blocks = 0
        return self

    def disable_fp8(self) -> "SelfForcingPipeline":
        """The transformer's original linear layers back, bit for bit (see :meth:`enable_fp8`)."""
        from genkv.fp8 import disable_fp8

        disable_fp8(self.transformer)
        self.fp8_layers = 0
        return self

    def check_inputs(self, num_frames: int, height: int, width: int) -> None:
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        multiple = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < multiple or value % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")

    # -- generation ----------------------------------------------------------------------------------
    def _flow(
        self,
        sample: torch.Tensor,
        timestep: float,
        embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        guidance_scale: float,
        graphs: Any = None,
        graph_key: Any = None,
    ) -> torch.Tensor:
        t = torch.full((sample.shape[0],), float(timestep), device=sample.device, dtype=torch.float32)
        if graphs is None:
            return self._flow_at(sample, t, embeds, negative_embeds, guidance_scale)
        # Latents and timestep are the graph's inputs; the prompt embeddings stay put for the whole video.
        return graphs.run(
            graph_key, lambda x, t: self._flow_at(x, t, embeds, negative_embeds, guidance_scale), sample, t
        )

    def _flow_at(
        self,
        sample: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        transformer = self.transformer
        x = sample.to(self._model_dtype or transformer.dtype)
        flow = transformer(x, t, embeds, return_dict=False)[0].float()
        if negative_embeds is not None:
            with get_store(transformer).use_branch("uncond"):
                uncond = transformer(x, t, negative_embeds, return_dict=False)[0].float()
            flow = uncond + guidance_scale * (flow - uncond)
        return flow

    @torch.no_grad()
    def rollout(
        self,
        embeds: torch.Tensor,
        num_latent_frames: int,
        height: int,
        width: int,
        *,
        negative_embeds: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        timer_factory: Callable[[], Any] | None = None,
        commit_latents: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        on_denoised: Callable[[torch.Tensor], None] | None = None,
        noise: str | None = None,
        context_latents: torch.Tensor | None = None,
        first_frame_independent: bool | None = None,
        prompt_switches: list[tuple[int, torch.Tensor]] | None = None,
        recache: bool | str = True,
    ) -> Iterator[torch.Tensor]:
        """Yield each chunk's clean latents (B, C, F, h, w) float32, in order; the cache is driven here.

        ``context_latents`` (B or 1, C, Tc, h, w), if given, are clean latent frames (normalised as the model
        sees them: :meth:`encode_frames`) that begin the video, as upstream Self-Forcing's ``initial_latent``:
        each of their blocks is run once through the transformer at timestep 0 (no denoising) and committed,
        exactly like the clean pass after a generated chunk, and yielded as it is; generation continues after
        them in chunks of ``num_frames_per_chunk``. Blocks: with ``first_frame_independent`` (default: the
        config's ``first_frame_independent``) frame 0 is a 1-frame block and the rest come in whole chunks
        (Tc = 1 + 3k), otherwise all in whole chunks (Tc = 3k); another Tc is refused. ``num_latent_frames``
        counts the context frames too. The context draws nothing from ``generator``: noise (and ``latents``,
        which then covers only the generated frames, (B, C, num_latent_frames - Tc, h, w)) starts with the first
        generated chunk, as if it were the video's first.

        ``latents`` (B, C, T, h, w), if given, supplies the initial noise of every chunk (reproducibility
        tests); fresh noise for the re-noising steps still comes from ``generator``. ``noise`` (default: the
        pipeline's ``noise`` config) is the order and layout of the draws: ``"chunk"`` (genkv's) or
        ``"upstream"`` (Self-Forcing's own, so its seed gives its video; see :mod:`.noise`). ``timer_factory`` makes a
        :class:`genkv.profiling.ChunkTimer` per chunk, marked after denoising and after the clean K/V pass;
        the timer is yielded with the chunk's latents as ``self.last_chunk_timer``. ``commit_latents(start,
        x0)``, if given, returns the clean latents whose K/V the cache commits for the chunk starting at latent
        frame ``start`` instead of the generated ``x0`` (teacher forcing: feed every method the same history, as
        ``eval/quality_rollout.py --teacher-forced`` does); the generated ``x0`` is still what is yielded.
        ``on_denoised(x0)``, if given, is called as soon as a chunk's latents are final, before its clean K/V
        pass and commit: :meth:`stream` launches the chunk's decode there, so a side stream has GPU work queued
        while the host waits on the commit's syncs.

        ``prompt_switches`` ``[(latent_frame, embeds), ...]``: from the generated chunk starting at latent frame
        ``latent_frame`` (a chunk boundary after the context, strictly increasing) the prompt is ``embeds``
        ((1, L, text_dim), batch 1 only); ``recache`` (True, False or ``"flush"``) as in :meth:`stream`.
        """
        transformer = self.transformer
        if not is_patched(transformer):
            apply_genkv(transformer, "full")
        store = get_store(transformer)
        device = self._execution_device
        # ModelMixin.dtype walks every module (~2 ms for Wan2.1-1.3B): looked up once per video, not per forward.
        self._model_dtype = transformer.dtype
        cfg = transformer.config
        s = self.vae_scale_factor_spatial
        lat_h, lat_w = height // s, width // s
        tokens_per_frame = (lat_h // cfg.patch_size[1]) * (lat_w // cfg.patch_size[2])
        chunk = self.config.num_frames_per_chunk
        batch = embeds.shape[0]
        sched = self.scheduler
        sigmas = [float(x) for x in sched.sigmas]
        timesteps = [float(x) for x in sched.timesteps]
        if guidance_scale is None:
            guidance_scale = getattr(self.config, "default_guidance_scale", 1.0)
        use_cfg = guidance_scale > 1.0 and negative_embeds is not None

        grid = (lat_h // cfg.patch_size[1], lat_w // cfg.patch_size[2])
        store.reset()
        lengths = {"cond": prompt_lengths(embeds).tolist()}  # one sync per video
        if use_cfg:
            lengths["uncond"] = prompt_lengths(negative_embeds).tolist()
        store.new_prompt(lengths)
        blocks = []  # (first latent frame, frames, given clean latents or None) of every block, in order
        context_frames = 0
        if context_latents is not None:
            if first_frame_independent is None:
                first_frame_independent = bool(getattr(self.config, "first_frame_independent", False))
            context_latents = self._check_context(context_latents, batch, cfg.in_channels, lat_h, lat_w,
                                                  first_frame_independent).to(device)
            context_frames = context_latents.shape[2]
            for start, frames in self.context_blocks(context_frames, first_frame_independent):
                blocks.append((start, frames, context_latents[:, :, start : start + frames].contiguous()))
        if num_latent_frames < context_frames:
            raise ValueError(f"num_latent_frames={num_latent_frames} is fewer than the {context_frames} context "
                             "latent frames (it counts them too)")
        generated = num_latent_frames - context_frames
        blocks += [(context_frames + s, min(chunk, generated - s), None) for s in range(0, generated, chunk)]
        switches = self._check_switches(prompt_switches, recache, blocks, batch, device)
        # Clean latents of the frames the cache holds (frame -> (B, C, 1, h, w)), kept only for a re-cache: pruned
        # after every commit to the frames the keeper still holds (a rolling window's sink + window, never more).
        recache_mode = self._recache_mode(store, recache) if switches else False
        held_latents: dict[int, torch.Tensor] | None = {} if recache_mode is True else None
        block_starts = {s for s, _, _ in blocks}
        self._recache_ring = held_latents  # (tests read it: what a re-cache would re-commit)
        self.last_recached_frames: list[int] | None = None  # frames the last switch re-cached (recache=True)
        noise_source = RolloutNoise(
            noise or getattr(self.config, "noise", "chunk"), (batch, cfg.in_channels, generated, lat_h, lat_w),
            self._model_dtype, device, generator, latents,
        )
        graphs = None
        if self.cuda_graphs:
            from .step_graph import ChunkGraphs

            graphs = ChunkGraphs(device, on_replay=store.replayed)
            blocker = store.graph_blocker()
            if blocker is not None:
                graphs.disable(blocker)
        self.last_graphs = graphs

        def graph_key() -> Any:
            # None for the video's first forward (it allocates the caches) and for host-bound reader paths.
            if graphs is None:
                return None
            signature = store.graph_signature()
            return None if signature is None else (signature[0], use_cfg, signature[1:])

        def commit_block(start: int, frames: int, clean: torch.Tensor) -> None:
            # The t=0 pass over clean latents and the keeper's commit (after a chunk, for context, at a re-cache).
            store.step_index = len(timesteps)
            with store.committing(), record_function("genkv.kv_commit.forward"):
                self._flow(clean, 0.0, embeds, negative_embeds if use_cfg else None, guidance_scale,
                           graphs, graph_key())
            with record_function("genkv.kv_commit.keeper"):
                store.commit(graphs)
            if held_latents is not None:
                for i in range(frames):
                    held_latents[start + i] = clean[:, :, i : i + 1]
                held = self._recache_frames(store, start + frames - 1, tokens_per_frame)
                for f in [f for f in held_latents if f not in held]:
                    del held_latents[f]

        try:
            for start, frames, given in blocks:
                timer = timer_factory() if timer_factory is not None else None
                if start in switches:
                    # CUDA graphs: every forward's key holds the store's prompt version (bumped here) and cache
                    # layout (new buffers after a re-cache), so nothing recorded before the switch is replayed
                    # after it; its forwards are recorded again (and the old layout's graphs freed then).
                    embeds = switches[start]
                    self._switch_prompt(store, embeds, negative_embeds if use_cfg else None, recache_mode,
                                        held_latents, block_starts, tokens_per_frame, grid, commit_block)
                store.begin_chunk(start, frames, tokens_per_frame, grid)
                if given is not None:
                    # A context block: already clean, so only its t=0 pass runs (upstream's initial_latent).
                    if timer is not None:
                        timer.mark("denoise")
                    if on_denoised is not None:
                        on_denoised(given)
                    commit_block(start, frames, given)
                    if timer is not None:
                        timer.mark("kv_commit")
                    self.last_chunk_timer = timer
                    yield given
                    continue
                x = x0 = noise_source.initial(start - context_frames, frames)
                # (record_function ranges name the phases in torch.profiler traces, e.g. eval/profile_ops.py)
                with record_function("genkv.denoise"):
                    for k, (t, sigma) in enumerate(zip(timesteps, sigmas)):
                        store.step_index = k
                        flow = self._flow(x, t, embeds, negative_embeds if use_cfg else None, guidance_scale,
                                          graphs, graph_key())
                        x0 = sched.predict_x0(x, flow, sigma)
                        if k + 1 < len(timesteps):
                            fresh = noise_source.renoise(frames) if sched.config.sampler == "renoise" else None
                            x = sched.next_sample(x, flow, x0, k, fresh)
                if timer is not None:
                    timer.mark("denoise")
                if on_denoised is not None:
                    on_denoised(x0)
                # The clean pass: its only product is the chunk's clean K/V, which the keeper commits.
                clean = x0 if commit_latents is None else commit_latents(start, x0).to(x0)
                commit_block(start, frames, clean)
                if timer is not None:
                    timer.mark("kv_commit")
                self.last_chunk_timer = timer
                yield x0
        finally:
            store.active = False  # buffers stay for cache_stats(); the next rollout resets them
            self._model_dtype = None
            if graphs is not None:
                graphs.release()

    # -- prompt switches -----------------------------------------------------------------------------
    def _switch_frames(self, prompt_switches, num_frames: int, context_frames: int) -> list[tuple[int, Any]]:
        """Output-frame switches -> (first latent frame of the chunk it applies from, text), checked; one
        ``genkv:`` warning when a switch is moved to a chunk boundary."""
        if not prompt_switches:
            return []
        if not isinstance(prompt_switches, (list, tuple)):
            raise ValueError("prompt_switches must be a list of (frame, text) pairs, got "
                             f"{type(prompt_switches).__name__}")
        factor, chunk = self.vae_scale_factor_temporal, self.config.num_frames_per_chunk
        total = self.latent_frames_for(num_frames, context_frames)
        starts = list(range(context_frames, total, chunk))
        if context_frames == 0:
            starts = starts[1:]  # frame 0 begins the video: no switch there
        out, last, moved = [], 0, []
        for item in prompt_switches:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"prompt_switches must be (frame, text) pairs, got {item!r}")
            frame, text = item
            if isinstance(frame, bool) or not isinstance(frame, int) or frame <= 0:
                raise ValueError(f"a prompt switch frame must be an integer > 0, got {frame!r}")
            if frame <= last:
                raise ValueError(f"prompt switch frames must be strictly increasing, got {frame} after {last}")
            if frame >= num_frames:
                raise ValueError(f"prompt switch at frame {frame} is beyond the video's {num_frames} frames")
            if not isinstance(text, (str, torch.Tensor)):
                raise ValueError(f"a prompt switch's prompt must be a string or embeddings, got {type(text).__name__}")
            last = frame
            latent = (frame + factor - 1) // factor  # the latent frame that decodes to this output frame
            start = next((s for s in starts if s >= latent), None)
            if start is None:
                raise ValueError(f"prompt switch at frame {frame}: no chunk starts at or after it (the last starts "
                                 f"at frame {1 + factor * (starts[-1] - 1) if starts else 0})")
            if out and out[-1][0] == start:
                raise ValueError(f"prompt switches at frames {out[-1][2]} and {frame} fall on the same chunk "
                                 f"boundary (frame {1 + factor * (start - 1)})")
            first = 1 + factor * (start - 1)
            if first != frame:
                moved.append(f"{frame} -> {first}")
            out.append((start, text, frame))
        if moved:
            import warnings

            warnings.warn(f"genkv: prompt switches apply at chunk boundaries; moved frame {', '.join(moved)}",
                          stacklevel=4)
        return [(s, t) for s, t, _ in out]

    def _check_switches(self, prompt_switches, recache, blocks, batch, device) -> dict:
        """{latent frame: padded embeds} of rollout's switches, checked (one-line ValueError)."""
        if recache not in (True, False, "flush") or isinstance(recache, int) and not isinstance(recache, bool):
            raise ValueError(f"recache must be True, False or 'flush', got {recache!r}")
        if not prompt_switches:
            return {}
        if batch != 1:
            raise ValueError(f"prompt_switches need a single prompt, got a batch of {batch}")
        starts = [s for s, _, given in blocks if given is None and s > 0]
        switches, last = {}, 0
        for item in prompt_switches:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"prompt_switches must be (latent_frame, embeds) pairs, got {item!r}")
            frame, emb = item
            if frame <= last:
                raise ValueError(f"prompt switch latent frames must be > 0 and strictly increasing, got {frame}")
            if frame not in starts:
                raise ValueError(f"prompt switch at latent frame {frame} is not a generated chunk's first frame "
                                 f"(chunks start at {starts})")
            last = frame
            emb = self.pad_prompt_embeds(emb).to(device=device, dtype=self.transformer.dtype)
            if emb.shape[0] != 1:
                raise ValueError(f"a switch's embeds must be one prompt, got a batch of {emb.shape[0]}")
            switches[frame] = emb
        return switches

    @staticmethod
    def _recache_mode(store, recache: bool | str) -> bool | str:
        """``recache`` as the method can do it: whole-frame caches (full, rolling) re-cache and flush the frames
        they hold; merging keepers (tempcache, fastar) say which frames to re-cache and how to flush
        (``recache_frames`` / ``flush``). Any other keeper keeps its cache, with one warning."""
        from genkv.keep.base import CacheKeeper
        from genkv.keep.full import KeepAll
        from genkv.keep.rolling import SinkWindow

        keeper = store.keeper
        if not recache or type(keeper) in (CacheKeeper, KeepAll, SinkWindow):
            return recache
        if hasattr(keeper, "recache_frames" if recache is True else "flush"):
            return recache
        import warnings

        warnings.warn(f"genkv: recache={recache!r} needs whole cached frames; {keeper.method_name}'s keeper does "
                      "not say how to re-cache its slots, so its switches keep the self-attention cache "
                      "(recache=False)", stacklevel=4)
        return False

    @staticmethod
    def _held_frames(store) -> set[int]:
        """Latent frames whose tokens the (whole-frame) cache holds now."""
        for layers in store.caches.values():
            for cache in layers:
                return set(np.unique(cache.frame_host[: cache.length]).tolist())
        return set()

    @classmethod
    def _recache_frames(cls, store, newest_frame: int, tokens_per_frame: int) -> set[int]:
        """Latent frames a re-cache would commit again after ``newest_frame``'s commit: a merging keeper's rule
        (its slots have no single frame), else the frames the cache holds."""
        keeper = store.keeper
        if hasattr(keeper, "recache_frames"):
            return set(keeper.recache_frames(newest_frame, tokens_per_frame))
        return cls._held_frames(store)

    def _switch_prompt(self, store, embeds, negative_embeds, mode, held_latents, block_starts, tokens_per_frame,
                       grid, commit_block) -> None:
        """A new prompt from the next chunk: new cross-attention K/V (a new prompt version), and the self-attention
        cache re-computed (``mode`` True), flushed to sinks + newest frame ("flush") or kept (False)."""
        lengths = {"cond": prompt_lengths(embeds).tolist()}
        if negative_embeds is not None:
            lengths["uncond"] = prompt_lengths(negative_embeds).tolist()
        if mode == "flush" and hasattr(store.keeper, "flush"):  # merged slots: the keeper's rule
            store.keeper.flush([cache for layers in store.caches.values() for cache in layers])
        elif mode == "flush":
            sinks = getattr(store.keeper, "sink_frames", 0)
            held = self._held_frames(store)
            keep_frames = sorted({f for f in held if f < sinks} | ({max(held)} if held else set()))
            for layers in store.caches.values():
                for cache in layers:
                    keep = np.flatnonzero(np.isin(cache.frame_host[: cache.length], keep_frames))
                    cache.move_tokens(keep, np.arange(len(keep)))
                    cache.length = len(keep)
        store.new_prompt(lengths)
        if mode is not True or not held_latents:
            return
        # LongLive's KV re-cache: a fresh cache, the held frames' clean latents committed again under the new
        # prompt, in their original blocks (the held part of each), each frame at its original RoPE position.
        frames = sorted(held_latents)
        latents = dict(held_latents)
        self.last_recached_frames = frames
        shift, sinks = store.position_shift, getattr(store.keeper, "sink_frames", 0)
        store.empty_caches()  # (a fixed layout refills its own buffers: no second copy of the cache)
        store.new_prompt(lengths)
        held_latents.clear()
        runs: list[list[int]] = []
        for f in frames:
            if runs and f == runs[-1][-1] + 1 and f not in block_starts:
                runs[-1].append(f)
            else:
                runs.append([f])
        for run in runs:
            store.position_shift = shift if run[0] >= sinks else 0
            store.begin_chunk(run[0], len(run), tokens_per_frame, grid)
            commit_block(run[0], len(run), torch.cat([latents[f] for f in run], dim=2))
        store.position_shift = shift

    def context_blocks(self, context_frames: int, first_frame_independent: bool) -> list[tuple[int, int]]:
        """(first frame, frames) of each block the context latents are committed in (upstream's rule): a 1-frame
        block first when ``first_frame_independent``, then whole chunks; a count that does not fit is refused.

        Example:
            >>> from genkv.testing import tiny_self_forcing_pipeline
            >>> pipe = tiny_self_forcing_pipeline()
            >>> pipe.context_blocks(4, True), pipe.context_blocks(6, False)
            ([(0, 1), (1, 3)], [(0, 3), (3, 3)])
        """
        chunk = self.config.num_frames_per_chunk
        head = 1 if first_frame_independent else 0
        if isinstance(context_frames, bool) or context_frames < 1 or (context_frames - head) % chunk:
            rule = (f"1 + a multiple of {chunk} (an independent first frame, then whole chunks)" if head
                    else f"a positive multiple of {chunk} (whole chunks)")
            raise ValueError(f"context latents must have {rule} latent frames, got {context_frames}")
        return [(0, 1)] * head + [(s, chunk) for s in range(head, context_frames, chunk)]

    def _check_context(self, latents: torch.Tensor, batch: int, channels: int, lat_h: int, lat_w: int,
                       first_frame_independent: bool) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            raise ValueError("context_latents must be a (B, C, T, h, w) tensor, got "
                             f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
        b, c, t, h, w = latents.shape
        if c != channels or (h, w) != (lat_h, lat_w) or b not in (1, batch):
            raise ValueError(f"context_latents has shape {tuple(latents.shape)}; expected ({batch} or 1, {channels}, "
                             f"T, {lat_h}, {lat_w}) for this video")
        self.context_blocks(t, first_frame_independent)
        return latents.float().expand(batch, -1, -1, -1, -1)

    # -- image / video context -----------------------------------------------------------------------
    @staticmethod
    def _fit_frames(frames: np.ndarray, height: int, width: int, what: str) -> np.ndarray:
        """Resize (to cover) and centre-crop uint8 frames (T, H, W, 3) to (T, height, width, 3), noting it once."""
        t, h, w, _ = frames.shape
        if (h, w) == (height, width):
            return frames
        import warnings

        from PIL import Image

        warnings.warn(f"genkv: {what} is {w}x{h}; resized and centre-cropped to the render size {width}x{height}",
                      stacklevel=3)
        scale = max(width / w, height / h)
        size = (max(width, math.ceil(w * scale - 1e-6)), max(height, math.ceil(h * scale - 1e-6)))
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        box = (left, top, left + width, top + height)
        return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC).crop(box)) for f in frames])

    @staticmethod
    def load_image(image: Any) -> np.ndarray:
        """A PIL image (converted to RGB), an (H, W, 3) uint8 array or a path → (H, W, 3) uint8."""
        from PIL import Image

        if isinstance(image, (str, Path)):
            try:
                with Image.open(image) as img:
                    image = img.convert("RGB")
            except Exception as error:  # one line, whatever PIL says
                raise ValueError(f"cannot read image {str(image)!r}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        if isinstance(image, torch.Tensor):
            image = image.cpu().numpy()
        if not isinstance(image, np.ndarray):
            raise ValueError(f"image must be a PIL image, an (H, W, 3) uint8 array or a path, got {type(image).__name__}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be (H, W, 3) RGB, got shape {tuple(image.shape)} (wrong number of channels)")
        if image.dtype != np.uint8:
            raise ValueError(f"image must be uint8, got {image.dtype}")
        return image

    @staticmethod
    def load_video(video: Any) -> np.ndarray:
        """A (T, H, W, 3) uint8 array or a video path (:func:`genkv.video.read_frames`) → (T, H, W, 3) uint8."""
        if isinstance(video, (str, Path)):
            from genkv.video import read_frames

            if not Path(video).is_file():
                raise ValueError(f"cannot read video {str(video)!r}: no such file")
            try:
                video = read_frames(video)
            except Exception as error:
                raise ValueError(f"cannot read video {str(video)!r}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
        if isinstance(video, torch.Tensor):
            video = video.cpu().numpy()
        if not isinstance(video, np.ndarray):
            raise ValueError(f"video must be a (T, H, W, 3) uint8 array or a path, got {type(video).__name__}")
        if video.ndim != 4 or video.shape[3] != 3:
            raise ValueError(f"video must be (T, H, W, 3) RGB, got shape {tuple(video.shape)} (wrong number of channels)")
        if video.dtype != np.uint8:
            raise ValueError(f"video must be uint8, got {video.dtype}")
        return video

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames (T, H, W, 3) → normalised latents (1, C, 1 + (T - 1) // 4, h, w) float32 with the Wan VAE
        encoder (its mean, no sampling), ``(z - latents_mean) / latents_std`` as the model sees them (the
        inverse of :meth:`StreamingVAEDecoder.denormalize`). The first frame is its own latent frame (Wan)."""
        vae = self.vae
        device = self._execution_device
        vae_device = self._place_decoder() or device  # encoded where the VAE is (set_vae_device)
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(vae_device).permute(3, 0, 1, 2)[None]
        x = (x.float() / 127.5 - 1.0).to(vae.dtype)
        z = vae.encode(x).latent_dist.mode().float()
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=z.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=z.device).view(1, -1, 1, 1, 1)
        return ((z - mean) / std).to(device)

    def prepare_context(self, image: Any = None, video: Any = None, height: int | None = None,
                        width: int | None = None) -> tuple[torch.Tensor | None, bool]:
        """Context latents and their first-block rule for ``image=`` / ``video=`` (see :meth:`stream`)."""
        if image is not None and video is not None:
            raise ValueError("pass image= (image-to-video) or video= (extension), not both")
        height = height or self.config.default_height
        width = width or self.config.default_width
        if image is not None:
            frames = self._fit_frames(self.load_image(image)[None], height, width, "the image")
            return self.encode_frames(frames), True
        if video is None:
            return None, False
        frames = self.load_video(video)
        chunk, factor = self.config.num_frames_per_chunk, self.vae_scale_factor_temporal
        latent = 1 + (len(frames) - 1) // factor if len(frames) else 0
        if latent < chunk:
            raise ValueError(f"the video to extend has {len(frames)} frames; it needs at least "
                             f"{1 + factor * (chunk - 1)} (one chunk of {chunk} latent frames)")
        kept = chunk * (latent // chunk)  # latent frames of context: whole chunks
        # The last 1 + 4 (kept - 1) frames, encoded from their own first frame, give exactly `kept` latent frames
        # (as the end of a genkv / Wan video decodes from them: the first a single frame, then 4 per latent).
        frames = self._fit_frames(frames[len(frames) - 1 - factor * (kept - 1):], height, width, "the video")
        return self.encode_frames(frames), False

    def _prepare_embeds(
        self,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt: str | list[str] | None,
        negative_prompt_embeds: torch.Tensor | None,
        guidance_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self._execution_device
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("pass prompt or prompt_embeds")
            prompt_embeds = self.encode_prompt(prompt, device)
        prompt_embeds = self.pad_prompt_embeds(prompt_embeds).to(device=device, dtype=self.transformer.dtype)
        if guidance_scale <= 1.0:
            return prompt_embeds, None
        if negative_prompt_embeds is None:
            negative = negative_prompt if negative_prompt is not None else ""
            negative = [negative] * prompt_embeds.shape[0] if isinstance(negative, str) else negative
            negative_prompt_embeds = self.encode_prompt(negative, device)
        negative_prompt_embeds = self.pad_prompt_embeds(negative_prompt_embeds, "negative_prompt_embeds")
        return prompt_embeds, negative_prompt_embeds.to(device=device, dtype=self.transformer.dtype)

    def pad_prompt_embeds(self, embeds: torch.Tensor, name: str = "prompt_embeds") -> torch.Tensor:
        """Zero-pad (B, L, text_dim) embeddings to the text length (``max_sequence_length``, 512 for Wan), as
        :meth:`encode_prompt` returns them and upstream's model pads them: the padding rows are attended too, so
        an unpadded tensor would give another video. More rows than the text length is an error.

        Example:
            >>> from genkv.testing import tiny_self_forcing_pipeline
            >>> pipe = tiny_self_forcing_pipeline()
            >>> pipe.pad_prompt_embeds(torch.ones(1, 5, 32)).shape
            torch.Size([1, 64, 32])
        """
        length = self.config.max_sequence_length
        if embeds.dim() != 3:
            raise ValueError(f"{name} must be (batch, tokens, text_dim), got shape {tuple(embeds.shape)}")
        rows = embeds.shape[1]
        if rows > length:
            raise ValueError(f"{name} has {rows} rows, more than the text length {length}; pass at most {length} "
                             "(encode_prompt's output) or raise max_sequence_length")
        if rows == length:
            return embeds
        return torch.nn.functional.pad(embeds, (0, 0, 0, length - rows))

    def stream(
        self,
        prompt: str | list[str] | None = None,
        num_frames: int = 81,
        height: int | None = None,
        width: int | None = None,
        *,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        on_chunk: Callable[[dict], None] | None = None,
        profile: bool = False,
        overlap_decode: bool | None = None,
        noise: str | None = None,
        image: Any = None,
        video: Any = None,
        prompt_switches: list[tuple[int, Any]] | None = None,
        recache: bool | str = True,
    ) -> Iterator[Any]:
        """Generate and decode chunk by chunk; yield each chunk's new frames as soon as they exist.

        ``image`` (image-to-video: a PIL image, an (H, W, 3) uint8 array or an image path) is resized and
        centre-cropped to ``height`` x ``width`` (with a ``genkv:`` warning when it had another size),
        encoded by the Wan VAE to one latent frame and committed as clean context, a 1-frame first block at
        timestep 0, as upstream Self-Forcing does for its I2V checkpoints (``first_frame_independent=True`` in
        their config: I2V-trained checkpoints do this best; a T2V checkpoint gets the same 1-frame block). The
        first output frame is the image as the VAE reconstructs it. ``video`` (extension: a (T, H, W, 3) uint8
        array or a video path) gives its last ``1 + 4 (n - 1)`` frames as context, n = 3 * floor(T_lat / 3)
        latent frames (T_lat = 1 + (T - 1) // 4, its whole-chunk part) committed in 3-frame blocks; a video of
        fewer than 9 frames (one chunk) is refused. The context's frames come out first (decoded from their
        latents) and ``num_frames`` counts them. The context draws nothing from ``generator`` (see
        :meth:`rollout`). Bad inputs (unreadable path, not 3 channels, both given): one-line ``ValueError``.

        Yields uint8 frames ``[T, H, W, 3]`` per chunk (``[B, T, H, W, 3]`` for several prompts): a numpy array
        for ``output_type="np"``, a torch tensor on the pipeline's device (the VAE's, see :meth:`set_vae_device`)
        for ``"pt"``, or the chunk's clean latents for ``"latent"``. Exactly ``num_frames`` frames come out in all. Memory stays flat with a
        bounded method (``rolling``, ...): no latent or frame is kept once yielded.
        ``on_chunk`` is called after each chunk with ``{"frames_done", "latent_frames_done"}``, plus with
        ``profile=True`` the GPU and host milliseconds of its phases (``denoise``, ``kv_commit``, ``decode``,
        ``to_host``; see :class:`genkv.profiling.ChunkTimer`). Profiling synchronises once per chunk.

        ``overlap_decode`` (default: on for CUDA, unless profiling) decodes each chunk on a side CUDA stream
        while the next chunk is denoised, and copies its frames into pinned host memory there; a chunk's frames
        are then yielded one chunk later, with the same values. When the decode is queued is
        :attr:`decode_early`'s choice; with :attr:`cuda_graphs` the chunk's later forwards replay a graph.

        ``prompt_switches=[(frame, text), ...]`` (LongLive-style prompt switching; one prompt, not a batch):
        output video frames > 0, strictly increasing, below ``num_frames``; ``text`` a string (encoded once) or
        (1, L, text_dim) embeddings. A switch applies from the first generated chunk that starts at or after
        its frame (a ``genkv:`` warning when that moves it); no chunk starting there is an error. At a switch the
        cross-attention K/V are rebuilt for the new prompt (a new prompt version in the store, so no CUDA graph
        recorded before it is replayed after it: graph keys hold the prompt version and the cache layout, and
        the switch's forwards are recorded anew), and ``recache`` says what happens to
        the self-attention cache:

        - ``True`` (default, LongLive's KV re-cache): the cache is emptied and the clean latents of every frame it
          held are committed again under the new prompt (a t=0 pass, block by block as context is: the held
          frames of each original block, each frame at its original RoPE position). ``full`` re-caches the whole
          history; ``rolling`` its sinks + window (the pipeline keeps the clean latents of only the frames the
          window holds). A rolling window that has evicted frames re-caches what it holds: those frames then no
          longer see the evicted ones, as in LongLive.
        - ``False``: the self-attention K/V stay as they are; only cross-attention changes.
        - ``"flush"`` (∞-RoPE's KV flush): the cache keeps only the sink frames (``rolling``'s ``sink_frames``;
          ``full`` has none) and the newest frame, their K/V as they were; everything else is dropped.

        ``tempcache`` and ``fastar`` merge tokens (a merged slot has no single latent), so for them ``True``
        rebuilds the cache from the clean latents of the sink frames and the newest ``budget_frames -
        sink_frames`` frames (what their budget holds unmerged; the pipeline keeps only those), committed again
        through the same merges under the new prompt, older merged history dropped; ``"flush"`` keeps the sink
        frames' slots and every slot the newest frame holds or joined (a merged group belongs to the frame of its
        newest member, whose key it holds), values and counts as they were. ``annsa`` keeps whole frames (``full``'s
        keeper) and re-caches like ``full``.
        """
        height = height or self.config.default_height
        width = width or self.config.default_width
        if guidance_scale is None:  # the model's own default (1.0 = no guidance, as Self-Forcing samples)
            guidance_scale = getattr(self.config, "default_guidance_scale", 1.0)
        self.check_inputs(num_frames, height, width)
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'latent' for stream(), got {output_type!r}")
        if prompt_switches and not isinstance(prompt, (str, type(None))):
            raise ValueError("prompt_switches need one prompt (a string), not a list of prompts (a batch)")
        if recache not in (True, False, "flush") or isinstance(recache, int) and not isinstance(recache, bool):
            raise ValueError(f"recache must be True, False or 'flush', got {recache!r}")
        context, independent = self.prepare_context(image, video, height, width)
        context_frames = 0 if context is None else context.shape[2]
        latent_switches = self._switch_frames(prompt_switches, num_frames, context_frames)
        embeds, negative = self._prepare_embeds(
            prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, guidance_scale
        )
        if latent_switches and embeds.shape[0] != 1:
            raise ValueError(f"prompt_switches need one prompt, got a batch of {embeds.shape[0]}")
        latent_switches = [(f, self.encode_prompt(text, self._execution_device) if isinstance(text, str) else text)
                           for f, text in latent_switches]
        single = embeds.shape[0] == 1
        decoder = None
        if output_type != "latent":
            if self.taehv is not None:
                from .taehv import StreamingTAEHVDecoder

                decoder = StreamingTAEHVDecoder(self.taehv)
            else:
                decoder = StreamingVAEDecoder(self.vae, channels_last=self.decode_channels_last,
                                              frames_per_call=self.decode_frames_per_call,
                                              conv2d_taps=self.decode_conv2d_taps,
                                              fused_norms=self.decode_fused_norms,
                                              fused_tap_sum=self.decode_fused_tap_sum,
                                              transposed_upsample=self.decode_transposed_upsample,
                                              fused_blocks=self.decode_fused_blocks)
        remaining = num_frames
        latent_done = 0
        timer_factory = None
        device = self._execution_device
        if profile:
            from genkv.profiling import ChunkTimer

            timer_factory = lambda: ChunkTimer(device)  # noqa: E731
        decode_device = self._place_decoder() or device  # set_vae_device: decoded on another device
        if overlap_decode is None:
            overlap_decode = decode_device.type == "cuda" and not profile and decoder is not None
        side = torch.cuda.Stream(decode_device) if overlap_decode and decode_device.type == "cuda" else None
        # Latents bound for another GPU cross on a stream of their own there: the peer copy waits for the
        # receiving device's current stream, and the side stream may still be decoding the chunk before.
        copy_in = torch.cuda.Stream(decode_device) if side is not None and decode_device != device else None
        pending: tuple[Any, Any, dict] | None = None  # (frames, ready event, on_chunk info) of the last chunk
        launched: list[tuple[torch.Tensor, Any, Any]] = []  # decodes queued on the side stream, oldest first
        early_decode = self.decode_early if self.decode_early is not None else not self.cuda_graphs

        def decode_on_side(x0: torch.Tensor) -> None:
            # Queues the chunk's decode, uint8 conversion and copy to pinned memory on the side stream. Called
            # by rollout() as soon as the latents are final (early_decode), else after the chunk's commit.
            if copy_in is None:
                side.wait_stream(torch.cuda.current_stream(device))
                x0.record_stream(side)  # x0 was made on the main stream; keep it alive for the side stream
            else:
                with torch.cuda.stream(copy_in):  # ordered after x0's producer on the main stream (torch's rule)
                    x0 = x0.to(decode_device, non_blocking=True)
                side.wait_stream(copy_in)
                x0.record_stream(side)
            with torch.cuda.stream(side), record_function("genkv.decode"):
                video = to_uint8_frames(decoder.decode(x0))[:, :remaining]
                frames = video
                if output_type == "np":
                    frames = torch.empty(video.shape, dtype=video.dtype, pin_memory=True)
                    frames.copy_(video, non_blocking=True)
                event = torch.cuda.Event()
                event.record(side)
            launched.append((video, frames, event))

        def finish(item: tuple[Any, Any, dict]) -> Any:
            frames, event, info = item
            if event is not None:
                event.synchronize()
            if output_type == "np" and isinstance(frames, torch.Tensor):
                frames = frames.numpy()
            if single:
                frames = frames[0]
            if on_chunk is not None:
                on_chunk(info)
            return frames

        chunks = self.rollout(
            embeds,
            self.latent_frames_for(num_frames, context_frames),
            height,
            width,
            negative_embeds=negative,
            guidance_scale=guidance_scale,
            generator=generator,
            latents=latents,
            timer_factory=timer_factory,
            on_denoised=decode_on_side if side is not None and early_decode else None,
            noise=noise,
            context_latents=context,
            first_frame_independent=independent,
            prompt_switches=latent_switches,
            recache=recache,
        )
        try:
            for x0 in chunks:
                timer = self.last_chunk_timer
                latent_done += x0.shape[2]
                info = {"latent_frames_done": latent_done}
                if decoder is None:
                    remaining -= x0.shape[2]
                    info["frames_done"] = latent_done
                    if on_chunk is not None:
                        on_chunk(info)
                    yield x0
                    continue
                event = None
                if side is not None:
                    if not launched:  # launched after the commit (see decode_early)
                        decode_on_side(x0)
                    video, frames, event = launched.pop(0)
                else:
                    with record_function("genkv.decode"):
                        video = to_uint8_frames(decoder.decode(x0.to(decode_device)))[:, :remaining]
                    if timer is not None:
                        timer.mark("decode")
                    frames = video.cpu() if output_type == "np" else video
                    if timer is not None:
                        timer.mark("to_host")
                        info.update(timer.finish())
                remaining -= video.shape[1]
                info["frames_done"] = num_frames - max(remaining, 0)
                if pending is not None:
                    yield finish(pending)
                    pending = None
                if side is None:
                    yield finish((frames, None, info))
                else:
                    pending = (frames, event, info)  # yielded after the next chunk is launched
                if remaining <= 0:
                    break
        except GeneratorExit:
            raise
        except BaseException:
            # An error or Ctrl-C while the next chunk was being made: the decoded chunk still comes out.
            if pending is not None:
                yield finish(pending)
                pending = None
            raise
        if pending is not None:
            yield finish(pending)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_frames: int = 81,
        height: int | None = None,
        width: int | None = None,
        *,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        noise: str | None = None,
        image: Any = None,
        video: Any = None,
        prompt_switches: list[tuple[int, Any]] | None = None,
        recache: bool | str = True,
    ) -> SelfForcingPipelineOutput | tuple:
        """Generate whole videos (diffusers style). Use :meth:`stream` for long videos.

        ``noise="upstream"`` draws the noise as upstream Self-Forcing does (whole-video (B, T, C, h, w) noise
        first, then (B * F, C, h, w) re-noise per step, in the model's dtype; the global RNG when ``generator`` is
        None), so ``torch.manual_seed(seed)`` + upstream's dtype and device give upstream's video for ``seed``.
        ``image`` (image-to-video) and ``video`` (extension) are as in :meth:`stream`: the output starts with the
        context's frames and has ``num_frames`` frames in all. ``prompt_switches`` and ``recache`` are as in
        :meth:`stream`.
        """
        if output_type not in ("np", "uint8", "pil", "pt", "latent"):
            raise ValueError(f"output_type must be one of np, uint8, pil, pt, latent; got {output_type!r}")
        kwargs = dict(
            negative_prompt=negative_prompt,
            guidance_scale=guidance_scale,
            generator=generator,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            latents=latents,
            noise=noise,
            image=image,
            video=video,
            prompt_switches=prompt_switches,
            recache=recache,
        )
        stream_type = "latent" if output_type == "latent" else "pt"
        parts = list(self.stream(prompt, num_frames, height, width, output_type=stream_type, **kwargs))
        if output_type == "latent":
            frames: Any = torch.cat(parts, dim=2)
        else:
            video = torch.cat([p if p.dim() == 5 else p.unsqueeze(0) for p in parts], dim=1)  # (B, T, H, W, 3)
            if output_type == "uint8":
                frames = video.cpu().numpy()
            elif output_type == "pt":
                frames = video.permute(0, 1, 4, 2, 3).float() / 255.0
            else:
                array = video.cpu().numpy()
                if output_type == "np":
                    frames = array.astype(np.float32) / 255.0
                else:
                    from PIL import Image

                    frames = [[Image.fromarray(f) for f in v] for v in array]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return SelfForcingPipelineOutput(frames=frames)
