"""Opt-in FP8 (e4m3) linear layers for a Wan transformer: ``enable_fp8`` / ``disable_fp8`` (issue 20).

Each selected ``nn.Linear`` becomes an :class:`FP8Linear`: its weight is quantized once, per output channel, to
``float8_e4m3fn`` with float32 scales (the high-precision weight leaves the device, so memory falls), and every
forward quantizes the activation per token (per row: amax -> scale -> clamp -> cast) and runs
``torch._scaled_mm`` with the row scales ``(M, 1)`` and the channel scales ``(1, N)``, output in the input's
dtype. The quantization is plain torch ops on purpose: under ``torch.compile`` (the pipeline's fast path,
:func:`genkv.compile.compile_transformer`) Inductor fuses it into the kernel that produces the activation (the
norm / modulation before q/k/v, the GELU before the second FFN linear). Eagerly it is three extra passes over
the activation; measured on an H200 at Wan2.1-1.3B shapes that unfused quantization (0.71 ms a block) costs
more than the FP8 GEMMs save (0.54 -> 0.40 ms), so FP8 is meant for the compiled path.

Two inputs have no compiled producer to fuse into, or one Inductor fuses badly, and get genkv's one-pass Triton
kernel instead (``row_kernel``, on by default with per-row scaling; ``genkv.kernels.fp8_rows``): the attention
outputs (genkv's attention ops produce them) and the FFN's GELU. :class:`FP8GeluFeedForward` replaces each
diffusers ``FeedForward`` whose linears are FP8 and computes the GELU inside the down projection's quantization:
one read of the up projection's output, where Inductor's looped reduction read its 8960-wide rows twice and
recomputed the GELU (152 us a call on an H100, 4x its bytes).

What stays in high precision (the default selection takes only the ``nn.Linear`` layers inside
``transformer.blocks``): the patch embedding (a conv, and the first thing every token passes through), the
time and text embedders (tiny GEMMs, and their output modulates every block: an error there is an error
everywhere), the final ``proj_out`` (it writes the predicted flow directly, 16 channels: nothing to gain, and
its error goes straight into the latents), every norm and the blocks' modulation tables. On CUDA a layer whose
in/out features are not multiples of 16 (a ``_scaled_mm`` requirement there) also stays as it is; such layers
are counted in :func:`fp8_summary` and warned about. The CPU kernel has no such rule, so on a CPU the tiny test
models (24-wide) are converted whole; pass ``align=16`` to apply the CUDA rule anywhere.

Support: CUDA compute capability 8.9+ (Ada, Hopper and later; per-row ``_scaled_mm`` there outputs bf16, so an
fp16/fp32 model's GEMMs return bf16 that is cast back) and the CPU (slow, for tests). ``enable_fp8`` on
anything else raises a one-line ``RuntimeError`` saying why (:func:`fp8_supported`).

Memory: by default the original layers are kept on the CPU (``keep_originals="cpu"``) so that
:func:`disable_fp8` restores them bit for bit; for Wan2.1-1.3B in bf16 that is ~2.8 GB of host memory, and the
device holds ~1.4 GB of FP8 weights instead of ~2.8 GB of bf16 ones. ``keep_originals="device"`` keeps them
where they were (no saving, instant restore); ``None`` drops them (then ``disable_fp8`` raises).

Apply it before compiling (:func:`genkv.compile.compile_transformer` / ``pipe.enable_compile()``): replacing
modules of an already compiled block only makes dynamo recompile it at the next forward, but doing it first
avoids compiling twice.

Example (CPU, a tiny model; ``include`` defaults to every linear when the module has no ``blocks``):
    >>> import torch
    >>> from genkv.fp8 import FP8Linear, enable_fp8, disable_fp8
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    >>> x = torch.randn(8, 32)
    >>> before = model(x)
    >>> enable_fp8(model)
    2
    >>> isinstance(model[0], FP8Linear), model[0].weight_fp8.dtype
    (True, torch.float8_e4m3fn)
    >>> bool(((model(x) - before).norm() / before.norm()) < 0.06)
    True
    >>> disable_fp8(model)
    2
    >>> torch.equal(model(x), before)
    True
"""

