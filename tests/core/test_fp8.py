"""FP8 linears (genkv.fp8, issue 20): exact against a float64 reference on the same quantized operands, error vs
the high-precision linear under a measured bound, the tiny pipeline's output within a bound and restored bit for
bit, and a one-line refusal where the GPU lacks FP8."""

from __future__ import annotations

import pytest
import torch

import genkv
from genkv.fp8 import FP8Linear, disable_fp8, enable_fp8, fp8_summary, fp8_supported
from genkv.testing import tiny_self_forcing_pipeline

pytestmark = pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"),
                                reason="torch without float8 / _scaled_mm")


def _round_e4m3_float64(v: torch.Tensor) -> torch.Tensor:
    """Round float64 values (|v| <= 448) to the nearest float8 e4m3fn value, ties to even, in float64 arithmetic
    (not torch's float8 cast): 3 mantissa bits, normal exponents from -6, subnormal step 2^-9."""
    mag = v.abs()
    exponent = torch.floor(torch.log2(mag.clamp(min=2.0 ** -6))).clamp(min=-6)
    step = torch.exp2(exponent - 3)
    return torch.round(v / step) * step  # torch.round rounds half to even


def _times_inverse_448(amax: torch.Tensor) -> torch.Tensor:
    # a float32 amax times float32(1/448): the float64 product of two float32 numbers is exact, then rounded once
    inverse = torch.tensor(1.0 / 448.0, dtype=torch.float32).double()
    return (amax.float().double() * inverse).float().double()


