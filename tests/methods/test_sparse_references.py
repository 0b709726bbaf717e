"""Sparse readers on their *sparse* paths against independent float64 references.

The pipeline-level "equals full" tests of these methods (top_k=1000, k >= prompt length) take the readers' dense
shortcuts; here the selecting code runs:

* AnnSA / fastar's self-attention reader with a small ``top_k``: the test pools query and key blocks itself (in
  float64), takes the top-k key blocks per (batch, head, query block), adds the blocks every query must read (the
  sink frames' blocks and the blocks of the chunk itself, including the one it starts in) and attends in float64
  with that block mask (and fastar's per-key log-count bias, empty slots never chosen).
* AnnCA through the pipeline: a batch of two prompts with ``top_k`` equal to the shorter one's length (so that
  prompt runs the sparse path yet must equal dense attention), against a block-causal rollout whose
  cross-attention is a float64 top-k-per-frame reference.
"""

import math

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

import genkv
from genkv.kernels.block_sparse import triton_available
from genkv.read.annsa import RoutedSelfAttention
from genkv.testing import tiny_self_forcing_pipeline

# -- AnnSA reader ------------------------------------------------------------------------------------------


class _Chunk:
    def __init__(self, tokens_per_frame):
        self.tokens_per_frame = tokens_per_frame


class _Store:
    """What RoutedSelfAttention reads of a KVCacheStore: the chunk, the branch, the step."""

    def __init__(self, tokens_per_frame, step=0, committing=False):
        self.chunk = _Chunk(tokens_per_frame)
        self.branch = "cond"
        self.step_index = step
        self._committing = committing
        self.read_stats = {}


def _pool(x, block, length):
    """(B, S, H, D) -> (B, H, n_blocks, D) float64 block means; a ragged last block averages its real rows."""
    rows = [x[:, i : min(i + block, length)].double().mean(1) for i in range(0, length, block)]
    return torch.stack(rows, 2)


def reference_routed_attention(q, k, v, bias, *, block_m, block_n, top_k, sink_tokens):
    """float64 attention of each query block over: the top-k key blocks by pooled score (blocks with no visible
    key excluded), the sink blocks and the chunk's own blocks. Returns (output, chosen block mask)."""
    b, n_q, h, d = q.shape
    n_kv = k.shape[1]
    n_hist = n_kv - n_q
    qs, ks = _pool(q, block_m, n_q), _pool(k, block_n, n_kv)
    scores = torch.einsum("bhqd,bhkd->bhqk", qs, ks) / math.sqrt(d)
    n_blocks = ks.shape[2]
    block_of_key = torch.arange(n_kv) // block_n
    if bias is not None:
        visible = torch.zeros(n_blocks, dtype=torch.bool)
        visible.index_put_((block_of_key,), (bias > -math.inf).any(-1).any(0), accumulate=True)
        scores = scores.masked_fill(~visible, -math.inf)
    ranked = scores.sort(-1, descending=True).values
    # the selection must not hinge on a near tie (the reader scores in float32)
    assert (ranked[..., top_k - 1] - ranked[..., top_k]).abs().min() > 1e-4
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(top_k, -1).indices, True)
    chosen &= scores > -math.inf
    forced = torch.zeros(n_blocks, dtype=torch.bool)
    forced[: math.ceil(sink_tokens / block_n)] = True  # the sink frames' blocks
    forced[n_hist // block_n :] = True  # the chunk's blocks, from the one it starts in
    chosen |= forced
    query_block = torch.arange(n_q) // block_m
    allowed = chosen[:, :, query_block][..., block_of_key]  # (B, H, n_q, n_kv)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(d)
    if bias is not None:
        logits = logits + bias.double().permute(0, 2, 1)[:, :, None, :]
    logits = logits.masked_fill(~allowed, -math.inf)
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v.double())
    return out, chosen


def _inputs(seed, b=2, n_hist=200, n_cur=40, h=2, d=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n_cur, h, d, generator=g)
    k = torch.randn(b, n_hist + n_cur, h, d, generator=g)
    v = torch.randn(b, n_hist + n_cur, h, d, generator=g)
    # give the queries a direction so that pooled scores spread out (block means of pure noise are tiny)
    direction = torch.randn(1, 1, h, d, generator=g)
    q = q + 2 * direction
    k = k + torch.randn(1, n_hist + n_cur, 1, 1, generator=g).sign() * direction * 1.5
    return q, k, v


