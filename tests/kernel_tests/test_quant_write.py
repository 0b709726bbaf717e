"""The fused commit write (genkv.kernels.quant_write): the Triton kernel's codes and scales are bit-identical to the
torch reference (the same roundings), the blended values it stores decode to the float64 running mean within half a
quantization step, and nothing outside the written slots changes. Runs the kernel (the interpreter on a CPU)."""

from __future__ import annotations

import pytest
import torch

from genkv.kernels.quant_kv import QuantizedKV, code_fields, dequantize_keys, dequantize_values
from genkv.kernels.quant_write import write_rows, write_rows_reference
from .test_block_sparse import device_for

DEVICE = device_for("triton")  # the GPU where there is one, else the CPU under the interpreter

KINDS = ("fp8", "int8", "int4")


def _history(kind: str, batch: int, capacity: int, heads: int, dim: int, seed: int) -> QuantizedKV:
    """A history whose every slot already holds random tokens (so a blend reads real stored values)."""
    hist = QuantizedKV.empty(kind, batch, capacity, heads, torch.ones(batch, heads, dim, device=DEVICE))
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, 1, capacity, heads, dim, generator=g).to(DEVICE)
    v = (torch.randn(batch, 1, capacity, heads, dim, generator=g) + 0.3).to(DEVICE)
    write_rows_reference(hist, torch.arange(capacity, device=DEVICE), k, v, torch.ones(batch, 1, heads, dim,
                                                                                       device=DEVICE))
    return hist


def _clone(hist: QuantizedKV) -> QuantizedKV:
    fields = {name: getattr(hist, name) for name in ("k_codes", "v_codes", "k_scale", "v_scale",
                                                    "key_channel_scale", "v_zero")}
    return QuantizedKV(hist.kind, **{n: None if t is None else t.clone() for n, t in fields.items()})


