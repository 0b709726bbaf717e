"""A classifier-free-guided rollout through the cache equals two independent single-branch references.

Each CFG branch keeps its own cache: the cond branch's history K/V are the clean chunks seen through the prompt,
the uncond branch's the same clean chunks seen through the negative prompt. The reference has no cache at all:
at every step it runs one block-causal masked forward (diffusers' own processor) over [clean earlier chunks,
current chunk] per branch, each with its own prompt, and combines them with the guidance formula
``uncond + g * (cond - uncond)``. A branch whose chunks are never committed (or committed into the other
branch's cache) attends to a different history and fails this.
"""

import torch

import genkv
from genkv.testing import tiny_self_forcing_pipeline

from .helpers import masked_forward, reference_sampling

CHUNK = 3


def reference_cfg_rollout(pipe, embeds, negative, init_noise, seed, guidance):
    """Guided sampling without a cache: each branch a block-causal forward over its own prompt, combined."""
    def guided(seq, ts, mask_of, tpf):
        mask = mask_of(lambda q, kf: kf // CHUNK <= q // CHUNK)
        cond = masked_forward(pipe.transformer, seq, ts, embeds, mask, tpf).float()
        uncond = masked_forward(pipe.transformer, seq, ts, negative, mask, tpf).float()
        return uncond + guidance * (cond - uncond)

    return reference_sampling(pipe, init_noise, seed, guided, chunk=CHUNK)


def test_cfg_rollout_equals_two_single_branch_block_causal_references():
    pipe = tiny_self_forcing_pipeline(seed=21)
    embeds = pipe.encode_prompt("a red circle bouncing left")
    negative = pipe.encode_prompt("blurry, static")
    noise = torch.randn(1, 16, 3 * CHUNK, 4, 4, generator=torch.Generator().manual_seed(9))
    guidance = 3.0
    genkv.apply_genkv(pipe, "full")
    gen = torch.Generator().manual_seed(5)
    got = torch.cat(list(pipe.rollout(embeds, noise.shape[2], 32, 32, negative_embeds=negative,
                                      guidance_scale=guidance, generator=gen, latents=noise)), dim=2)
    stats = genkv.cache_stats(pipe)
    want = reference_cfg_rollout(pipe, embeds, negative, noise, 5, guidance)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # both branches hold every committed frame (4 tokens per 32x32 frame, 2 layers)
    assert {row["branch"] for row in stats["layers"]} == {"cond", "uncond"}
    assert all(row["tokens"] == noise.shape[2] * 4 for row in stats["layers"])
    # the guidance really mattered: an unguided rollout is far from both
    gen = torch.Generator().manual_seed(5)
    plain = torch.cat(list(pipe.rollout(embeds, noise.shape[2], 32, 32, generator=gen, latents=noise)), dim=2)
    assert (plain - want).abs().max() > 1e-2
