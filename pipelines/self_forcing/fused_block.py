"""A Wan block's forward with its residual adds, LayerNorms and modulations as three ``genkv::adaln`` calls (issue 20).

diffusers' ``WanTransformerBlock.forward`` runs, between its attention and feed-forward calls, three elementwise
stretches that each end in a LayerNorm (see ``genkv.kernels.adaln``). :func:`fused_block_forward` computes the
same block with each stretch as one kernel pass per token, and where the linears that read a stretch's output
are per-row FP8 (:class:`genkv.fp8.FP8Linear`, after ``enable_fp8``) the pass also writes that output's e4m3
codes, handed to them as :class:`genkv.fp8.FP8Rows`: q, k and v share one quantization, done where the row is
already in registers. The modulation table, the attention calls, the feed-forward and the last gated residual
are the block's own.

It takes CUDA tensors in half precision; anything else (the CPU, float32, a block laid out differently) runs
diffusers' forward unchanged. The attention inputs are handed over as codes only to genkv's processors (they
pass the input to the projections alone); another processor gets the normalized tensor.

On by default since 2026-12-06, when the whole path with it (and the merge-score kernel, and a channels-last
TAEHV) ran 3.5% (compiled, Wan VAE) and 8% (compiled, FP8, TAEHV) faster than without over 600 frames on an
H200 (``GENKV_FUSED_ADALN=0`` turns it off for pipelines built afterwards; :func:`apply_fused_blocks` /
:func:`remove_fused_blocks` on any Wan transformer; ``pipe.enable_fused_blocks(False)``). Apply it before compiling or
after: a compiled block calls the instance's ``forward``.

Example (CPU: the patched forward runs diffusers' own there):
    >>> from genkv.testing import tiny_self_forcing_pipeline
    >>> pipe = tiny_self_forcing_pipeline(seed=0)  # patched as it is built (GENKV_FUSED_ADALN unset)
    >>> remove_fused_blocks(pipe.transformer), any(is_fused(block) for block in pipe.transformer.blocks)
    (2, False)
    >>> apply_fused_blocks(pipe.transformer), all(is_fused(block) for block in pipe.transformer.blocks)
    (2, True)
"""

from __future__ import annotations

import torch
from torch import nn

from genkv.fp8 import FP8GeluFeedForward, FP8Linear, FP8Rows
from genkv.processors import GenKVCrossAttnProcessor, GenKVSelfAttnProcessor
from genkv.switches import env_flag, optional_kernel

from .forward_patch import is_patched, patch_forward, replaced_forward, unpatch_forward

__all__ = ["FUSED_ADALN", "apply_fused_blocks", "remove_fused_blocks", "fused_block_forward", "fusable_block",
           "fused_applies", "is_fused"]

#: whether pipelines built from now on patch their blocks (env ``GENKV_FUSED_ADALN``, read at import; on unless
#: ``GENKV_FUSED_ADALN=0``)
FUSED_ADALN: bool = env_flag("GENKV_FUSED_ADALN", True)


def _is_layer_norm(norm: nn.Module, dim: int) -> bool:
    return isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (dim,) and \
        (norm.weight is None) == (norm.bias is None)


def fusable_block(block: nn.Module) -> bool:
    """A diffusers ``WanTransformerBlock`` of the layout :func:`fused_block_forward` computes: LayerNorms over the
    model width before the self-attention and the feed-forward, a LayerNorm or nothing before the cross-attention,
    and a ``(1, 6, dim)`` modulation table."""
    table = getattr(block, "scale_shift_table", None)
    if type(block).__name__ != "WanTransformerBlock" or table is None or table.dim() != 3 or table.shape[1] != 6:
        return False
    dim = table.shape[-1]
    return (_is_layer_norm(block.norm1, dim) and _is_layer_norm(block.norm3, dim)
            and (isinstance(block.norm2, nn.Identity) or _is_layer_norm(block.norm2, dim)))


def apply_fused_blocks(transformer: nn.Module) -> int:
    """Patch every fusable Wan block of ``transformer`` with :func:`fused_block_forward`; returns how many (0
    without Triton)."""
    if optional_kernel("adaln") is None:  # no Triton (importing it registers genkv::adaln)
        return 0
    return patch_forward(transformer, fusable_block, fused_block_forward)