def _inputs(batch, layers, tokens, heads, dim, seed, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    # keys with an outlier channel pair and a per-layer power-of-two smoothing; values with an offset
    k = torch.randn(batch, layers, tokens, heads, dim, generator=g)
    k[..., 2:4] *= 20
    v = torch.randn(batch, layers, tokens, heads, dim, generator=g) * 2 + 0.7
    v[:, :, 0] = 50 + 0.01 * v[:, :, 0]  # tokens far from 0 against their spread: int4's span floor (ZERO_STEPS)
    channel = torch.exp2(torch.randint(-2, 4, (batch, layers, heads, dim), generator=g).float())
    return k.to(DEVICE, dtype), v.to(DEVICE, dtype), channel.to(DEVICE)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("blend", [False, True])
@pytest.mark.parametrize("layers,tokens,heads,dim", [(3, 5, 2, 32), (1, 7, 3, 64), (2, 16, 1, 16)])
def test_kernel_codes_are_bit_identical_to_the_torch_reference(kind, blend, layers, tokens, heads, dim):
    batch, capacity = 2, 64
    base = _history(kind, batch, capacity, heads, dim, seed=tokens)
    k, v, channel = _inputs(batch, layers, tokens, heads, dim, seed=dim + layers)
    g = torch.Generator().manual_seed(1)
    slots = torch.randperm(capacity, generator=g)[: layers * tokens].to(DEVICE)
    mix = None
    if blend:
        mix = (torch.rand(layers * tokens, generator=g).to(DEVICE), (torch.rand(layers * tokens, generator=g) < 0.6)
               .to(DEVICE))
    want, got = _clone(base), _clone(base)
    write_rows_reference(want, slots, k, v, channel, mix)
    write_rows(got, slots, k, v, channel, mix)
    for name, a, b in zip(("k codes", "k scale", "v codes", "v scale", "v zero"), code_fields(want), code_fields(got)):
        assert torch.equal(a, b), f"{kind} {name}: {(a.float() - b.float()).abs().max().item()}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("blend", [False, True])
def test_float32_scale_storage_holds_the_same_codes_and_scale_values(kind, blend):
    # GENKV_KV_SCALES=fp32: the kernel stores its fp16-rounded scales into float32 slots, and a blend reads them
    # back from there: codes bit-identical, scale values equal
    batch, layers, tokens, heads, dim, capacity = 1, 2, 6, 2, 32, 40
    base = _history(kind, batch, capacity, heads, dim, seed=4)
    k, v, channel = _inputs(batch, layers, tokens, heads, dim, seed=11)
    g = torch.Generator().manual_seed(3)
    slots = torch.randperm(capacity, generator=g)[: layers * tokens].to(DEVICE)
    mix = (torch.rand(layers * tokens, generator=g).to(DEVICE), (torch.rand(layers * tokens, generator=g) < 0.6)
           .to(DEVICE)) if blend else None
    half, single = _clone(base), _clone(base)
    single.k_scale, single.v_scale = single.k_scale.float(), single.v_scale.float()
    if single.v_zero is not None:
        single.v_zero = single.v_zero.float()
    write_rows(half, slots, k, v, channel, mix)
    write_rows(single, slots, k, v, channel, mix)
    for a, b in zip(code_fields(half), code_fields(single)):
        assert torch.equal(a.float() if a.dtype == torch.float16 else a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_blended_values_decode_to_the_float64_running_mean(kind):
    # Independent of the reference's arithmetic: what the kernel stores must decode to old * w + new * (1 - w)
    # (old: the slot's value as stored before) where merged, to the new value elsewhere, within half a step; keys
    # to the keys (smoothing undone); slots not listed keep their bytes.
    batch, layers, tokens, heads, dim, capacity = 1, 2, 6, 2, 32, 40
    hist = _history(kind, batch, capacity, heads, dim, seed=3)
    before = _clone(hist)
    k, v, channel = _inputs(batch, layers, tokens, heads, dim, seed=9, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    slots = torch.randperm(capacity, generator=g)[: layers * tokens].to(DEVICE)
    weight = torch.rand(layers * tokens, generator=g).to(DEVICE)
    merged = (torch.arange(layers * tokens) % 3 != 0).to(DEVICE)
    old = dequantize_values(before).double()[:, slots]
    write_rows(hist, slots, k, v, channel, (weight, merged))

    new = v.double().flatten(1, 2)
    w = weight.double().view(1, -1, 1, 1)
    want_v = torch.where(merged.view(1, -1, 1, 1), old * w + new * (1 - w), new)
    got_v = dequantize_values(hist).double()[:, slots]
    want_k = k.double().flatten(1, 2)
    # hist's own factors are 1: the stored keys are the smoothed ones; undo the smoothing per layer
    got_k = (dequantize_keys(hist).double()[:, slots].unflatten(1, (layers, tokens))
             * channel.double()[:, :, None]).flatten(1, 2)
    ch = channel.double().repeat_interleave(tokens, 1)  # (B, L * T, H, D): each slot's layer's factors
    k_scale = hist.k_scale.double()[:, slots, :, None]
    v_scale = hist.v_scale.double()[:, slots, :, None]
    if kind == "fp8":  # relative: 3 mantissa bits (half a step is 2^-4 of the value), plus the subnormal floor
        v_half = want_v.abs() * 2.0 ** -4 + v_scale * 2.0 ** -10
        k_half = want_k.abs() * 2.0 ** -4 + k_scale * 2.0 ** -10 * ch
    else:  # integer codes: half a step of the row's scale (keys: of the smoothed key, times its factor)
        v_half = v_scale * 0.5
        k_half = k_scale * 0.5 * ch
    # fp16 scales: the codes were rounded against the stored scale, so half a step of it bounds the error
    assert ((got_v - want_v).abs() <= v_half * 1.0001 + 1e-6).all(), (got_v - want_v).abs().max().item()
    assert ((got_k - want_k).abs() <= k_half * 1.0001 + 1e-6).all(), (got_k - want_k).abs().max().item()
    untouched = torch.ones(capacity, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    for a, b in zip(code_fields(before), code_fields(hist)):
        assert torch.equal(a[:, untouched], b[:, untouched])


def test_no_slots_writes_nothing():
    hist = QuantizedKV.empty("int4", 1, 8, 2, torch.ones(1, 2, 16, device=DEVICE))
    before = _clone(hist)
    k = torch.zeros(1, 1, 0, 2, 16, device=DEVICE)
    write_rows(hist, torch.zeros(0, dtype=torch.long, device=DEVICE), k, k, torch.ones(1, 1, 2, 16, device=DEVICE))
    assert all(torch.equal(a, b) for a, b in zip(code_fields(before), code_fields(hist)))


def test_bad_shapes_are_refused():
    hist = QuantizedKV.empty("int8", 1, 8, 2, torch.ones(1, 2, 16, device=DEVICE))
    k = torch.zeros(1, 2, 3, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(B, L, T, H, D\) with L \* T slots"):
        write_rows(hist, torch.arange(5, device=DEVICE), k, k, torch.ones(1, 2, 2, 16, device=DEVICE))