def _quantize_rows_float64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row rule in float64: scale = max(row amax, 1e-12) * float32(1/448) rounded to float32 (exactly a
    float32 product); q = e4m3(x / scale)."""
    x64 = x.double()
    scale = _times_inverse_448(x64.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12))
    q = _round_e4m3_float64((x64 / scale).clamp(-448.0, 448.0))
    return q, scale


def _linear(k: int, n: int, seed: int, dtype=torch.float32) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
        lin.bias.copy_(0.1 * torch.randn(n, generator=g))
    return lin.to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("m,k,n", [(37, 64, 48), (16, 24, 32), (5, 256, 96)])
def test_fp8_linear_equals_float64_on_the_same_quantized_operands(m, k, n):
    lin = _linear(k, n, seed=m)
    layer = FP8Linear(lin, keep_original="device")
    g = torch.Generator().manual_seed(k)
    # rows of very different magnitudes: only a per-row activation scale reproduces the reference
    x = torch.randn(2, m, k, generator=g) * torch.logspace(-2, 2, m)[:, None]
    got = layer(x)
    assert got.shape == (2, m, n) and got.dtype == torch.float32

    w = layer.weight_fp8.double() * layer.weight_scale.double().reshape(n, 1)  # the stored operand, dequantized
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (1, n)
    qx, sx = _quantize_rows_float64(x.reshape(-1, k))
    want = (qx * sx) @ w.T + lin.bias.double()
    # fp32 accumulation of k products: the error scales with the sum of |terms| of each output
    magnitude = (qx.abs() * sx) @ w.abs().T + lin.bias.double().abs()
    err = (got.reshape(-1, n).double() - want).abs()
    assert (err <= 4 * k * 2.0 ** -24 * magnitude + 1e-30).all(), (err / magnitude).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_tensor_fp8_linear_equals_float64_on_the_same_quantized_operands(dtype):
    m, k, n = 29, 96, 40
    lin = _linear(k, n, seed=3, dtype=dtype)
    layer = FP8Linear(lin, keep_original="device", scaling="tensor")
    assert layer.weight_scale.shape == (1, 1) and layer.weight_fp8.dtype == torch.float8_e4m3fn
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-1, 1, m)[:, None]).to(dtype)
    got = layer(x)
    assert got.dtype == dtype

    # The per-tensor rule in float64: one scale = max(|x|) / 448 (float32), q = e4m3(x / scale), for x and for W.
    def quantize(t):
        t64 = t.double()
        scale = _times_inverse_448(t64.abs().max().clamp(min=1e-12))
        return _round_e4m3_float64((t64 / scale).clamp(-448.0, 448.0)), scale

    qx, sx = quantize(x)
    qw, sw = quantize(lin.weight)
    assert torch.equal(layer.weight_fp8.double(), qw) and layer.weight_scale.double().item() == sw.item()
    want = (qx * sx) @ (qw * sw).T + lin.bias.double()
    magnitude = (qx.abs() * sx) @ (qw.abs() * sw).T + lin.bias.double().abs()
    out_rounding = 2.0 ** -8 if dtype == torch.bfloat16 else 0.0  # the GEMM writes the input's dtype
    err = (got.double() - want).abs()
    assert (err <= (4 * k * 2.0 ** -24 + out_rounding) * magnitude + 1e-30).all(), (err / magnitude).max().item()
    # and it is an e4m3 quantization of the high-precision linear, within the same whole-tensor bound as per row
    assert 0.01 < _rel(got, lin(x)) < FP8_LINEAR_BOUND


def test_fp8_scaling_is_checked_and_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("GENKV_FP8_SCALING", "tensor")
    monkeypatch.setenv("GENKV_FP8_FAST_ACCUM", "1")
    model = torch.nn.Sequential(_linear(32, 16, seed=0), _linear(16, 16, seed=1))
    assert enable_fp8(model, exclude="1") == 1
    assert (model[0].scaling, model[0].fast_accum, tuple(model[0].weight_scale.shape)) == ("tensor", True, (1, 1))
    enable_fp8(model, scaling="row", fast_accum=False)  # explicit arguments win over the environment
    assert (model[1].scaling, model[1].fast_accum) == ("row", False)
    monkeypatch.delenv("GENKV_FP8_SCALING")
    monkeypatch.delenv("GENKV_FP8_FAST_ACCUM")
    with pytest.raises(ValueError, match="scaling must be one of row, tensor"):
        FP8Linear(_linear(32, 16, seed=0), scaling="block")
    with pytest.raises(ValueError, match="scaling must be one of row, tensor"):
        enable_fp8(torch.nn.Sequential(_linear(32, 16, seed=0)), scaling="channel")


# Measured (CPU, this test's inputs, bias zero): whole-output error 0.028-0.037 in fp32 and bf16, 0.037 at Wan's
# 1536 / 8960 shapes (the H200 measured 3.7e-2 for one FFN GEMM). Why ~0.037: e4m3 keeps 3 mantissa bits, so
# round-to-nearest leaves an RMS relative error of ~0.026 on each normally-distributed operand, and the two
# operands' errors add in quadrature: sqrt(2) x 0.026 ~ 0.037. The bound 0.06 is 1.6x that. A single row's error
# is an estimate from only k products and spreads more: worst row 0.053 at k = 24, 0.043 at k >= 64; its bound
# is 0.08. They fail a per-tensor activation scale (rows of mixed magnitude: the small ones underflow, 0.2-0.4),
# a weight scaled on the wrong axis, a clamp at 240, and an e5m2 weight (2 mantissa bits) at k >= 512 (0.060).
FP8_LINEAR_BOUND = 0.06
FP8_ROW_BOUND = 0.08


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(64, 64, 64), (128, 24, 32), (96, 1536, 256), (64, 512, 1536)])
def test_fp8_linear_error_vs_high_precision_is_bounded(m, k, n, dtype):
    lin = _linear(k, n, seed=n, dtype=dtype)
    with torch.no_grad():
        lin.bias.zero_()  # per row, relative to x W^T: in bf16 a bias would round away the small rows' products
    layer = FP8Linear(lin, keep_original="device")
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 2, m)[:, None]).to(dtype)
    got, want = layer(x), lin(x)
    assert got.dtype == dtype
    # per token: every row, large or small, keeps the bound (a per-tensor scale would crush the small rows)
    rows = ((got.double() - want.double()).norm(dim=1) / want.double().norm(dim=1)).max().item()
    assert rows < FP8_ROW_BOUND, rows
    assert 0.01 < _rel(got, want) < FP8_LINEAR_BOUND  # it is really quantized, and not worse than e4m3 should be


def test_fp8_linear_stores_fp8_and_keeps_dtypes_through_to():
    lin = _linear(64, 32, seed=0)
    layer = FP8Linear(lin, keep_original="device")
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in layer.parameters())  # no float weight left
    assert set(layer.state_dict()) == {"weight_fp8", "weight_scale", "bias"}
    before = layer.weight_fp8.clone()
    torch.nn.Sequential(layer).to(torch.bfloat16)  # a model-wide dtype change must not turn fp8 into bf16
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight_fp8.view(torch.uint8), before.view(torch.uint8))
    assert layer.bias.dtype == torch.bfloat16


def test_fp8_linear_traces_into_one_graph():
    # The compiled fast path needs the quantization inside the block's graph (Inductor then fuses it into the
    # producing kernel): no graph break. The eager backend checks the trace without paying a CPU compile.
    layer = FP8Linear(_linear(64, 48, seed=1), keep_original="device")
    x = torch.randn(2, 7, 64)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


# Measured: relative error of the clean latents of 2 chunks (6 latent frames, 4 denoising steps each, full
# cache) of the tiny fp32 pipeline, seed 0, with the 20 block linears in FP8: 1.29e-2 (max abs 0.15 on latents
# up to 9). Per-GEMM errors of ~3.7e-2 shrink through residual connections and the 16-channel proj_out, and
# compound over the steps and chunks; 4e-2 leaves 3x headroom.
TINY_LATENT_BOUND = 4e-2


def test_tiny_pipeline_fp8_changes_output_within_bound_and_disable_restores_bit_for_bit():
    pipe = tiny_self_forcing_pipeline(seed=0)
    embeds = pipe.encode_prompt("a red circle")
    noise = torch.randn(1, 16, 6, 8, 8, generator=torch.Generator().manual_seed(5))

    def latents():
        genkv.apply_genkv(pipe, "full")
        chunks = pipe.rollout(embeds, 6, 64, 64, generator=torch.Generator().manual_seed(3), latents=noise)
        return torch.cat(list(chunks), dim=2)

    plain = latents()
    linears = {name: m.weight.detach().clone() for name, m in pipe.transformer.named_modules()
               if isinstance(m, torch.nn.Linear)}
    assert enable_fp8(pipe.transformer) == 20  # 2 blocks x (4 self-attn + 4 cross-attn + 2 FFN)
    summary = fp8_summary(pipe.transformer)
    assert len(summary["replaced"]) == 20 and summary["skipped_dims"] == []
    assert all(name.startswith("blocks.") for name in summary["replaced"])
    for kept in ("proj_out", "condition_embedder.time_embedder.linear_1", "condition_embedder.text_embedder.linear_1"):
        assert type(pipe.transformer.get_submodule(kept)) is torch.nn.Linear
    fp8 = latents()
    error = _rel(fp8, plain)
    assert 1e-3 < error < TINY_LATENT_BOUND, error

    assert disable_fp8(pipe.transformer) == 20
    assert fp8_summary(pipe.transformer)["replaced"] == []
    for name, module in pipe.transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert type(module) is torch.nn.Linear and torch.equal(module.weight, linears[name]), name
    assert torch.equal(latents(), plain)


def test_include_exclude_and_the_alignment_rule():
    pipe = tiny_self_forcing_pipeline(seed=0)
    t = pipe.transformer
    assert enable_fp8(t, include="blocks.*.ffn.*", exclude="blocks.1.*") == 2
    assert fp8_summary(t)["replaced"] == ["blocks.0.ffn.net.0.proj", "blocks.0.ffn.net.2"]
    disable_fp8(t)
    # the CUDA rule (features multiples of 16) applied on the CPU: the tiny model's 24-wide layers stay as they are
    with pytest.warns(RuntimeWarning, match="not multiples of 16"):
        replaced = enable_fp8(t, align=16)
    summary = fp8_summary(t)
    assert replaced == 0 and len(summary["skipped_dims"]) == 20
    wide = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 24))
    with pytest.warns(RuntimeWarning):
        assert enable_fp8(wide, align=16) == 1
    assert isinstance(wide[0], FP8Linear) and type(wide[1]) is torch.nn.Linear
    assert fp8_summary(wide)["skipped_dims"] == ["1"]


@pytest.mark.parametrize("capability,ok", [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_unsupported_gpu_is_refused_in_one_line(monkeypatch, capability, ok):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    supported, reason = fp8_supported("cuda")
    assert supported is ok and "\n" not in reason
    if ok:
        return
    name = f"sm_{capability[0]}{capability[1]}"
    assert reason == f"FP8 needs compute capability 8.9+ (Ada/Hopper); this GPU is {name}: run without --fp8"
    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    monkeypatch.setattr("genkv.fp8._device_of", lambda module: torch.device("cuda", 0))
    with pytest.raises(RuntimeError) as err:
        enable_fp8(model)
    assert str(err.value) == reason
    assert type(model[0]) is torch.nn.Linear  # nothing was replaced


def test_cpu_is_supported_and_other_devices_are_not():
    assert fp8_supported("cpu")[0]
    supported, reason = fp8_supported("mps")
    assert not supported and "run without --fp8" in reason and "\n" not in reason


def _feed_forward(dtype=torch.float32, dropout: float = 0.0):
    from diffusers.models.attention import FeedForward

    torch.manual_seed(11)
    return FeedForward(32, inner_dim=96, activation_fn="gelu-approximate", dropout=dropout).to(dtype)


def test_fused_gelu_feed_forward_equals_the_unfused_fp8_one_in_float32_and_disable_restores_it():
    from genkv.fp8 import FP8GeluFeedForward

    model = torch.nn.Sequential(_feed_forward())
    x = torch.randn(2, 5, 32)
    before = model(x)
    unfused = _feed_forward()
    unfused.load_state_dict(model[0].state_dict())
    enable_fp8(unfused, row_kernel=False)
    assert enable_fp8(model) == 2
    assert type(model[0]) is FP8GeluFeedForward and fp8_summary(model)["fused_gelu"] == ["0"]
    assert list(model.state_dict()) == ["0.net.0.proj.bias", "0.net.0.proj.weight_fp8", "0.net.0.proj.weight_scale",
                                        "0.net.2.bias", "0.net.2.weight_fp8", "0.net.2.weight_scale"]
    # float32 model: the unfused path's GELU output is already float32, so quantizing the GELU in float32 inside
    # the op changes nothing: the same codes, the same GEMM, bit for bit
    fused_out = model(x)
    assert torch.equal(fused_out, unfused(x))
    assert 1e-3 < _rel(fused_out, before) < 0.1
    assert disable_fp8(model) == 2
    assert type(model[0]).__name__ == "FeedForward" and torch.equal(model(x), before)


def test_fused_gelu_feed_forward_in_bfloat16_is_no_further_from_float64_than_the_unfused_one():
    model, unfused = _feed_forward(torch.bfloat16), _feed_forward(torch.bfloat16)
    reference = _feed_forward(torch.float64)
    x = torch.randn(64, 32)
    want = reference(x.double())
    enable_fp8(model)
    enable_fp8(unfused, row_kernel=False)
    fused_error, unfused_error = _rel(model(x.bfloat16()), want), _rel(unfused(x.bfloat16()), want)
    assert fused_error < 0.1 and fused_error <= unfused_error * 1.1, (fused_error, unfused_error)


def test_what_the_row_kernel_option_covers(monkeypatch):
    pipe = tiny_self_forcing_pipeline(seed=0)
    t = pipe.transformer
    enable_fp8(t)
    summary = fp8_summary(t)
    assert summary["fused_gelu"] == ["blocks.0.ffn", "blocks.1.ffn"]
    with_kernel = sorted(name for name, m in t.named_modules() if isinstance(m, FP8Linear) and m.row_kernel)
    assert with_kernel == [f"blocks.{b}.{a}.to_out.0" for b in (0, 1) for a in ("attn1", "attn2")]
    disable_fp8(t)
    enable_fp8(t, scaling="tensor")  # one scale for the whole activation: no one-pass row kernel, no fusion
    assert fp8_summary(t)["fused_gelu"] == [] and not any(getattr(m, "row_kernel", False) for m in t.modules())
    disable_fp8(t)
    monkeypatch.setenv("GENKV_FP8_ROW_KERNEL", "0")
    enable_fp8(t)
    assert fp8_summary(t)["fused_gelu"] == [] and not any(getattr(m, "row_kernel", False) for m in t.modules())
    disable_fp8(t)
    monkeypatch.delenv("GENKV_FP8_ROW_KERNEL")
    dropping = torch.nn.Sequential(_feed_forward(dropout=0.1))
    enable_fp8(dropping)
    assert fp8_summary(dropping)["fused_gelu"] == []  # a dropout between the linears is not skipped over


@pytest.mark.skipif(not torch.cuda.is_available() or not fp8_supported("cuda")[0], reason="needs an FP8 GPU")
def test_fused_gelu_feed_forward_on_the_gpu_matches_the_unfused_one():
    from genkv.fp8 import FP8GeluFeedForward

    model = torch.nn.Sequential(_feed_forward(torch.bfloat16)).cuda()
    unfused, reference = _feed_forward(torch.bfloat16).cuda(), _feed_forward(torch.float64).cuda()
    x = torch.randn(300, 32, device="cuda")
    enable_fp8(model)
    enable_fp8(unfused, row_kernel=False)
    assert type(model[0]) is FP8GeluFeedForward  # on CUDA its op runs the Triton kernel
    want = reference(x.double())
    fused_error, unfused_error = _rel(model(x.bfloat16()), want), _rel(unfused(x.bfloat16()), want)
    assert fused_error < 0.1 and fused_error <= unfused_error * 1.1, (fused_error, unfused_error)


def test_cpu_gemm_without_rowwise_scaled_mm_matches_the_scaled_mm_one(monkeypatch):
    # torch 2.11's CPU _scaled_mm takes per-tensor scales only; FP8Linear then multiplies the codes in float32
    import genkv.fp8 as fp8

    layer = FP8Linear(_linear(96, 48, seed=4), keep_original=None)
    x = torch.randn(3, 17, 96) * torch.logspace(-2, 2, 17)[:, None]
    if not fp8.CPU_ROWWISE_SCALED_MM:
        pytest.skip("this torch's CPU _scaled_mm has no per-row scales to compare with")
    want = layer(x)
    monkeypatch.setattr(fp8, "CPU_ROWWISE_SCALED_MM", False)
    got = layer(x)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
