"""The Gluon kernel for Hopper (``kernels/block_sparse_hopper.py``): float64 attention over the listed keys on a
compute-capability-9 GPU (dense, random, unordered and empty lists; ragged key lengths; every split count; strided
inputs; the LSE), and, on any machine with Triton's NVIDIA backend, its sm_90 build: shared memory within an SM's,
no register spills, no serialised wgmma (ptxas C7514 / C7515). Each check runs the three kernels: the plain one, the
warp-specialised one (``warp_specialize=True``) and its ping-pong form (``pingpong=True``).
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genkv.kernels import block_sparse_hopper as bsh

from .test_block_sparse import allowed_mask, dense_reference, random_lists

pytestmark = pytest.mark.skipif(not bsh.gluon_available(), reason="this Triton has no Gluon")
ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
hopper_only = pytest.mark.skipif(not ON_HOPPER, reason="needs a compute-capability-9 GPU (H100 / H200)")
VARIANTS = {"plain": dict(warp_specialize=False, pingpong=False), "ws": dict(warp_specialize=True, pingpong=False),
            "pingpong": dict(warp_specialize=True, pingpong=True)}
every_kernel = pytest.mark.parametrize("variant", list(VARIANTS))


def _case(seed, b, h, d, s_q, s_kv, max_blocks, dtype, unordered=False, device="cuda"):
    """q, k, v on ``device`` as slices of larger buffers, as a fused QKV projection and the cache hand them over
    (strided along S and H: moving a slice would make it contiguous, so the buffers move first), and lists."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s_q + 3, h, 2 * d, generator=g).to(device, dtype)[:, :s_q, :, :d]
    k = torch.randn(b, s_kv + 5, h, 2 * d, generator=g).to(device, dtype)[:, :s_kv, :, d:]
    v = torch.randn(b, s_kv + 5, h, d, generator=g).to(device, dtype)[:, :s_kv]
    n_q, n_kv = math.ceil(s_q / 128), math.ceil(s_kv / 128)
    idx, counts = random_lists(b, h, n_q, n_kv, min(max_blocks, n_kv), g)
    if unordered:
        idx = idx.flip(-1).contiguous()
        counts.fill_(idx.shape[-1])
    assert not q.is_contiguous() and q.stride(2) == 2 * d and k.stride(2) == 2 * d
    return q, k, v, idx.to(device), counts.to(device)


