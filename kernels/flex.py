"""Block-sparse attention through compiled FlexAttention (CUDA): the block lists become a ``BlockMask``."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Default dynamism: the first shape compiles static, a second one recompiles with symbolic lengths that
    # then serve every later cache length (a growing or filling cache would otherwise recompile per chunk).
    return torch.compile(flex_attention)


def block_sparse_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    *,
    key_bias: torch.Tensor | None = None,
    scale: float | None = None,
    block_m: int = 128,
    block_n: int = 128,
) -> torch.Tensor:
    """(B, S, H, D) in and out; per-key bias via ``score_mod``. Recompiles once per distinct shape."""
    from torch.nn.attention.flex_attention import BlockMask

    s_q, s_kv = q.shape[1], k.shape[1]
    n_kv_blocks = -(-s_kv // block_n)
    width = kv_block_indices.shape[-1]
    if width < n_kv_blocks:
        # FlexAttention builds its dense block mask as wide as the index list, so a top-k list narrower than the
        # key blocks (block ids >= its width) indexes out of bounds: pad it (entries past a row's count are unused)
        kv_block_indices = torch.nn.functional.pad(kv_block_indices, (0, n_kv_blocks - width))
    mask = BlockMask.from_kv_blocks(
        kv_block_counts, kv_block_indices, BLOCK_SIZE=(block_m, block_n), seq_lengths=(s_q, s_kv)
    )
    score_mod = None
    if key_bias is not None:
        bias = key_bias.permute(0, 2, 1).contiguous()  # (B, H, S_kv)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, kv_idx]

    out = _compiled_flex()(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod, block_mask=mask, scale=scale
    )
    return out.transpose(1, 2)