@pytest.mark.parametrize("chunk_attention", ["kernel", "sdpa"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("sink_frames", [0, 2, 3])
def test_annsa_small_top_k_equals_a_float64_reference_with_the_forced_blocks(top_k, sink_frames, chunk_attention):
    """History 200 keys, chunk 40, blocks of 16: the chunk starts inside block 12, which the split read's kernel
    part must stop at key 200 (its dense part reads keys 200-239)."""
    tpf, blocks = 8, dict(block_m=16, block_n=16)
    q, k, v = _inputs(seed=10 * top_k + sink_frames)
    reader = RoutedSelfAttention(top_k=top_k, sink_frames=sink_frames, chunk_attention=chunk_attention, **blocks)
    got = reader.attend(q, k, v, None, store=_Store(tpf))
    want, chosen = reference_routed_attention(q, k, v, None, top_k=top_k, sink_tokens=sink_frames * tpf, **blocks)
    assert chosen.float().mean() < 0.6  # sparse for real
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # the routes are reused by the chunk's later steps and its clean pass (refresh="chunk"): same output
    again = reader.attend(q, k, v, None, store=_Store(tpf, step=3, committing=True))
    torch.testing.assert_close(again.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_attention,kernel", [("kernel", "auto"), ("sdpa", "auto"), ("sdpa", "triton")])
def test_fastar_reader_with_log_count_bias_and_empty_slots_equals_a_float64_reference(chunk_attention, kernel,
                                                                                      monkeypatch):
    """fastar's reader sees a fixed-layout cache: merged keys carry log(count), empty slots -inf (never chosen
    unless a forced block). The split read runs its kernel part through gather and a merge (CPU's auto) and
    through the Triton kernel resuming from the dense part."""
    if kernel == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("GENKV_KERNEL_BACKEND", kernel)
    tpf, blocks = 8, dict(block_m=16, block_n=16)
    q, k, v = _inputs(seed=5)
    count = torch.ones(k.shape[1])
    count[40:64] = 0  # empty slots: the whole block 3 and half of block 2
    count[100:130] = 3  # merged keys
    count[20] = 2
    k[:, count == 0] = 0  # the cache zeroes empty slots
    bias = count.log().view(1, -1, 1).expand(k.shape[0], -1, k.shape[2])
    for top_k in (1, 3):
        reader = RoutedSelfAttention(top_k=top_k, sink_frames=1, chunk_attention=chunk_attention, **blocks)
        got = reader.attend(q, k, v, bias, store=_Store(tpf))
        want, chosen = reference_routed_attention(q, k, v, bias, top_k=top_k, sink_tokens=tpf, **blocks)
        assert not chosen[..., 3].any()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["auto", "triton"])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_split_read_over_a_quantized_history_equals_the_reference_over_its_dequantized_keys(kind, kernel, monkeypatch):
    """A quantized cache hands the reader the chunk alone and the history as codes: the split read (dense chunk,
    kernel resuming over the routed codes) equals the float64 reference over the dequantized history."""
    from genkv.kernels import dequantize, quantize_kv

    if kernel == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("GENKV_KERNEL_BACKEND", kernel)
    tpf, blocks = 8, dict(block_m=16, block_n=16)
    q, k, v = _inputs(seed=7)
    n_hist = k.shape[1] - q.shape[1]
    history = quantize_kv(k[:, :n_hist], v[:, :n_hist], kind)
    k_hat, v_hat = dequantize(history)
    k_ref, v_ref = torch.cat([k_hat, k[:, n_hist:]], 1), torch.cat([v_hat, v[:, n_hist:]], 1)
    reader = RoutedSelfAttention(top_k=2, sink_frames=1, chunk_attention="sdpa", **blocks)
    got = reader.attend(q, k[:, n_hist:], v[:, n_hist:], None, store=_Store(tpf), history=history)
    want, chosen = reference_routed_attention(q, k_ref, v_ref, None, top_k=2, sink_tokens=tpf, **blocks)
    assert chosen.float().mean() < 0.6
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_chunk_attention_is_validated():
    with pytest.raises(ValueError, match="chunk_attention"):
        RoutedSelfAttention(chunk_attention="flash")
    with pytest.raises(ValueError, match="chunk_attention"):
        genkv.get_method("fastar", chunk_attention="flash")
    assert genkv.get_method("fastar", chunk_attention="sdpa").build_self_reader().chunk_attention == "sdpa"


def test_chunk_attention_auto_splits_on_cuda_alone_and_is_the_kernel_read_elsewhere():
    """The default, ``"auto"``: the split read on CUDA (faster there, as measured), one kernel call elsewhere, so
    a CPU render is the same computation as ``"kernel"``, bit for bit."""
    assert genkv.get_method("fastar").build_self_reader().chunk_attention == "auto"
    assert genkv.get_method("annsa").build_self_reader().chunk_attention == "auto"
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert RoutedSelfAttention().splits_read(cuda) and not RoutedSelfAttention().splits_read(cpu)
    assert not RoutedSelfAttention(chunk_attention="kernel").splits_read(cuda)
    assert RoutedSelfAttention(chunk_attention="sdpa").splits_read(cpu)
    tpf, blocks = 8, dict(block_m=16, block_n=16)
    q, k, v = _inputs(seed=11)
    auto = RoutedSelfAttention(top_k=2, chunk_attention="auto", **blocks)
    got = auto.attend(q, k, v, None, store=_Store(tpf))
    assert all(routes[2] is None for routes in auto._routes.values())  # no split-read counts made: no split
    want = RoutedSelfAttention(top_k=2, chunk_attention="kernel", **blocks).attend(q, k, v, None, store=_Store(tpf))
    assert torch.equal(got, want)


# -- AnnCA through the pipeline ----------------------------------------------------------------------------

CHUNK = 3


class _BlockCausalTopKCross(WanAttnProcessor):
    """Self-attention: diffusers' own, with a block-causal mask. Cross-attention: float64, each frame's queries
    over the top-k real prompt tokens by the frame's mean-query score, plus every padding row (Wan's padding rows
    are equal, so this is exactly what dense attention gives them)."""

    def __init__(self, mask, tokens_per_frame, real, top_k):
        super().__init__()
        self.mask, self.tpf, self.real, self.top_k = mask, tokens_per_frame, real, top_k

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, None, self.mask, rotary_emb)
        q, k, v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q = attn.norm_q(q).unflatten(2, (attn.heads, -1)).double()
        k = attn.norm_k(k).unflatten(2, (attn.heads, -1)).double()
        v = v.unflatten(2, (attn.heads, -1)).double()
        b, s, h, d = q.shape
        frames = s // self.tpf
        qf = q.unflatten(1, (frames, self.tpf))  # (B, F, T, H, D)
        out = torch.empty_like(qf)
        for i in range(b):
            real = int(self.real[i])
            score = torch.einsum("fhd,lhd->fhl", qf[i].mean(1), k[i, :real])  # each frame's mean query
            allowed = torch.zeros(frames, h, k.shape[1], dtype=torch.bool)
            allowed.scatter_(-1, score.topk(min(self.top_k, real), -1).indices, True)
            allowed[..., real:] = True  # every padding row
            logits = torch.einsum("fthd,lhd->fhtl", qf[i], k[i]) / d**0.5
            w = logits.masked_fill(~allowed[:, :, None], -math.inf).softmax(-1)
            out[i] = torch.einsum("fhtl,lhd->fthd", w, v[i])
        out = out.flatten(1, 2)
        out = out.flatten(2, 3).to(hidden_states.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def reference_annca_rollout(pipe, embeds, init_noise, seed, top_k):
    transformer, sched = pipe.transformer, pipe.scheduler
    tpf = (init_noise.shape[3] // 2) * (init_noise.shape[4] // 2)
    real = (embeds.abs().amax(-1) > 0).sum(-1)
    gen = torch.Generator().manual_seed(seed)
    saved = dict(transformer.attn_processors)
    clean = []
    try:
        for start in range(0, init_noise.shape[2], CHUNK):
            x = init_noise[:, :, start : start + CHUNK]
            n = start + CHUNK
            frame = torch.arange(n).repeat_interleave(tpf)
            mask = frame[None, :] // CHUNK <= frame[:, None] // CHUNK
            transformer.set_attn_processor(_BlockCausalTopKCross(mask, tpf, real, top_k))
            for k, (t, sigma) in enumerate(zip(sched.timesteps, sched.sigmas)):
                seq = torch.cat(clean + [x], dim=2)
                ts = torch.cat([torch.zeros(start), torch.full((CHUNK,), float(t))]).repeat_interleave(tpf)
                flow = transformer(seq, ts[None].expand(seq.shape[0], -1), embeds, return_dict=False)[0]
                x0 = sched.predict_x0(x, flow[:, :, start:], float(sigma))
                if k + 1 < len(sched):
                    x = sched.add_noise(x0, torch.randn(x.shape, generator=gen), float(sched.sigmas[k + 1]))
            clean.append(x0)
    finally:
        transformer.set_attn_processor(saved)
    return torch.cat(clean, dim=2)


def _rollout(pipe, embeds, noise, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.cat(list(pipe.rollout(embeds, noise.shape[2], 32, 32, latents=noise, generator=gen)), 2)


def test_annca_top_k_through_the_sparse_path_equals_dense_for_a_short_prompt_and_a_float64_reference():
    pipe = tiny_self_forcing_pipeline(seed=7)
    embeds = torch.cat([pipe.encode_prompt("a dog"), pipe.encode_prompt("a red circle bouncing left")])
    real = (embeds.abs().amax(-1) > 0).sum(-1)
    short, long = int(real[0]), int(real[1])
    assert short < long < embeds.shape[1]  # both padded, one longer than top_k: the sparse path runs
    noise = torch.randn(2, 16, 3 * CHUNK, 4, 4, generator=torch.Generator().manual_seed(3))
    genkv.apply_genkv(pipe, "full")
    full = _rollout(pipe, embeds, noise, seed=1)
    genkv.apply_genkv(pipe, "annca", top_k=short)
    sparse = _rollout(pipe, embeds, noise, seed=1)
    assert genkv.cache_stats(pipe)["cross_density"] < 1.0
    # every real token of the short prompt is kept: exactly dense attention for it, through select + gather
    torch.testing.assert_close(sparse[0], full[0], rtol=1e-5, atol=1e-5)
    assert (sparse[1] - full[1]).abs().max() > 1e-3
    torch.testing.assert_close(sparse, reference_annca_rollout(pipe, embeds, noise, 1, short), rtol=1e-4, atol=1e-5)
    genkv.apply_genkv(pipe, "annca", top_k=4)
    torch.testing.assert_close(_rollout(pipe, embeds, noise, seed=1), reference_annca_rollout(pipe, embeds, noise, 1, 4),
                               rtol=1e-4, atol=1e-5)