@hopper_only
@every_kernel
@pytest.mark.parametrize("splits", [1, 2, 3, 4, "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_random_lists_match_float64(splits, dtype, head_dim, variant):
    """Ragged keys (the last block 61 long), random sorted lists of up to 5 of 6 blocks, some rows empty."""
    b, h, s_q, s_kv = 2, 3, 300, 701
    q, k, v, idx, counts = _case(head_dim + len(str(splits)), b, h, head_dim, s_q, s_kv, 5, dtype)
    counts[0, 0, 0], counts[1, 2, 1] = 0, idx.shape[-1]  # an empty row, a full one
    poisoned = torch.full_like(q, float("nan"), device="cuda")
    got, lse = bsh.block_sparse_attention_hopper(q, k, v, idx, counts, return_lse=True,
                                                 out=poisoned, num_splits=splits, **VARIANTS[variant])
    assert got is poisoned
    want, want_lse = dense_reference(q.cpu(), k.cpu(), v.cpu(), allowed_mask(idx.cpu(), counts.cpu(), s_q, s_kv, 128,
                                                                              128))
    empty = ~torch.isfinite(want_lse)
    assert empty.any() and not torch.isnan(got).any()
    want = torch.where(empty.permute(0, 2, 1)[..., None], 0.0, want)
    torch.testing.assert_close(got.cpu().double(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse.cpu()[~empty].double(), want_lse[~empty], rtol=5e-3, atol=5e-3)
    assert torch.isneginf(lse.cpu()[empty]).all()


@hopper_only
@every_kernel
@pytest.mark.parametrize("splits", [1, 3])
def test_every_block_listed_and_unordered_lists_match_float64(splits, variant):
    """Dense lists (every block, the ring refilled many times over) in reverse order, at Wan's head dim."""
    b, h, s_q, s_kv = 1, 2, 256, 128 * 11
    q, k, v, idx, counts = _case(7, b, h, 128, s_q, s_kv, 11, torch.bfloat16, unordered=True)
    got = bsh.block_sparse_attention_hopper(q, k, v, idx, counts, num_splits=splits, **VARIANTS[variant])
    want, _ = dense_reference(q.cpu(), k.cpu(), v.cpu())
    torch.testing.assert_close(got.cpu().double(), want, rtol=2e-2, atol=2e-2)


@hopper_only
@every_kernel
@pytest.mark.parametrize("splits", [1, 2, 3])
def test_a_key_bias_with_holes_and_a_resumed_partial_match_float64(splits, variant):
    """TempCache's log-count bias (with -inf holes: a whole block, part of one) and the split read's resume: a
    partial over 40 other keys (rows it never saw: lse -inf) continued over the listed ones, out aliasing it."""
    b, h, s_q, s_kv, s_x = 1, 2, 200, 530, 40
    q, k, v, idx, counts = _case(11 + splits, b, h, 128, s_q, s_kv, 4, torch.bfloat16)
    g = torch.Generator().manual_seed(splits)
    bias = torch.randn(b, s_kv, h, generator=g)
    bias[:, 128:256] = -float("inf")
    bias[:, 300:330] = -float("inf")
    k_x, v_x = (torch.randn(b, s_x, h, 128, generator=g).bfloat16() for _ in range(2))
    seen_x = torch.ones(b, h, s_q, s_x, dtype=torch.bool)
    seen_x[:, :, :7] = False
    out0, lse0 = dense_reference(q.cpu(), k_x, v_x, seen_x)
    out0 = torch.where(torch.isfinite(lse0).permute(0, 2, 1)[..., None], out0, 0.0)
    init = (out0.to(torch.bfloat16).cuda(), lse0.float().cuda())
    got, lse = bsh.block_sparse_attention_hopper(q, k, v, idx, counts, key_bias=bias.cuda(),
                                                 initial=init, out=init[0], return_lse=True, num_splits=splits,
                                                 **VARIANTS[variant])
    assert got is init[0]
    allowed = torch.cat([seen_x, allowed_mask(idx.cpu(), counts.cpu(), s_q, s_kv, 128, 128)], -1)
    bias_all = torch.cat([torch.zeros(b, s_x, h), bias], 1)
    want, want_lse = dense_reference(q.cpu(), torch.cat([k_x, k.cpu()], 1), torch.cat([v_x, v.cpu()], 1), allowed,
                                     bias_all)
    empty = ~torch.isfinite(want_lse)
    want = torch.where(empty.permute(0, 2, 1)[..., None], 0.0, want)
    torch.testing.assert_close(got.cpu().double(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse.cpu()[~empty].double(), want_lse[~empty], rtol=5e-3, atol=5e-3)


@hopper_only
@every_kernel
def test_it_matches_the_triton_kernel_to_bf16_rounding(variant):
    from genkv.kernels.block_sparse import block_sparse_attention_triton

    q, k, v, idx, counts = _case(3, 1, 4, 128, 640, 128 * 9 + 17, 7, torch.bfloat16)
    got = bsh.block_sparse_attention_hopper(q, k, v, idx, counts, num_splits=1, **VARIANTS[variant]).float()
    want = block_sparse_attention_triton(q, k, v, idx, counts, num_splits=1, hopper=False).float()
    assert ((got - want).norm() / want.norm()).item() < 4e-3


@hopper_only
@pytest.mark.parametrize("variant", ["ws", "pingpong"])
def test_the_warp_specialised_kernels_match_the_plain_one(variant, monkeypatch):
    """The same softmax steps in the same order: the kernels agree to float rounding, on long lists (the ring
    refilled many times over, an odd count for the ping-pong's turns) with a split, a bias and the LSE; the env
    switches pick the same kernels as the arguments."""
    q, k, v, idx, counts = _case(9, 2, 3, 128, 500, 128 * 13 + 5, 13, torch.bfloat16)
    bias = torch.randn(2, k.shape[1], 3, device="cuda")
    kw = dict(key_bias=bias, return_lse=True, num_splits=2)
    plain, plain_lse = bsh.block_sparse_attention_hopper(q, k, v, idx, counts, **VARIANTS["plain"], **kw)
    got, got_lse = bsh.block_sparse_attention_hopper(q, k, v, idx, counts, **VARIANTS[variant], **kw)
    assert ((got.float() - plain.float()).norm() / plain.float().norm()).item() < 1e-3
    torch.testing.assert_close(got_lse, plain_lse, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("GENKV_HOPPER_WS", "1")
    monkeypatch.setenv("GENKV_HOPPER_PINGPONG", "1" if variant == "pingpong" else "0")
    env, _ = bsh.block_sparse_attention_hopper(q, k, v, idx, counts, **kw)
    assert torch.equal(env, got)


def test_the_kernel_switches(monkeypatch):
    """Ping-pong by default (the fastest on an H100); each argument wins over its env and the defaults; ping-pong
    implies warp specialisation."""
    monkeypatch.delenv("GENKV_HOPPER_WS", raising=False)
    monkeypatch.delenv("GENKV_HOPPER_PINGPONG", raising=False)
    assert not bsh.DEFAULT_WS and bsh.DEFAULT_PINGPONG
    assert bsh.kernel_variant() == "pingpong" and bsh.kernel_variant(None, False) == "plain"
    assert bsh.kernel_variant(False) == "plain" and bsh.kernel_variant(True, False) == "ws"
    monkeypatch.setenv("GENKV_HOPPER_WS", "0")  # by env too, switching warp specialisation off gives the plain one
    assert bsh.kernel_variant() == "plain" and bsh.kernel_variant(None, True) == "pingpong"
    monkeypatch.setenv("GENKV_HOPPER_PINGPONG", "0")
    monkeypatch.setenv("GENKV_HOPPER_WS", "1")
    assert bsh.kernel_variant() == "ws"
    monkeypatch.delenv("GENKV_HOPPER_WS")
    assert bsh.kernel_variant() == "plain"
    monkeypatch.setenv("GENKV_HOPPER_WS", "junk")  # a value neither on nor off leaves its default, as env_flag's rule
    assert bsh.kernel_variant() == "plain"
    monkeypatch.setenv("GENKV_HOPPER_WS", "0")
    monkeypatch.setenv("GENKV_HOPPER_PINGPONG", "auto")
    assert bsh.kernel_variant() == "plain"
    monkeypatch.delenv("GENKV_HOPPER_WS")
    monkeypatch.delenv("GENKV_HOPPER_PINGPONG")
    monkeypatch.setattr(bsh, "DEFAULT_PINGPONG", False)
    assert bsh.kernel_variant() == "plain"
    assert bsh.kernel_variant(True) == "ws" and bsh.kernel_variant(None, True) == "pingpong"
    assert bsh.kernel_variant(True, True) == "pingpong"
    with pytest.raises(ValueError, match="pingpong"):
        bsh.kernel_variant(False, True)
    monkeypatch.setenv("GENKV_HOPPER_WS", "1")
    assert bsh.kernel_variant() == "ws" and bsh.kernel_variant(False) == "plain"
    monkeypatch.setenv("GENKV_HOPPER_PINGPONG", "1")
    assert bsh.kernel_variant() == "pingpong" and bsh.kernel_variant(True, False) == "ws"
    assert bsh.kernel_variant(False) == "plain"  # the argument wins over the ping-pong env too
    monkeypatch.setenv("GENKV_HOPPER_WS", "0")
    monkeypatch.setenv("GENKV_HOPPER_PINGPONG", "0")
    assert bsh.kernel_variant() == "plain" and bsh.kernel_variant(True) == "ws"


def test_only_a_triton_that_builds_the_kernel_and_an_nvidia_sm90_gpu_take_it(monkeypatch):
    """Triton 3.5's Gluon imports but lacks what the kernel uses (a read would raise instead of taking the Triton
    kernel); ROCm reports compute capability 9.x for some AMD GPUs."""
    assert not bsh.gluon_supported("3.5.1") and bsh.gluon_supported("3.6.0") and bsh.gluon_supported("3.7.1+gitabc")
    assert bsh.gluon_supported("4.0.0") and not bsh.gluon_supported("2.9.9") and not bsh.gluon_supported("3.5rc1")
    assert bsh.gluon_supported("3.6.0rc1") and bsh.gluon_supported("3.7.0.dev20260101")
    q = torch.zeros(1, 128, 1, 128, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(bsh, "gluon_supported", lambda version=None: True)
    assert bsh.hopper_kernel_applies(q, q, q)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert not bsh.hopper_kernel_applies(q, q, q)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(bsh, "gluon_supported", lambda version=None: False)
    assert not bsh.hopper_kernel_applies(q, q, q)


def test_it_refuses_what_it_does_not_cover():
    q = torch.zeros(1, 128, 1, 128)
    idx, counts = torch.zeros(1, 1, 1, 1, dtype=torch.int32), torch.ones(1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="use block_sparse_attention_triton"):
        bsh.block_sparse_attention_hopper(q, q, q, idx, counts)
    assert not bsh.hopper_kernel_applies(q, q, q)


@every_kernel
@pytest.mark.parametrize("head_dim,split,bias_resume", [(128, False, False), (128, True, False), (128, True, True),
                                                       (64, True, True)])
def test_the_sm90_build_fits_an_sm_without_spills_or_serialised_wgmma(head_dim, split, bias_resume, variant,
                                                                      tmp_path):
    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton wheel ships no ptxas")
    # In a process of its own: the suite runs Triton's interpreter, whose kernels cannot be compiled.
    code = ("import sys; from genkv.kernels.block_sparse_hopper import compile_for_sm90; "
            f"c = compile_for_sm90({head_dim}, {split}, bias={bias_resume}, resume={bias_resume}, "
            f"**{VARIANTS[variant]!r}); "
            "print(c.metadata.shared); "
            "open(sys.argv[1], 'w').write(c.asm['ptx'])")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "k.ptx")], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) <= 232448  # bytes of shared memory one block may use on sm_90
    ptx = (tmp_path / "k.ptx").read_text()
    # The overlap itself: one wait leaves a product in flight (the PV product under the next tile's softmax).
    assert "wgmma.wait_group.sync.aligned 1;" in ptx
    if variant != "plain":
        # 12 warps: the producer's warpgroup drops to WS_LOAD_REGS registers, the consumers rise to 240 (setmaxnreg;
        # ptxas' "Used N registers" below is the launch's 168, the consumers' share is checked by the spill count)
        assert re.search(rf"setmaxnreg\.dec\.sync\.aligned\.u32\s+{bsh.WS_LOAD_REGS};", ptx), "no register split"
        assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+240;", ptx), "the consumers got fewer than 240"
    report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(tmp_path / "k.ptx"), "-o",
                             str(tmp_path / "k.cubin")], capture_output=True, text=True)
    text = report.stdout + report.stderr
    assert report.returncode == 0, text[-2000:]
    assert re.search(r"0 bytes spill stores, 0 bytes spill loads", text), text
    assert not re.search(r"\(C751[45]\)", text), text


@hopper_only
def test_the_switch_sends_reads_at_the_default_launch_shape_only(monkeypatch):
    from genkv.kernels.block_sparse import block_sparse_attention_triton

    calls = []
    real = bsh.block_sparse_attention_hopper
    monkeypatch.setattr(bsh, "block_sparse_attention_hopper", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, idx, counts = _case(5, 1, 2, 128, 256, 600, 4, torch.bfloat16)
    routed = block_sparse_attention_triton(q, k, v, idx, counts, hopper=True)
    assert calls == [1] and torch.equal(routed, real(q, k, v, idx, counts))
    block_sparse_attention_triton(q, k, v, idx, counts, hopper=True, key_bias=torch.zeros(1, 600, 2, device="cuda"))
    assert calls == [1, 1]
    block_sparse_attention_triton(q, k, v, idx, counts, hopper=True, tile_n=64)
    block_sparse_attention_triton(q, k, v, idx, counts, hopper=False)
    assert calls == [1, 1]


def test_only_unquantized_reads_at_the_default_launch_shape_are_sent(monkeypatch):
    """The routing rule on its own (any machine): the switch, then no quantized history and no launch options."""
    from genkv.kernels import block_sparse as bs

    monkeypatch.setattr(bs, "_interpreting", lambda: False)
    monkeypatch.setattr(bsh, "hopper_kernel_applies", lambda q, k, v: True)
    plain = dict(history=None, block_m=128, block_n=128, tile_m=None, tile_n=None, num_warps=None, num_stages=None,
                 warp_specialize=False, tma=None)

    def takes(requested, **change):
        return bs._takes_hopper_kernel(requested, None, None, None, **{**plain, **change})

    assert takes(True) and not takes(False)
    monkeypatch.setenv("GENKV_HOPPER_KERNEL", "1")
    assert takes(None)
    monkeypatch.setenv("GENKV_HOPPER_KERNEL", "0")
    assert not takes(None) and takes(True)
    for change in (dict(history=object()), dict(block_n=64),
                   dict(tile_n=64), dict(num_warps=4), dict(num_stages=2), dict(warp_specialize=True),
                   dict(tma=False)):
        assert not takes(True, **change), change
