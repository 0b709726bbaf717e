"""The fused Wan block forward (pipelines/self_forcing/fused_block.py: three genkv::adaln passes, FP8 codes handed
to the linears) computes diffusers' block: on a CPU the path is forced on and the kernel runs under the interpreter
(float32, so the two differ by float32 rounding only); with FP8 linears the q/k/v, cross-attention query and
feed-forward inputs arrive as codes (FP8Rows) and give the unfused FP8 rollout. On a GPU the predicate takes Wan
blocks in half precision by itself."""

from __future__ import annotations

import pytest
import torch

import genkv
import genkv.pipelines.self_forcing.fused_block as fused_block
from genkv.fp8 import FP8Linear, FP8Rows, enable_fp8
from genkv.kernels.adaln import adaln
from genkv.testing import tiny_self_forcing_pipeline

from .test_fused_norm_rope import _rollout  # a fastar rollout of the tiny model: 6 latent frames, fixed noise

pytestmark = pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch without float8")


def _random_norms_and_modulation(pipe, seed=0):
    # the tiny model's norm2 starts at weight 1 / bias 0 and its table is small: make every term count
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in pipe.transformer.blocks:
            block.norm2.weight.copy_(torch.rand(block.norm2.weight.shape, generator=g) + 0.5)
            block.norm2.bias.copy_(torch.randn(block.norm2.bias.shape, generator=g) * 0.1)
            block.scale_shift_table.copy_(torch.randn(block.scale_shift_table.shape, generator=g) * 0.3)


def _force_the_kernel(monkeypatch):
    """The fused path taken on a CPU, with the Triton kernel (interpreter) instead of the op's torch reference;
    returns what the predicate said by itself."""
    said, calls = [], []
    original = fused_block.fused_applies

    def forced(block, hidden_states, temb):
        said.append(original(block, hidden_states, temb))
        return True

    def kernel(*args):
        calls.append(args[1] is not None)
        return adaln(*args)

    monkeypatch.setattr(fused_block, "fused_applies", forced)
    monkeypatch.setattr(fused_block, "_adaln", kernel)
    return said, calls


def test_the_fused_block_gives_diffusers_rollout_on_the_cpu(monkeypatch):
    pipe = tiny_self_forcing_pipeline(seed=0)
    assert fused_block.remove_fused_blocks(pipe.transformer) == 2  # patched as built (GENKV_FUSED_ADALN's default)
    _random_norms_and_modulation(pipe)
    plain = _rollout(pipe)
    assert fused_block.apply_fused_blocks(pipe.transformer) == len(pipe.transformer.blocks) == 2
    unforced = _rollout(pipe)  # on a CPU the patched forward is diffusers' own
    assert torch.equal(unforced, plain)
    said, calls = _force_the_kernel(monkeypatch)
    fused = _rollout(pipe)
    assert said and not any(said)
    assert calls.count(False) * 2 == calls.count(True) > 0  # per block: norm1 alone, then two residual stretches
    assert (fused - plain).abs().max().item() < 1e-4 * plain.abs().max().item()
    assert fused_block.remove_fused_blocks(pipe.transformer) == 2
    assert not any(fused_block.is_fused(b) for b in pipe.transformer.blocks)


def test_with_fp8_linears_the_inputs_arrive_as_codes_and_give_the_unfused_fp8_rollout(monkeypatch):
    pipe = tiny_self_forcing_pipeline(seed=1)
    _random_norms_and_modulation(pipe, seed=1)
    enable_fp8(pipe.transformer, row_kernel=True)  # FP8GeluFeedForward: the FFN takes codes too
    plain = _rollout(pipe)
    fused_block.apply_fused_blocks(pipe.transformer)
    said, _ = _force_the_kernel(monkeypatch)
    took_codes = {"linear": 0}
    real_forward = FP8Linear.forward

    def counting(self, x):
        took_codes["linear"] += isinstance(x, FP8Rows)
        return real_forward(self, x)

    monkeypatch.setattr(FP8Linear, "forward", counting)
    fused = _rollout(pipe)
    # every block forward (one predicate call each) hands codes to q, k, v, the cross-attention's query and the
    # FFN's up projection
    assert took_codes["linear"] == 5 * len(said) > 0
    # the same codes up to e4m3 midpoints (the kernel multiplies by the inverse scale): the rollouts agree to well
    # inside FP8's own error (~1e-2 of the output, tests/core/test_fp8.py)
    assert (fused - plain).abs().max().item() < 2e-3 * plain.abs().max().item()


