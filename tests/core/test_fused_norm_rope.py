"""GenKVSelfAttnProcessor's fused q/k RMSNorm + RoPE path (genkv::qk_norm_rope, opt-in: GENKV_FUSED_NORM_ROPE=1)
gives the module path's rollout on a CPU through the op's torch reference (the predicate forced on; float32, so the
two differ by float32 rounding only); on a GPU the predicate takes Wan attention in half precision by itself."""

from __future__ import annotations

import pytest
import torch

import genkv
import genkv.kernels.qk_norm_rope  # noqa: F401  (registers genkv::qk_norm_rope, which the forced path calls)
import genkv.processors as processors
from genkv.testing import tiny_self_forcing_pipeline


def _rollout(pipe, device="cpu"):
    genkv.apply_genkv(pipe, "fastar")
    embeds = pipe.encode_prompt("a red circle")
    noise = torch.randn(1, 16, 6, 8, 8, generator=torch.Generator().manual_seed(5)).to(device, pipe.transformer.dtype)
    chunks = pipe.rollout(embeds, 6, 64, 64, generator=torch.Generator(device=device).manual_seed(3), latents=noise)
    out = torch.cat(list(chunks), dim=2).double()
    genkv.remove_genkv(pipe)
    return out


def _distinct_norm_weights(pipe, seed=0):
    # the tiny model's norms start at ones: make q's and k's differ, so a swapped weight would show
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in pipe.transformer.blocks:
            for norm in (block.attn1.norm_q, block.attn1.norm_k):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)


def test_the_fused_path_on_the_cpu_gives_the_module_paths_rollout(monkeypatch):
    pipe = tiny_self_forcing_pipeline(seed=0)
    _distinct_norm_weights(pipe)
    plain = _rollout(pipe)
    calls = []
    original = processors._fused_norm_rope_applies

    def forced(attn, query, rotary_emb):
        calls.append(original(attn, query, rotary_emb))  # what it says by itself on a CPU: False
        return True

    monkeypatch.setattr(processors, "_fused_norm_rope_applies", forced)
    fused = _rollout(pipe)
    assert calls and not any(calls)
    assert (fused - plain).abs().max().item() < 1e-4 * plain.abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel path is taken on CUDA")
@pytest.mark.parametrize("upstream_norm", [False, True])
def test_the_predicate_takes_wan_attention_in_half_precision_on_the_gpu(monkeypatch, upstream_norm):
    from diffusers.models.transformers.transformer_wan import WanAttention

    from genkv.kernels import qk_norm_rope
    from genkv.pipelines.self_forcing.numerics import UpcastRMSNorm

    monkeypatch.setattr(processors, "_NORM_ROPE", qk_norm_rope)  # as GENKV_FUSED_NORM_ROPE=1 at import
    attn = WanAttention(dim=1536, heads=12, dim_head=128, eps=1e-6).cuda()
    if upstream_norm:
        attn.norm_q.__class__ = attn.norm_k.__class__ = UpcastRMSNorm
    cos, sin = torch.ones(1, 30, 1, 128, device="cuda"), torch.zeros(1, 30, 1, 128, device="cuda")
    query = torch.randn(1, 30, 1536, device="cuda")
    assert processors._fused_norm_rope_applies(attn, query.bfloat16(), (cos, sin))
    assert not processors._fused_norm_rope_applies(attn, query, (cos, sin))  # float32: the module path
    attn.norm_k.__class__ = torch.nn.LayerNorm  # anything else: the module path
    assert not processors._fused_norm_rope_applies(attn, query.bfloat16(), (cos, sin))