from __future__ import annotations

import fnmatch
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .switches import env_flag, optional_kernel

__all__ = ["FP8Linear", "FP8GeluFeedForward", "FP8Rows", "enable_fp8", "disable_fp8", "fp8_supported", "fp8_summary",
           "quantize_rows", "quantize_tensor"]

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max; e4m3fn has no inf: values past it must be clamped
# The scale is amax times 1/448 (rounded to float32), not amax / 448: CUDA's torch divides a tensor by a Python
# number that way, the CPU's divides exactly, and written as a product the rule is the same on every device (and in
# genkv.kernels.fp8_rows).
INV_E4M3_MAX = 1.0 / E4M3_MAX
AMAX_FLOOR = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero (it quantizes to zeros)

Selector = str | Iterable[str] | Callable[[str, nn.Module], bool] | None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization of a 2-D tensor: ``(q, scale)`` with ``x ~= q.float() * scale``.

    ``scale = max(amax of the row, 1e-12) * (1 / 448)`` in float32, shape ``(rows, 1)``; ``q = clamp(x / scale,
    -448, 448)`` cast (round to nearest even) to ``float8_e4m3fn``. The same rule quantizes the weight (its rows
    are the output channels) once and the activations (their rows are the tokens) at every forward.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR) * INV_E4M3_MAX
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3 quantization: ``(q, scale)`` with ``x ~= q.float() * scale`` and one float32 ``scale =
    max(amax of x, 1e-12) * (1 / 448)`` (a 0-d tensor). e4m3 is a floating format, so small entries keep their
    relative precision down to 2^-9 of the largest (below that they flush toward zero), not a few levels as int8
    would.
    """
    xf = x.float()
    scale = xf.abs().amax().clamp(min=AMAX_FLOOR) * INV_E4M3_MAX
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q, scale


SCALINGS = ("row", "tensor")


@dataclass
class FP8Rows:
    """An activation already quantized per row, handed to the linears that read it instead of the tensor.

    Whoever produced the activation quantized it on the way (``genkv.kernels.adaln``: a Wan block's LayerNorm and
    modulation), so the :class:`FP8Linear` layers reading it (q, k and v read one) skip their own quantization.
    ``codes`` ``(M, C)`` e4m3 and ``scale`` ``(M, 1)`` float32 are :func:`quantize_rows` of the activation's rows;
    ``shape`` / ``dtype`` are the activation's (``(..., C)``, M the product of the leading dimensions). Only
    per-row :class:`FP8Linear` layers (and :class:`FP8GeluFeedForward`) take it.

    Example:
        >>> x = torch.randn(2, 3, 32)
        >>> rows = FP8Rows(*quantize_rows(x.reshape(-1, 32)), x.shape, x.dtype)
        >>> layer = FP8Linear(nn.Linear(32, 8))
        >>> torch.equal(layer(rows), layer(x))
        True
    """

    codes: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype


class FP8Linear(nn.Module):
    """An ``nn.Linear`` whose weight is stored in FP8 (e4m3, one float32 scale per output channel) and whose
    forward quantizes the activation per token and multiplies with ``torch._scaled_mm``.

    Buffers: ``weight_fp8`` (out, in) ``float8_e4m3fn`` and ``weight_scale`` (1, out) float32; ``bias`` stays a
    high-precision parameter and follows the model's dtype. A model-wide ``.to(dtype)`` moves the buffers but
    keeps their dtypes. ``fast_accum``: ``_scaled_mm``'s faster, less exact accumulation on Hopper.
    ``scaling``: ``"row"`` (the default: a scale per token and per output channel) or ``"tensor"`` (one scale for
    the weight and one per activation tensor; ``weight_scale`` is then (1, 1)). On an H100 with torch 2.11 both
    run cuBLASLt FP8 GEMMs; per-tensor made a Wan block's linears 7% faster at the same error with random weights,
    but one large token then squeezes every other token of the activation toward e4m3's subnormals
    (docs/BENCHMARKS.md, 2026-12-05 seventh), so per-row stays the default.
    """

    def __init__(self, linear: nn.Linear, *, fast_accum: bool = False, keep_original: str | None = "cpu",
                 scaling: str = "row", row_kernel: bool = False) -> None:
        super().__init__()
        if FP8_DTYPE is None or not hasattr(torch, "_scaled_mm"):
            raise RuntimeError(f"FP8 needs torch with float8_e4m3fn and torch._scaled_mm; torch {torch.__version__} "
                               "lacks them: run without --fp8")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}; got {scaling!r}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.fast_accum = fast_accum
        self.scaling = scaling
        # quantize the input with genkv's one-pass kernel (the op genkv::fp8_quantize_rows) instead of torch ops:
        # for inputs no compiled kernel produces (the attention ops' outputs), so Inductor has nothing to fuse into
        self.row_kernel = row_kernel and scaling == "row" and _row_kernel_available()
        self._quantize = quantize_rows if scaling == "row" else quantize_tensor
        with torch.no_grad():
            q, scale = self._quantize(linear.weight.detach())
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        if keep_original not in ("cpu", "device", None):
            raise ValueError(f"keep_original must be 'cpu', 'device' or None, got {keep_original!r}")
        if keep_original == "cpu":
            linear = linear.to("cpu")
        # Not a submodule (object.__setattr__): .to(), state_dict() and named_modules() never see the original.
        object.__setattr__(self, "_original", linear if keep_original is not None else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "FP8Linear":
        return cls(linear, **kwargs)

    def extra_repr(self) -> str:
        scales = "per-channel weight, per-token activation" if self.scaling == "row" else "per-tensor scales"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"e4m3 {scales}"

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating tensor, float8 included: put the storage dtypes back (fp8 -> bf16
        # -> fp8 is exact; the scales are restored from the float32 originals, moved like the rest).
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_fp8.dtype != FP8_DTYPE:
            self.weight_fp8 = self.weight_fp8.to(FP8_DTYPE)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(device=self.weight_scale.device)
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the GEMM actually uses, in float32: ``weight_fp8 * weight_scale.T``."""
        return self.weight_fp8.float() * self.weight_scale.reshape(-1, 1)  # (1, 1) per-tensor broadcasts too

    def forward(self, x: "torch.Tensor | FP8Rows") -> torch.Tensor:
        if isinstance(x, FP8Rows):  # quantized by its producer (q, k and v share one quantization)
            if self.scaling != "row":
                raise TypeError("a per-tensor FP8Linear cannot take rows quantized per row (FP8Rows)")
            return self.matmul_codes(x.codes, x.scale, x.dtype).reshape(*x.shape[:-1], self.out_features)
        x2 = x.reshape(-1, self.in_features)
        if self.row_kernel:
            xq, x_scale = torch.ops.genkv.fp8_quantize_rows(x2, "none")
        else:
            xq, x_scale = self._quantize(x2)
        return self.matmul_codes(xq, x_scale, x.dtype).reshape(*x.shape[:-1], self.out_features)

    def matmul_codes(self, xq: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The layer applied to an already quantized 2-D input (codes ``(M, in)`` e4m3 and its scales: ``(M, 1)``
        per row, ``()`` per tensor), plus the bias; ``(M, out)`` in ``dtype``."""
        # CUDA's row-wise scaled GEMM writes bf16 only; the per-tensor one and the CPU kernel write any float dtype.
        any_dtype = xq.device.type != "cuda" or dtype == torch.bfloat16 or self.scaling == "tensor"
        gemm_dtype = dtype if any_dtype else torch.bfloat16
        scale_b = self.weight_scale if self.scaling == "row" else self.weight_scale.reshape(())
        bias = self.bias
        if xq.device.type == "cpu" and self.scaling == "row" and not CPU_ROWWISE_SCALED_MM:
            # this torch's CPU _scaled_mm takes per-tensor scales only: the same product in float32 (e4m3 x e4m3
            # products are exact there, the sum accumulates in float32 as the GEMM's does), then the scales
            y = (xq.float() @ self.weight_fp8.float().t()) * x_scale * scale_b
            return (y + bias if bias is not None else y).to(dtype)
        fuse_bias = bias is not None and bias.dtype == gemm_dtype
        y = torch._scaled_mm(
            xq,
            self.weight_fp8.t(),  # (in, out), column-major, as the CUDA kernel wants
            scale_a=x_scale,
            scale_b=scale_b,
            bias=bias if fuse_bias else None,
            out_dtype=gemm_dtype,
            use_fast_accum=self.fast_accum,
        )
        if bias is not None and not fuse_bias:
            y = y + bias
        return y.to(dtype)


def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes per-row scales (2.13 does; 2.11's asserts per-tensor)."""
    if FP8_DTYPE is None or not hasattr(torch, "_scaled_mm"):
        return False
    codes = torch.zeros(16, 16, dtype=FP8_DTYPE)
    try:
        torch._scaled_mm(codes, codes.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                         out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        return False
    return True


# Probed once at import, not inside forward: traced by torch.compile, the probe would run on fake tensors (which
# never raise) and claim support.
CPU_ROWWISE_SCALED_MM = _cpu_rowwise_scaled_mm()


def _row_kernel_available() -> bool:
    """Whether genkv's one-pass row quantization (``genkv.kernels.fp8_rows``, a Triton kernel) can be imported; the
    op is registered on import."""
    return optional_kernel("fp8_rows") is not None


_GELU_APPROXIMATIONS = {"none": "gelu", "tanh": "gelu_tanh"}


class FP8GeluFeedForward(nn.Module):
    """A diffusers ``FeedForward`` (``GELU`` up projection, dropout 0, linear down) whose two linears are
    :class:`FP8Linear` (per-row), with the GELU and the down projection's input quantization done in one pass
    (``genkv::fp8_quantize_rows`` with the activation; ``genkv.kernels.fp8_rows``) instead of a GELU kernel plus a
    two-read quantization. Same parameters and state-dict names as the ``FeedForward`` it wraps (``net`` is that
    module's list); :func:`disable_fp8` puts the original back.

    What changes in the numbers: the GELU is quantized in float32 instead of after rounding it to the model's
    dtype (one rounding fewer, tested against a float64 reference).
    """

    def __init__(self, feed_forward: nn.Module) -> None:
        super().__init__()
        self.net = feed_forward.net
        self.activation = _GELU_APPROXIMATIONS[self.net[0].approximate]
        object.__setattr__(self, "_original", feed_forward)  # not a submodule: its parameters are `net`'s

    @staticmethod
    def fusable(module: nn.Module) -> bool:
        """A ``FeedForward`` of the layout above whose linears are both per-row :class:`FP8Linear`."""
        net = getattr(module, "net", None)
        if type(module).__name__ != "FeedForward" or not isinstance(net, nn.ModuleList) or len(net) not in (3, 4):
            return False
        up = getattr(net[0], "proj", None)
        dropouts_off = all(isinstance(m, nn.Dropout) and m.p == 0 for m in list(net)[1:2] + list(net)[3:])
        return (type(net[0]).__name__ == "GELU" and getattr(net[0], "approximate", None) in _GELU_APPROXIMATIONS
                and dropouts_off and all(isinstance(m, FP8Linear) and m.scaling == "row" for m in (up, net[2])))

    def forward(self, hidden_states: "torch.Tensor | FP8Rows", *args, **kwargs) -> torch.Tensor:
        up, down = self.net[0].proj, self.net[2]
        hidden = up(hidden_states)  # an FP8Rows input (quantized by its producer) too
        codes, scale = torch.ops.genkv.fp8_quantize_rows(hidden.reshape(-1, up.out_features), self.activation)
        out = down.matmul_codes(codes, scale, hidden_states.dtype)
        return out.reshape(*hidden_states.shape[:-1], down.out_features)


def fp8_supported(device: torch.device | str) -> tuple[bool, str]:
    """Whether FP8 linears run on ``device``; the reason is one line fit for an error message."""
    device = torch.device(device)
    if FP8_DTYPE is None or not hasattr(torch, "_scaled_mm"):
        return False, (f"FP8 needs torch with float8_e4m3fn and torch._scaled_mm; torch {torch.__version__} lacks "
                       "them: run without --fp8")
    if device.type == "cpu":
        return True, "CPU: FP8 GEMMs run (slowly; for tests)"
    if device.type != "cuda":
        return False, f"FP8 runs on CUDA (compute capability 8.9+) or the CPU, not on {device.type}: run without --fp8"
    if getattr(torch.version, "hip", None):
        return False, "FP8 in genkv uses float8_e4m3fn, which ROCm GPUs do not multiply: run without --fp8"
    if not torch.cuda.is_available():
        return False, "FP8 on CUDA asked for, but torch sees no CUDA device: run without --fp8"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, (f"FP8 needs compute capability 8.9+ (Ada/Hopper); this GPU is sm_{major}{minor}: "
                       "run without --fp8")
    return True, f"sm_{major}{minor}: FP8 e4m3 GEMMs supported"


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _matcher(selector: Selector, default: bool) -> Callable[[str, nn.Module], bool]:
    if selector is None:
        return lambda name, mod: default
    if callable(selector):
        return selector
    patterns = [selector] if isinstance(selector, str) else list(selector)
    return lambda name, mod: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _default_include(module: nn.Module) -> Selector:
    # A Wan transformer (anything with `blocks`): only the linears inside the blocks (attention q/k/v/out, the
    # cross-attention's, the FFN's); see the module docstring for why the rest stays in high precision.
    return "blocks.*" if isinstance(getattr(module, "blocks", None), nn.ModuleList) else None


def enable_fp8(module: nn.Module, *, include: Selector = None, exclude: Selector = None,
               fast_accum: bool | None = None, keep_originals: str | None = "cpu", align: int | None = None,
               scaling: str | None = None, row_kernel: bool | None = None) -> int:
    """Replace the selected ``nn.Linear`` layers of ``module`` by :class:`FP8Linear` in place; returns how many.

    ``include`` / ``exclude``: fnmatch patterns on qualified module names (``"blocks.*.ffn.*"``), a list of
    them, or a ``(name, module) -> bool`` callable. Default include: ``"blocks.*"`` for a module with a
    ``blocks`` list (the Wan transformer), every linear otherwise. Only exact ``nn.Linear`` layers are taken
    (not subclasses, e.g. LoRA wrappers). ``align``: in/out features must be multiples of it (default 16 on
    CUDA, as ``_scaled_mm`` requires, 1 elsewhere); layers that are not stay in high precision, are counted in
    :func:`fp8_summary` and warned about. ``scaling``: ``"row"`` (per token and output channel) or ``"tensor"``
    (:class:`FP8Linear`); default env ``GENKV_FP8_SCALING`` if set, else ``"row"``. ``fast_accum``: default env
    ``GENKV_FP8_FAST_ACCUM`` (``1`` / ``0``) if set, else off. ``row_kernel`` (per-row scaling only; default env
    ``GENKV_FP8_ROW_KERNEL`` if set, else on): quantize the attention outputs (``*.to_out.0``'s input) with
    genkv's one-pass kernel, and fuse each GELU feed-forward's activation into its down projection's
    quantization (:class:`FP8GeluFeedForward`); the kernel runs on CUDA, the same math in torch elsewhere.
    Raises ``RuntimeError`` (one line) where FP8 is not supported.
    """
    # unset arguments come from the environment (benchmarks compare settings across processes without new flags)
    scaling = scaling if scaling is not None else (os.environ.get("GENKV_FP8_SCALING") or "row")
    fast_accum = fast_accum if fast_accum is not None else env_flag("GENKV_FP8_FAST_ACCUM", False)
    row_kernel = row_kernel if row_kernel is not None else env_flag("GENKV_FP8_ROW_KERNEL", True)
    row_kernel = row_kernel and _row_kernel_available()  # per-row only: FP8Linear and fusable() check the scaling
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}; got {scaling!r}")
    device = _device_of(module)
    ok, reason = fp8_supported(device)
    if not ok:
        raise RuntimeError(reason)
    if align is None:
        align = 16 if device.type == "cuda" else 1
    selected = _matcher(include if include is not None else _default_include(module), True)
    excluded = _matcher(exclude, False)
    replaced: list[str] = []
    skipped: list[str] = []
    for name, child in list(module.named_modules()):
        if type(child) is not nn.Linear:
            continue
        plain = name.replace("_orig_mod.", "")  # names as in the uncompiled model
        if not selected(plain, child) or excluded(plain, child):
            continue
        if child.in_features % align or child.out_features % align:
            skipped.append(plain)
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, FP8Linear(child, fast_accum=fast_accum, keep_original=keep_originals,
                                        scaling=scaling, row_kernel=row_kernel and plain.endswith("to_out.0")))
        replaced.append(plain)
    fused = []
    if row_kernel:
        for name, child in list(module.named_modules()):
            if name and FP8GeluFeedForward.fusable(child):  # (the root itself cannot be replaced in place)
                parent_name, _, attr = name.rpartition(".")
                parent = module.get_submodule(parent_name) if parent_name else module
                setattr(parent, attr, FP8GeluFeedForward(child))
                fused.append(name.replace("_orig_mod.", ""))
    summary = getattr(module, "_genkv_fp8", {"replaced": [], "skipped_dims": [], "fused_gelu": []})
    summary["replaced"] = sorted(set(summary["replaced"]) | set(replaced))
    summary["skipped_dims"] = sorted(set(summary["skipped_dims"]) | set(skipped))
    summary["fused_gelu"] = sorted(set(summary.get("fused_gelu", [])) | set(fused))
    object.__setattr__(module, "_genkv_fp8", summary)
    if skipped:
        some = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        warnings.warn(f"genkv FP8: {len(skipped)} linear layer(s) kept in high precision because their features are "
                      f"not multiples of {align}: {some}", RuntimeWarning, stacklevel=2)
    return len(replaced)


