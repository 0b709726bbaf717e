"""A tiny streaming video decoder for Wan2.1 latents: genkv's implementation of the TAEHV decoder architecture.

TAEHV (MIT, https://github.com/madebyollin/taehv) is a small convolutional autoencoder trained to map the latents
a video diffusion model works in to pixels, far cheaper than the model's own VAE. Its decoder is 2-D convolutions
applied frame by frame, except for ``MemBlock``s, which also see the previous frame's features, and ``TGrow``s,
which turn one frame into ``stride`` frames by a 1x1 convolution to ``stride x channels``. Because the only
temporal dependency is "the previous frame at the same layer", a chunk can be decoded in one parallel pass per
layer once each MemBlock is handed the last frame it saw in the previous chunk: that is the whole streaming state
(:class:`TAEHVState`), so decoding chunk by chunk gives exactly what decoding the whole clip at once gives.

Conventions match :class:`~genkv.pipelines.self_forcing.vae_stream.StreamingVAEDecoder`: latents are the
normalised ones the diffusion model works in, (B, 16, T, h, w) (TAEHV was trained on exactly those, with no
mean / std applied), and pixels come out as (B, 3, T', 8h, 8w) in [-1, 1], the video's first latent frame giving
1 frame and every later one 4. The parameter names are those of TAEHV's published ``taew2_1`` files, so they load
unchanged; genkv never downloads them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genkv.switches import env_flag

WEIGHTS_HINT = (
    "genkv never downloads weights: get taew2_1.safetensors (or taew2_1.pth) from "
    "https://github.com/madebyollin/taehv (folder safetensors/ for the .safetensors) and pass its path"
)
_SHOWN = 4  # keys named in an error message before "(+N more)"
#: decoders loaded by :meth:`TAEHVDecoder.from_file` run channels-last (env ``GENKV_TAEHV_CHANNELS_LAST``, read at
#: import; on unless ``GENKV_TAEHV_CHANNELS_LAST=0``, since it was part of the measured faster path, 2026-12-06)
CHANNELS_LAST: bool = env_flag("GENKV_TAEHV_CHANNELS_LAST", True)


def _conv3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """``3 tanh(x / 3)``: keeps out-of-distribution latents in the range the decoder was trained on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual conv block whose input is the current frame's features next to the previous frame's."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3(n_in * 2, n_out), nn.ReLU(inplace=True),
            _conv3(n_out, n_out), nn.ReLU(inplace=True),
            _conv3(n_out, n_out),
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TGrow(nn.Module):
    """Temporal upsampling: each frame (N, C, H, W) becomes ``stride`` consecutive frames via a 1x1 conv."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.conv(x)
        # channel group k of frame t is output frame t * stride + k (frames are the flattened batch axis)
        if self.stride > 1 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
            # channels-last memory is (n, h, w, k, c): move k next to n in one copy and stay channels-last (a plain
            # reshape would copy into NCHW, and the next convolution would convert back)
            moved = y.permute(0, 2, 3, 1).unflatten(3, (self.stride, c)).permute(0, 3, 1, 2, 4)
            return moved.reshape(n * self.stride, h, w, c).permute(0, 3, 1, 2)
        return y.reshape(n * self.stride, c, h, w)


@dataclass(frozen=True)
class TAEHVState:
    """What one video's decode carries from chunk to chunk.

    ``memory`` maps a MemBlock's index in ``decoder`` to the last input frame it saw, (B, C, H, W);
    ``raw_frames`` counts the frames the layers have produced so far, before the start-up trim.
    """

    memory: Mapping[int, torch.Tensor] = field(default_factory=dict)
    raw_frames: int = 0


def _flags(values: Sequence[bool], n: int, name: str) -> tuple[bool, ...]:
    values = tuple(bool(v) for v in values)
    if len(values) == n - 1 and name == "decoder_time_upscale":
        values = (False, *values)  # TAEHV accepts two flags here: the first stage never upsamples time then
    if len(values) != n:
        raise ValueError(f"{name} needs {n} flags, got {values!r}")
    return values


class TAEHVDecoder(nn.Module):
    """TAEHV's decoder (Wan2.1 latents → pixels), whole-clip and chunk-by-chunk with its temporal memory carried.

    ``decoder_time_upscale`` / ``decoder_space_upscale`` switch each stage's 2x temporal / spatial upsampling
    (off: a cheaper, smaller preview; the published weights still load). Random weights unless loaded: use
    :meth:`from_file` for the published ``taew2_1`` weights.

    Example:
        >>> import torch
        >>> taehv = TAEHVDecoder().eval()                      # random weights, no file needed
        >>> z = torch.randn(1, 16, 6, 2, 2)                    # (B, C, T, h, w), normalised latents
        >>> first, state = taehv.decode_chunk(z[:, :, :3])     # a new video: state None
        >>> second, state = taehv.decode_chunk(z[:, :, 3:], state)
        >>> first.shape, second.shape                          # 1 + 4 + 4 frames, then 4 + 4 + 4; 8x space
        (torch.Size([1, 3, 9, 16, 16]), torch.Size([1, 3, 12, 16, 16]))
        >>> whole = taehv.decode_video(z)
        >>> torch.allclose(torch.cat([first, second], dim=2), whole, atol=1e-5)
        True
        >>> float(whole.min()) >= -1 and float(whole.max()) <= 1
        True
    """

    def __init__(
        self,
        decoder_time_upscale: Sequence[bool] = (False, True, True),
        decoder_space_upscale: Sequence[bool] = (True, True, True),
        patch_size: int = 1,
        latent_channels: int = 16,
    ) -> None:
        super().__init__()
        time_up = _flags(decoder_time_upscale, 3, "decoder_time_upscale")
        space_up = _flags(decoder_space_upscale, 3, "decoder_space_upscale")
        self.patch_size = patch_size
        self.latent_channels = latent_channels
        widths = (256, 128, 64, 64)
        layers: list[nn.Module] = [SoftClamp(), _conv3(latent_channels, widths[0]), nn.ReLU(inplace=True)]
        for stage in range(3):
            n_f = widths[stage]
            layers += [MemBlock(n_f, n_f) for _ in range(3)]
            # the layer order (and so every parameter's index in the names) is the published files'
            layers += [
                nn.Upsample(scale_factor=2 if space_up[stage] else 1),
                TGrow(n_f, 2 if time_up[stage] else 1),
                _conv3(n_f, widths[stage + 1], bias=False),
            ]
        layers += [nn.ReLU(inplace=True), _conv3(widths[3], 3 * patch_size**2)]
        self.decoder = nn.Sequential(*layers)
        self.t_upscale = 2 ** sum(time_up)
        # The decoder makes t_upscale frames per latent frame; the video's first latent frame stands for one
        # frame only (Wan's causal VAE), so the first t_upscale - 1 frames of a video are dropped.
        self.frames_to_trim = self.t_upscale - 1
        #: Activations and convolution weights in channels-last memory (:meth:`use_channels_last`)
        self.channels_last = False

    def use_channels_last(self, enabled: bool = True) -> "TAEHVDecoder":
        """Keep the activations (and the convolution weights) in channels-last memory, the layout cuDNN's fp16
        convolutions use on a GPU, instead of converting every convolution's input and output (~5.8 ms of layout
        conversions a chunk in the fp8 + TAEHV profile, H100, 2026-12-05). Same values, up to the convolutions' order
        of summation. On for every decoder :meth:`from_file` loads (so for ``genkv render --decoder taehv``) unless
        ``GENKV_TAEHV_CHANNELS_LAST=0``; a decoder built in code starts without it.

        Example:
            >>> import torch
            >>> taehv = TAEHVDecoder().eval()
            >>> z = torch.randn(1, 16, 3, 2, 2)
            >>> plain = taehv.decode_video(z)
            >>> torch.allclose(taehv.use_channels_last().decode_video(z), plain, atol=1e-5)
            True
        """
        self.channels_last = enabled
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    # ---- decoding -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode_chunk(
        self, latents: torch.Tensor, state: TAEHVState | None = None
    ) -> tuple[torch.Tensor, TAEHVState]:
        """Decode the next latent frames (B, C, T, h, w) of a video → (pixels (B, 3, T', H, W) in [-1, 1], state).

        ``state`` None starts a new video. The returned state is new (the one passed in is left unchanged).
        """
        state = state or TAEHVState()
        batch, channels, frames, height, width = latents.shape
        if channels != self.latent_channels:
            raise ValueError(f"TAEHV decoder takes {self.latent_channels}-channel latents, got shape "
                             f"{tuple(latents.shape)}")
        self._check_state(state, batch, height, width)
        param = self.decoder[1].weight
        x = latents.to(device=param.device, dtype=param.dtype).transpose(1, 2)
        x = x.reshape(batch * frames, channels, height, width)  # frames on the batch axis: 2-D convs see them all
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        memory: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.decoder):
            if isinstance(layer, MemBlock):
                x, memory[index] = self._memblock(layer, x, batch, state.memory.get(index))
            else:
                x = layer(x)
        if self.patch_size > 1:
            x = F.pixel_shuffle(x, self.patch_size)
        x = x.reshape(batch, -1, *x.shape[1:])  # (B, T * t_upscale, 3, H, W)
        skip = max(0, self.frames_to_trim - state.raw_frames)
        pixels = x[:, skip:].clamp(0, 1).mul(2).sub(1).transpose(1, 2)  # TAEHV's [0, 1] → genkv's [-1, 1]
        return pixels, TAEHVState(memory, state.raw_frames + x.shape[1])

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode a whole clip (B, C, T, h, w) → (B, 3, 1 + t_upscale (T - 1), H, W) in [-1, 1]."""
        return self.decode_chunk(latents)[0]

    @staticmethod
    def _memblock(
        block: MemBlock, x: torch.Tensor, batch: int, last: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Each frame's "past" is the previous frame's input to this block; the chunk's first frame gets the
        # previous chunk's last one (zeros at the start of a video, as TAEHV).
        frames = x.reshape(batch, -1, *x.shape[1:])
        # written into a tensor of x's memory layout (a cat of the 5-D views would come out NCHW whatever x is)
        past = torch.empty_like(x)
        past_frames = past.view(frames.shape)
        if last is None:
            past_frames[:, 0].zero_()
        else:
            past_frames[:, 0].copy_(last)
        past_frames[:, 1:].copy_(frames[:, :-1])
        # clone: a view would keep the whole chunk's activation alive until the next chunk
        return block(x, past), frames[:, -1].clone()

    def _check_state(self, state: TAEHVState, batch: int, height: int, width: int) -> None:
        if not state.memory:
            return
        first = state.memory[min(state.memory)]  # the first MemBlock works at the latents' spatial size
        if first.shape[0] != batch or tuple(first.shape[-2:]) != (height, width):
            raise ValueError(
                f"the TAEHV state is for latents of batch {first.shape[0]} and size {tuple(first.shape[-2:])}, "
                f"got batch {batch} and size {(height, width)}: start a new video with state=None"
            )

    # ---- loading the published weights ----------------------------------------------------------------------

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **config,
    ) -> TAEHVDecoder:
        """The decoder with the weights of a TAEHV file (``taew2_1.pth`` / ``taew2_1.safetensors``), unchanged.

        The file's encoder part, if any, is ignored. ``dtype`` None keeps float32 (the file is float16);
        ``config`` goes to the constructor (e.g. ``decoder_time_upscale=(False, False, False)`` for a preview).
        Raises FileNotFoundError when ``path`` does not exist and ValueError, naming the first keys that differ,
        when the file is not a TAEHV decoder of this configuration.
        """
        path = Path(path)
        model = cls(**config)
        state_dict = read_state_dict(path)
        model.load_state_dict(model.check_state_dict(state_dict, source=str(path)), strict=True)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return model.use_channels_last() if CHANNELS_LAST else model

    def check_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> dict:
        """The decoder part of a TAEHV state dict, adapted to this configuration, or one ValueError line."""
        decoder = {k: v for k, v in state_dict.items() if k.startswith("decoder.")}
        foreign = [k for k in state_dict if not k.startswith(("decoder.", "encoder."))]
        decoder = self._adapt_tgrow(decoder)
        expected = self.state_dict()
        missing = [k for k in expected if k not in decoder]
        unexpected = foreign + [k for k in decoder if k not in expected]
        wrong = [f"{k} {tuple(decoder[k].shape)} (wants {tuple(v.shape)})"
                 for k, v in expected.items() if k in decoder and decoder[k].shape != v.shape]
        problems = [f"{what} {_first(keys)}" for what, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
        if problems:
            raise ValueError(
                f"{source} is not a TAEHV decoder for {self.latent_channels}-channel latents (taew2_1): "
                + "; ".join(problems)
            )
        return decoder

    def _adapt_tgrow(self, decoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Files are trained with some TGrows at stride 2; with that stage's time upsampling switched off the
        # layer makes one frame, and TAEHV keeps the weights of the last of the two (its patch_tgrow_layers).
        decoder = dict(decoder)
        for index, layer in enumerate(self.decoder):
            key = f"decoder.{index}.conv.weight"
            if isinstance(layer, TGrow) and key in decoder:
                wanted = layer.conv.weight.shape[0]
                if decoder[key].shape[0] > wanted and decoder[key].shape[1:] == layer.conv.weight.shape[1:]:
                    decoder[key] = decoder[key][-wanted:]
        return decoder


class StreamingTAEHVDecoder:
    """A video's chunks through a :class:`TAEHVDecoder`, its state kept: the interface of ``StreamingVAEDecoder``.

    Example:
        >>> import torch
        >>> streaming = StreamingTAEHVDecoder(TAEHVDecoder().eval())
        >>> z = torch.randn(1, 16, 7, 2, 2)
        >>> [streaming.decode(z[:, :, a:b]).shape[2] for a, b in ((0, 3), (3, 6), (6, 7))]
        [9, 12, 4]
        >>> streaming.reset()                                  # the next video starts from scratch
        >>> streaming.decode(z[:, :, :1]).shape[2]
        1
    """

    def __init__(self, decoder: TAEHVDecoder) -> None:
        self.decoder = decoder
        self.reset()

    def reset(self) -> None:
        """Start a new video."""
        self.state: TAEHVState | None = None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The next chunk's latents (B, 16, T, h, w) → its pixels (B, 3, T', 8h, 8w) in [-1, 1]."""
        pixels, self.state = self.decoder.decode_chunk(latents, self.state)
        return pixels


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .pth or .safetensors file's tensors on the CPU; FileNotFoundError / ValueError in one line."""
    if not path.is_file():
        raise FileNotFoundError(f"TAEHV weights not found at {path}: {WEIGHTS_HINT}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path), device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch / safetensors raise many types for a truncated or foreign file
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"cannot read TAEHV weights from {path} ({type(exc).__name__}: {reason})") from None
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise ValueError(f"{path} does not hold a state dict (names to tensors): {WEIGHTS_HINT}")
    return dict(state_dict)


def _first(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more
