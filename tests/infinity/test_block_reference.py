"""One Infinity block, run scale by scale through genkv's full KV cache, against a float64 plain re-implementation
of the block over all scales at once (concatenated K/V, block-causal mask, RoPE written from its definition)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from genkv.pipelines.infinity import InfinityConfig, InfinityTransformer, scale_schedule
from genkv.pipelines.infinity.rope import rope_tables
from genkv.pipelines.infinity.text import CrossAttention
from genkv.scales.cache import FullScaleCache

SCHEDULE = scale_schedule("0.06M", 1.0)[:5]  # (1,1) (2,2) (4,4) (6,6) (8,8); positions spread over 64 x 64
FULL_SIDE = 64


def ref_rope(x, positions, base=10000.0):
    """Rotate channel pairs (2j, 2j+1): the first D/4 pairs by row * base^(-2j / (D/2)), the rest by column."""
    d = x.shape[-1]
    out = x.clone()
    for t, (row, col) in enumerate(positions):
        for j in range(d // 2):
            pos, i = (row, j) if j < d // 4 else (col, j - d // 4)
            angle = pos * base ** (-2 * i / (d // 2))
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[..., t, 2 * j], x[..., t, 2 * j + 1]
            out[..., t, 2 * j], out[..., t, 2 * j + 1] = c * a - s * b, s * a + c * b
    return out


def ref_positions(schedule):
    pos = []
    for h, w in schedule:
        pos += [(round(i * FULL_SIDE / h), round(j * FULL_SIDE / w)) for i in range(h) for j in range(w)]
    return pos


def ref_block(model, xs, cond, features, mask):
    """float64: level embeddings, AdaLN, cosine self-attention over every token with a block-causal mask, cross-
    attention to the normalised, projected text, FFN."""
    p = {k: v.double() for k, v in model.state_dict().items()}
    blk = "blocks.0."
    c, heads = model.config.embed_dim, model.config.num_heads
    d = c // heads
    x = torch.cat([x + p["lvl_embed.weight"][s] for s, x in enumerate(xs)], dim=1)
    b, n, _ = x.shape
    levels = torch.cat([torch.full((h * w,), s) for s, (h, w) in enumerate(SCHEDULE)])
    gss = p[blk + "ada_gss"] + (F.silu(cond) @ p["shared_ada_lin.1.weight"].T + p["shared_ada_lin.1.bias"]).view(-1, 1, 6, c)
    g1, g2, s1, s2, b1, b2 = gss.unbind(2)
    ln = lambda t: F.layer_norm(t, (c,), eps=1e-6)  # noqa: E731
    qkv = (ln(x) * (1 + s1) + b1) @ p[blk + "sa.mat_qkv.weight"].T
    qkv = qkv + torch.cat([p[blk + "sa.q_bias"], torch.zeros(c, dtype=torch.float64), p[blk + "sa.v_bias"]])
    q, k, v = qkv.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    temperature = p[blk + "sa.scale_mul_1H11"].clamp(max=math.log(100)).exp()
    q, k = F.normalize(q, dim=-1) * temperature, F.normalize(k, dim=-1)
    pos = ref_positions(SCHEDULE)
    q, k = ref_rope(q, pos), ref_rope(k, pos)
    scores = (q @ k.transpose(-1, -2)).masked_fill(levels[None, :] > levels[:, None], -math.inf)
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    x = x + (attn @ p[blk + "sa.proj.weight"].T + p[blk + "sa.proj.bias"]) * g1
    # text: RMS norm, MLP, then the block's cross-attention (scale 1/sqrt(D), padding masked)
    t = features * torch.rsqrt(features.pow(2).mean(-1, keepdim=True) + 1e-6) * p["text_norm.weight"]
    t = F.gelu(t @ p["text_proj_for_ca.0.weight"].T + p["text_proj_for_ca.0.bias"], approximate="tanh")
    t = t @ p["text_proj_for_ca.2.weight"].T + p["text_proj_for_ca.2.bias"]
    kv = t @ p[blk + "ca.mat_kv.weight"].T + torch.cat([torch.zeros(c, dtype=torch.float64), p[blk + "ca.v_bias"]])
    tk, tv = kv.view(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
    xn = F.layer_norm(x, (c,), p[blk + "ca_norm.weight"], p[blk + "ca_norm.bias"], eps=1e-6)
    cq = (xn @ p[blk + "ca.mat_q.weight"].T + p[blk + "ca.mat_q.bias"]).view(b, n, heads, d).transpose(1, 2)
    cs = (cq @ tk.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask[:, None, None, :], -math.inf)
    ca = (cs.softmax(-1) @ tv).transpose(1, 2).reshape(b, n, c)
    x = x + ca @ p[blk + "ca.proj.weight"].T + p[blk + "ca.proj.bias"]
    hidden = F.gelu((ln(x) * (1 + s2) + b2) @ p[blk + "ffn.fc1.weight"].T + p[blk + "ffn.fc1.bias"], approximate="tanh")
    return x + (hidden @ p[blk + "ffn.fc2.weight"].T + p[blk + "ffn.fc2.bias"]) * g2


# float64 is bounded by the RoPE tables, float32 as upstream (angles up to 64 rad, rounded at 2**-24 relative).
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-7), (torch.float32, 2e-5)])
def test_cached_block_equals_float64_reference_over_concatenated_scales(monkeypatch, dtype, tol):
    # Exact attention to the text here: the bfloat16 rounding of the official kernel is tested by the parity eval.
    monkeypatch.setattr(CrossAttention, "half_dtype", None)
    config = InfinityConfig(depth=1, embed_dim=32, num_heads=2, text_channels=24, text_maxlen=8, bits=4,
                            mlp_hidden=48, block_chunks=1, pool_heads=2)
    g = torch.Generator().manual_seed(3)
    model = InfinityTransformer(config).init_random(g, std=0.3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("scale_mul_1H11"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)  # non-trivial biases, norms, temperatures
    model = copy.deepcopy(model).to(dtype)
    b = 2
    xs = [torch.randn(b, h * w, 32, generator=g, dtype=torch.float64) for h, w in SCHEDULE]
    cond = torch.randn(b, 32, generator=g, dtype=torch.float64)
    features = torch.randn(b, 5, 24, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        _, text_kv, _ = model.encode_text(features.to(dtype), mask)
        gss = model.block_condition(cond.to(dtype))
        cache = FullScaleCache(1, tuple(h for h, _ in SCHEDULE))
        rope = rope_tables(SCHEDULE, config.head_dim)
        ours = [model.forward_scale(x.to(dtype), gss.to(dtype), text_kv, mask, s, rope[s], cache)
                for s, x in enumerate(xs)]
        reference = ref_block(model, xs, cond, features, mask)
    got = torch.cat(ours, dim=1).double()
    assert (got - reference).abs().max() < tol * reference.abs().max()
    assert (got[:, :1] - reference[:, :1]).abs().max() < 1e-12 * reference.abs().max() or dtype != torch.float64