def remove_fused_blocks(transformer: nn.Module) -> int:
    """Undo :func:`apply_fused_blocks`; returns how many blocks got diffusers' forward back."""
    return unpatch_forward(transformer, fused_block_forward)


def fused_applies(block: nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor) -> bool:
    """Whether this call takes the fused path: CUDA, half precision, a row the kernel holds, Wan's ``temb``."""
    from genkv.kernels.adaln import adaln_applies

    return (hidden_states.is_cuda and hidden_states.dtype in (torch.float16, torch.bfloat16)
            and hidden_states.dim() == 3 and temb.dim() in (3, 4) and adaln_applies(hidden_states))


def _reads_fp8_rows(attn: nn.Module, cross: bool) -> bool:
    """Whether an attention can take its input as :class:`genkv.fp8.FP8Rows`: a genkv processor (it hands the
    input to the projections alone) and every projection reading the input a per-row FP8 linear."""
    processor = getattr(attn, "processor", None)
    if not isinstance(processor, GenKVCrossAttnProcessor if cross else GenKVSelfAttnProcessor):
        return False
    if cross:
        readers = [attn.to_q]
    else:
        readers = [attn.to_qkv] if getattr(attn, "fused_projections", False) else [attn.to_q, attn.to_k, attn.to_v]
    return all(isinstance(m, FP8Linear) and m.scaling == "row" for m in readers)


def _adaln(*args):
    # the op (kernel on CUDA, torch reference elsewhere); a name the CPU tests replace with the kernel itself
    return torch.ops.genkv.adaln(*args)


def _norm_args(norm: nn.Module) -> tuple:
    if isinstance(norm, nn.Identity):
        return None, None, 1e-6, False
    return norm.weight, norm.bias, norm.eps, True


def fused_block_forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                        rotary_emb: torch.Tensor) -> torch.Tensor:
    """``WanTransformerBlock.forward`` with its three norm stretches fused (``genkv::adaln``); diffusers' forward
    where :func:`fused_applies` says no."""
    if not fused_applies(self, hidden_states, temb):
        return replaced_forward(self)(self, hidden_states, encoder_hidden_states, temb, rotary_emb)

    # the modulation, as diffusers computes it
    if temb.dim() == 4:  # (B, S, 6, C): a modulation per token (Wan2.2 TI2V)
        parts = [p.squeeze(2) for p in (self.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
    else:  # (B, 6, C)
        parts = list((self.scale_shift_table + temb.float()).chunk(6, dim=1))
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = parts
    shape, dtype = hidden_states.shape, hidden_states.dtype

    def as_input(normed: torch.Tensor, codes: torch.Tensor, code_scale: torch.Tensor, quantized: bool):
        return FP8Rows(codes, code_scale, shape, dtype) if quantized else normed

    # 1. self-attention: norm1 + modulation
    weight, bias, eps, _ = _norm_args(self.norm1)
    quantized = _reads_fp8_rows(self.attn1, cross=False)
    _, normed, codes, code_scale = _adaln(hidden_states, None, None, weight, bias, scale_msa,
                                                         shift_msa, eps, True, not quantized, quantized)
    attn_output = self.attn1(as_input(normed, codes, code_scale, quantized), None, None, rotary_emb)

    # 2. cross-attention: the gated residual, then norm2 (or nothing)
    weight, bias, eps, normalize = _norm_args(self.norm2)
    quantized = _reads_fp8_rows(self.attn2, cross=True)
    hidden_states, normed, codes, code_scale = _adaln(
        hidden_states, attn_output, gate_msa, weight, bias, None, None, eps, normalize, normalize and not quantized,
        quantized)
    if not normalize and not quantized:
        normed = hidden_states
    attn_output = self.attn2(as_input(normed, codes, code_scale, quantized), encoder_hidden_states, None, None)

    # 3. feed-forward: the residual, then norm3 + modulation
    weight, bias, eps, _ = _norm_args(self.norm3)
    quantized = isinstance(self.ffn, FP8GeluFeedForward)
    hidden_states, normed, codes, code_scale = _adaln(
        hidden_states, attn_output, None, weight, bias, c_scale_msa, c_shift_msa, eps, True, not quantized, quantized)
    ff_output = self.ffn(as_input(normed, codes, code_scale, quantized))
    return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)


def is_fused(block: nn.Module) -> bool:
    """Whether :func:`apply_fused_blocks` patched ``block``."""
    return is_patched(block, fused_block_forward)