def test_a_processor_other_than_genkvs_gets_the_normalized_tensor_not_codes(monkeypatch):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    pipe = tiny_self_forcing_pipeline(seed=2)
    enable_fp8(pipe.transformer, row_kernel=False)
    block = pipe.transformer.blocks[0]
    assert not fused_block._reads_fp8_rows(block.attn1, cross=False)  # diffusers' processor: a tensor
    genkv.apply_genkv(pipe, "fastar")
    assert fused_block._reads_fp8_rows(block.attn1, cross=False)
    assert fused_block._reads_fp8_rows(block.attn2, cross=True)
    block.attn1.to_k = block.attn1.to_k._original.to(torch.float32)  # one projection not FP8: no codes
    assert not fused_block._reads_fp8_rows(block.attn1, cross=False)
    block.attn2.set_processor(WanAttnProcessor())
    assert not fused_block._reads_fp8_rows(block.attn2, cross=True)


def test_the_fused_block_traces_into_one_graph_with_fp8_codes(monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from genkv.compile import compile_transformer

    pipe = tiny_self_forcing_pipeline(seed=3)
    enable_fp8(pipe.transformer, row_kernel=False)
    fused_block.apply_fused_blocks(pipe.transformer)
    monkeypatch.setattr(fused_block, "fused_applies", lambda block, hidden_states, temb: True)
    eager = _rollout(pipe)
    torch._dynamo.reset()
    counters.clear()
    compile_transformer(pipe.transformer, backend="eager")
    compiled = _rollout(pipe)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()


def test_blocks_of_another_layout_are_left_alone():
    pipe = tiny_self_forcing_pipeline(seed=0)
    fused_block.remove_fused_blocks(pipe.transformer)
    block = pipe.transformer.blocks[0]
    assert fused_block.fusable_block(block)
    block.norm1 = torch.nn.GroupNorm(1, block.scale_shift_table.shape[-1])
    assert not fused_block.fusable_block(block)
    assert fused_block.apply_fused_blocks(pipe.transformer) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused path is taken on CUDA")
def test_the_predicate_takes_wan_blocks_in_half_precision_on_the_gpu():
    pipe = tiny_self_forcing_pipeline(seed=0, device="cuda", dtype=torch.bfloat16)
    block = pipe.transformer.blocks[0]
    hidden = torch.zeros(1, 8, block.scale_shift_table.shape[-1], device="cuda", dtype=torch.bfloat16)
    temb = torch.zeros(1, 6, block.scale_shift_table.shape[-1], device="cuda")
    assert fused_block.fused_applies(block, hidden, temb)
    assert not fused_block.fused_applies(block, hidden.float(), temb)
    assert not fused_block.fused_applies(block, hidden.cpu(), temb.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused path is taken on CUDA")
@pytest.mark.parametrize("fp8", [False, True])
def test_on_the_gpu_a_block_in_bfloat16_matches_diffusers_block(fp8):
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    if fp8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")
    torch.manual_seed(0)
    block = WanTransformerBlock(1536, 8960, 12, cross_attn_norm=True).cuda().bfloat16()
    with torch.no_grad():
        block.scale_shift_table.normal_(0, 0.3)
    store_pipe = tiny_self_forcing_pipeline(seed=0)  # genkv's processors (outside a rollout: plain attention)
    genkv.apply_genkv(store_pipe, "fastar")
    block.attn1.set_processor(type(store_pipe.transformer.blocks[0].attn1.processor)(
        store_pipe.transformer.blocks[0].attn1.processor.store, 0, None, block.attn1))
    block.attn2.set_processor(type(store_pipe.transformer.blocks[0].attn2.processor)(
        store_pipe.transformer.blocks[0].attn2.processor.store, 0, None, block.attn2))
    if fp8:
        enable_fp8(block, include="*")
    hidden = torch.randn(1, 4680, 1536, device="cuda", dtype=torch.bfloat16)
    context = torch.randn(1, 512, 1536, device="cuda", dtype=torch.bfloat16)
    temb = torch.randn(1, 6, 1536, device="cuda") * 0.3
    angle = torch.rand(1, 4680, 1, 64, device="cuda") * 6
    rotary = (torch.cos(angle).repeat_interleave(2, -1), torch.sin(angle).repeat_interleave(2, -1))
    with torch.no_grad():
        want = block(hidden, context, temb, rotary)
        assert fused_block.apply_fused_blocks(block) == 1
        got = block(hidden, context, temb, rotary)
    # one bf16 rounding apart at each point the block rounds (FP8: codes one e4m3 step apart at midpoints)
    error = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert error < (2e-2 if fp8 else 4e-3), error