def disable_fp8(module: nn.Module) -> int:
    """Put every :class:`FP8Linear` in ``module`` back to the ``nn.Linear`` it was built from (its weights bit for
    bit, moved to the device the FP8 layer is on); returns how many. Raises if an original was dropped."""
    for name, child in list(module.named_modules()):
        if isinstance(child, FP8GeluFeedForward):  # first: the FeedForward it wraps holds the FP8 linears
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, child._original)
    restored = 0
    for name, child in list(module.named_modules()):
        if not isinstance(child, FP8Linear):
            continue
        original = child._original
        if original is None:
            raise RuntimeError(f"{name}: enable_fp8(keep_originals=None) dropped the original layer; reload the model")
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, original.to(child.weight_fp8.device))
        restored += 1
    if hasattr(module, "_genkv_fp8"):
        object.__delattr__(module, "_genkv_fp8")
    return restored


def fp8_summary(module: nn.Module) -> dict:
    """``{"replaced": [...], "skipped_dims": [...], "fused_gelu": [...]}``: the layer names :func:`enable_fp8`
    converted, those it left in high precision for their dimensions, and the feed-forwards whose GELU it fused
    into the quantization (empty lists when FP8 is off)."""
    summary = getattr(module, "_genkv_fp8", None) or {"replaced": [], "skipped_dims": [], "fused_gelu": []}
    return {key: list(value) for key, value in summary.items()}
