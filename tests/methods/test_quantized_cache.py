"""Issue 22, the cache half: ``kv_dtype`` stores committed history as fp8 / int8 / int4 codes.

What is guarded: bf16 is bit-identical to not naming the field; every quantizable method runs at every kind and
its self-attention equals a float64 reference over the *dequantized* cache plus the staged chunk; commits quantize
exactly the staged tokens; int4 history bytes stay <= 0.3x bf16's over a 200-chunk rollout; a read over a long
quantized history never makes a tensor as large as the dequantized history; round-trip error on the shipped
sprites-tiny model's cached keys.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import genkv
from genkv.cache import KVCacheStore, LayerKVCache
from genkv.kernels import block_sparse_attention_torch, dequantize, quantize_kv
from genkv.keep.rolling import SinkWindow
from genkv.keep.tempcache import TemporalMerge
from genkv.read.annsa import RoutedSelfAttention
from genkv.read.dense import DenseSelfAttention
from genkv.testing import tiny_self_forcing_pipeline

KINDS = ("int8", "int4", "fp8")
#: methods whose history can be quantized, with small settings for the tiny model (3 latent frames a chunk)
QUANTIZABLE = {
    "full": {},
    "rolling": {"sink_frames": 1, "window_frames": 6},
    "annsa": {"top_k": 1, "block_m": 16, "block_n": 16},
    "annca": {},
    "tempcache": {"budget_frames": 4, "threshold": 0.5},
    "fastar": {"budget_frames": 4, "threshold": 0.5, "top_k": 1, "block_m": 16, "block_n": 16},
}
#: loose bounds on one attention output vs the float64 reference over the dequantized cache: they hold the
#: reader's arithmetic (fp32 tiles), not the quantization (which the reference shares)
READ_TOLERANCE = 1e-4


def _rollout(method: str, frames: int = 33, **settings):
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=0), method, **settings)
    video = pipe(prompt="a red circle", num_frames=frames, output_type="np",
                 generator=torch.Generator().manual_seed(0)).frames
    return pipe, video


@pytest.mark.parametrize("method", ["full", "rolling", "annsa", "annca", "tempcache", "fastar"])
def test_bf16_is_bit_identical_to_not_naming_it(method):
    settings = QUANTIZABLE.get(method, {})
    _, plain = _rollout(method, **settings)
    _, named = _rollout(method, kv_dtype="bf16", **settings)
    np.testing.assert_array_equal(plain, named)


def test_bad_kv_dtype_is_one_line_naming_the_choices():
    with pytest.raises(ValueError, match=r"^rolling: kv_dtype must be one of bf16, fp8, int8, int4, got 'int3'$"):
        genkv.get_method("rolling", kv_dtype="int3")
    assert genkv.get_method("full", kv_dtype="int4").kv_dtype == "int4"
    assert genkv.get_method("full").replace(kv_dtype="int8").kv_dtype == "int8"  # the --set path (strings)
    with pytest.raises(ValueError, match="kv_dtype must be one of bf16, got 'int4'"):
        genkv.get_method("hack", kv_dtype="int4")  # the next-scale (VAR) caches are not quantized


def _reference(query, key, value, bias, history):
    """float64 softmax attention over [dequantized history, chunk] with the bias (B, S, H) or none."""
    k_hat, v_hat = dequantize(history)
    k_all = torch.cat([k_hat.double(), key.double()], 1)
    v_all = torch.cat([v_hat.double(), value.double()], 1)
    logits = torch.einsum("bqhd,bkhd->bhqk", query.double(), k_all) / math.sqrt(query.shape[-1])
    if bias is not None:
        logits = logits + bias.double().permute(0, 2, 1)[:, :, None]
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v_all)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(QUANTIZABLE))
def test_each_method_runs_and_reads_the_dequantized_cache(method, kind):
    pipe, video = _rollout(method, kv_dtype=kind, **QUANTIZABLE[method])
    assert np.isfinite(video).all()
    store = genkv.get_store(pipe)
    stats = genkv.cache_stats(pipe)
    assert stats["tokens"] > 0
    cache = store.caches["cond"][0]
    assert cache.k is None and cache.quant is not None and cache.quant.codes.kind == kind
    # One more attention call of layer 0 over the cache the rollout left, against float64 over its dequantized
    # contents: the reader sees exactly the stored codes and the staged chunk.
    g = torch.Generator().manual_seed(1)
    heads, dim = cache.quant.chunk_k.shape[2:]
    n = 2 * store.chunk.tokens_per_frame
    query, key, value = (torch.randn(1, n, heads, dim, generator=g) for _ in range(3))
    staged_k, staged_v, bias = cache.stage(key, value)
    history = cache.quantized_history()
    assert history.length == cache.length and torch.equal(staged_k, key)
    reader = DenseSelfAttention()
    out = reader.attend(query, staged_k, staged_v, bias, history=history)
    ref = _reference(query, key, value, bias, history)
    assert (out.double() - ref).abs().max() < READ_TOLERANCE


@pytest.mark.parametrize("kind", KINDS)
def test_routed_read_over_codes_matches_the_block_sparse_reference(kind):
    pipe, _ = _rollout("annsa", frames=49, kv_dtype=kind, **QUANTIZABLE["annsa"])
    store = genkv.get_store(pipe)
    cache = store.caches["cond"][1]
    g = torch.Generator().manual_seed(2)
    heads, dim = cache.quant.chunk_k.shape[2:]
    n = store.chunk.num_tokens
    query, key, value = (torch.randn(1, n, heads, dim, generator=g) for _ in range(3))
    staged_k, staged_v, bias = cache.stage(key, value)
    history = cache.quantized_history()
    reader = RoutedSelfAttention(block_m=16, block_n=16, top_k=1, refresh="step")
    out = reader.attend(query, staged_k, staged_v, bias, history=history, store=store, layer_index=1)
    indices, counts, _ = reader._routes[(store.branch, 1)]
    assert int(counts.min()) < math.ceil((history.length + n) / 16)  # really sparse
    k_hat, v_hat = dequantize(history)
    ref = block_sparse_attention_torch(query.double(), torch.cat([k_hat.double(), key.double()], 1),
                                       torch.cat([v_hat.double(), value.double()], 1), indices, counts,
                                       block_m=16, block_n=16)
    assert (out.double() - ref).abs().max() < READ_TOLERANCE


@pytest.mark.parametrize("kind", KINDS)
def test_commit_quantizes_exactly_the_staged_chunk(kind):
    store = KVCacheStore(SinkWindow(1, 3, None, rebase=False), num_layers=1, rope=None, kv_dtype=kind)
    store.reset()
    g = torch.Generator().manual_seed(0)
    committed = []
    for chunk in range(4):  # the last commits evict: moved slots keep their codes
        store.begin_chunk(chunk, 1, 8)
        k, v = torch.randn(1, 8, 2, 32, generator=g), torch.randn(1, 8, 2, 32, generator=g)
        store.layer(0).stage(k, v)
        store.commit()
        committed.append((k, v))
    cache = store.caches["cond"][0]
    k_hat, v_hat = dequantize(cache.quantized_history())
    frames = cache.frame_host[: cache.length]
    assert sorted(set(frames.tolist())) == [0, 2, 3]  # the sink and the newest two frames
    smoothing = cache.quant.codes.key_channel_scale
    for frame in (0, 2, 3):
        rows = np.flatnonzero(frames == frame)
        k, v = committed[frame]
        expected = quantize_kv(k, v, kind, smoothing)
        k_exp, v_exp = dequantize(expected)
        assert torch.equal(k_hat[:, rows], k_exp) and torch.equal(v_hat[:, rows], v_exp)


def _kv_bytes(kind: str, chunks: int, heads: int = 12, dim: int = 128) -> list[tuple[int, int, int]]:
    """(tokens, history bytes, all bytes) after each chunk of a rolling rollout driven through the store."""
    # a 28-frame history and 3-frame chunks (Self-Forcing's chunk; the bf16 staging buffer is a chunk's worth)
    store = KVCacheStore(SinkWindow(1, 30, None, rebase=False), num_layers=1, rope=None, kv_dtype=kind)
    store.reset()
    key = torch.randn(1, 3 * 4, heads, dim).to(torch.bfloat16)
    rows = []
    for chunk in range(chunks):
        store.begin_chunk(3 * chunk, 3, 4)
        store.layer(0).stage(key, key)
        store.commit()
        stats = store.stats()
        assert stats["used_bytes"] == sum(layer["used_bytes"] for layer in stats["layers"])
        rows.append((stats["tokens"], stats["used_bytes"], stats["bytes"]))
    return rows


def test_int4_history_holds_under_0_3x_the_bytes_of_bf16_constant_over_200_chunks():
    bf16, int4 = _kv_bytes("bf16", 200), _kv_bytes("int4", 200)
    assert [r[0] for r in bf16] == [r[0] for r in int4]  # same tokens, chunk after chunk
    ratios = [q[1] / b[1] for b, q in zip(bf16, int4)]
    assert max(ratios) <= 0.3 and max(ratios) - min(ratios) < 1e-4  # (int() rounding of bytes)
    assert len({r[2] for r in int4[3:]}) == 1  # allocated once: constant once the window is full
    # Everything held (records, and the staged chunk, which stays bf16 until its commit) is still well under
    # bf16's: 0.26 of the codes' slots plus one chunk in bf16.
    assert int4[-1][2] / bf16[-1][2] < 0.4


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (bytes) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("reader", ["dense", "annsa"])
def test_reads_never_materialize_the_history_in_full_precision(reader):
    heads, dim, n_hist, n = 2, 16, 32768, 64
    g = torch.Generator().manual_seed(0)
    history = quantize_kv(torch.randn(1, n_hist, heads, dim, generator=g),
                          torch.randn(1, n_hist, heads, dim, generator=g), "int4")
    query, key, value = (torch.randn(1, n, heads, dim, generator=g) for _ in range(3))
    one_dequantized_tensor = n_hist * heads * dim * 4  # fp32 keys (or values) of the whole history
    if reader == "dense":
        attend = DenseSelfAttention().attend
        kwargs = {}
    else:
        store = KVCacheStore(SinkWindow(0, 4, None, rebase=False), 1, None)
        store.reset()
        store.begin_chunk(0, 1, n)
        attend = RoutedSelfAttention(block_m=16, block_n=64, top_k=4).attend
        kwargs = {"store": store}
    with _LargestTensor() as seen:
        attend(query, key, value, None, history=history, **kwargs)
    assert seen.largest < one_dequantized_tensor / 2


@pytest.mark.parametrize("kind,key_bound,value_bound", [("int8", 0.02, 0.02), ("fp8", 0.04, 0.04),
                                                        ("int4", 0.25, 0.2)])
def test_round_trip_error_on_sprites_tiny_cached_keys(kind, key_bound, value_bound):
    from genkv.zoo import load_shipped

    pipe = genkv.apply_genkv(load_shipped("sprites-tiny"), "full")
    pipe(prompt="a red circle moving left", num_frames=9, output_type="np",
         generator=torch.Generator().manual_seed(0))
    errors = []
    for cache in genkv.get_store(pipe).caches["cond"]:
        k, v = cache.k[:, : cache.length].float(), cache.v[:, : cache.length].float()
        k_hat, v_hat = dequantize(quantize_kv(k, v, kind))
        errors.append(((k_hat - k).norm() / k.norm(), (v_hat - v).norm() / v.norm()))
    worst_key, worst_value = (max(float(e[i]) for e in errors) for i in (0, 1))
    assert worst_key < key_bound and worst_value < value_bound, (worst_key, worst_value)


@pytest.mark.parametrize("kind", KINDS)
def test_rebasing_requantizes_only_the_moved_keys(kind):
    from genkv.cache import QuantizedHistory

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 12, 2, 16, generator=g), torch.randn(1, 12, 2, 16, generator=g)
    hist = QuantizedHistory(kind)
    hist.reserve(k, capacity=12, length=0)
    hist.stage(k, v)
    hist.write(torch.arange(12), 12)
    before = {name: getattr(hist.codes, name).clone() for name in ("k_codes", "v_codes", "v_scale")}
    k_before = dequantize(hist.prefix(12))[0]
    moved = torch.tensor([3, 4, 10])
    hist.rotate_keys(moved, lambda keys: keys.neg_())  # a sign flip: exactly representable in every format
    k_after = dequantize(hist.prefix(12))[0]
    assert torch.equal(k_after[:, moved], -k_before[:, moved])
    still = torch.tensor([i for i in range(12) if i not in (3, 4, 10)])
    assert torch.equal(k_after[:, still], k_before[:, still])
    for name in ("v_codes", "v_scale"):  # values keep their codes: never re-quantized
        assert torch.equal(getattr(hist.codes, name).view(torch.uint8) if kind == "fp8" and name == "v_codes"
                           else getattr(hist.codes, name),
                           before[name].view(torch.uint8) if kind == "fp8" and name == "v_codes" else before[name])


def test_rolling_rebases_a_quantized_window():
    settings = {"sink_frames": 1, "window_frames": 6, "max_position": 7}
    pipe, video = _rollout("rolling", frames=49, kv_dtype="int8", **settings)
    _, reference = _rollout("rolling", frames=49, **settings)
    assert genkv.get_store(pipe).position_shift > 0
    assert np.abs(video - reference).max() < 0.15  # int8 history: close to the bf16 rollout


def _tempcache_rollout(kind: str, chunks: int = 6, layers: int = 2, tpf: int = 8,
                       dtype: torch.dtype = torch.float32, max_count: int | None = None) -> KVCacheStore:
    """A TempCache commit sequence on near-duplicate keys (frames repeat one frame plus noise: many merges), staged
    in ``dtype``."""
    keeper = TemporalMerge(0.9, 1, 1, 5, None, match="stored", max_count=max_count)
    store = KVCacheStore(keeper, num_layers=layers, rope=None, kv_dtype=kind)
    store.reset()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, tpf, 2, 32, generator=g)
    for chunk in range(chunks):
        store.begin_chunk(2 * chunk, 2, tpf, grid=(2, 4))
        for layer in range(layers):
            k = torch.cat([base + 0.05 * torch.randn(1, tpf, 2, 32, generator=g) for _ in range(2)], 1)
            store.layer(layer).stage(k.to(dtype), torch.randn(1, 2 * tpf, 2, 32, generator=g).to(dtype))
        store.commit()
    return store


@pytest.mark.parametrize("max_count", [None, 2])
@pytest.mark.parametrize("kind,bound", [("int8", 0.01), ("fp8", 0.04), ("int4", 0.12)])
def test_tempcache_merges_over_codes_like_the_bf16_cache(kind, bound, max_count):
    """Capped too: a capped group's running average is blended over codes with the weights the bf16 cache uses."""
    reference = _tempcache_rollout("bf16", max_count=max_count)
    quantized = _tempcache_rollout(kind, max_count=max_count)
    for plain, coded in zip(reference.caches["cond"], quantized.caches["cond"]):
        n = plain.length
        # the same merges and evictions: identical slots, frames and counts
        assert torch.equal(plain.frame_index[:n], coded.frame_index[:n])
        assert torch.equal(plain.token_count[:n], coded.token_count[:n])
        live = plain.token_count[:n] > 0
        assert int((plain.token_count[:n] > 1).sum()) > 0  # merged groups exist
        if max_count is not None:
            assert plain.token_count[:n].max() == max_count  # groups met the cap
        k_hat, v_hat = dequantize(coded.quantized_history())
        for stored, exact in ((k_hat, plain.k[:, :n]), (v_hat, plain.v[:, :n])):
            assert ((stored - exact)[:, live].norm() / exact[:, live].norm()) < bound


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_the_merge_score_kernel_scores_a_quantized_history_as_the_torch_scores_do(kind, monkeypatch):
    """The candidates of a quantized history come dequantized in float32, the staged keys in their own dtype: the
    one-pass kernel takes the pair (run here under the interpreter) and commits what the torch scores commit."""
    import genkv.keep.tempcache as tempcache
    from genkv.kernels import pair_scores as kernel

    if not kernel.triton_runs_on(torch.empty(1)):  # a GPU machine: CPU tensors reach Triton only when interpreted
        pytest.skip("the kernel takes CPU tensors under TRITON_INTERPRET=1 only; test_pair_scores runs it on CUDA")
    monkeypatch.setattr(tempcache, "_PAIR_SCORES_KERNEL", None)
    torch_path = _tempcache_rollout(kind, dtype=torch.float16)  # staged in 16 bits, as a model's keys
    calls = []
    monkeypatch.setattr(tempcache, "_PAIR_SCORES_KERNEL", kernel)
    monkeypatch.setattr(tempcache, "_KERNEL_ON_CPU", True)
    monkeypatch.setattr(kernel, "pair_scores_triton",
                        lambda *args, real=kernel.pair_scores_triton: calls.append(args[0].dtype) or real(*args))
    with_kernel = _tempcache_rollout(kind, dtype=torch.float16)
    assert calls and set(calls) == {torch.float32}  # every merging commit scored by the kernel, on dequantized keys
    for a, b in zip(torch_path.caches["cond"], with_kernel.caches["cond"]):
        assert int((a.token_count > 1).sum()) > 0  # groups formed: the scores decided something
        assert torch.equal(a.frame_index, b.frame_index) and torch.equal(a.token_count, b.token_count)
        for x, y in zip(dequantize(a.quantized_history()), dequantize(b.quantized_history())):
            assert torch.equal(x, y)


def _core_test_module(name: str):
    """A module of tests/core, loaded by path (tests is no package), for its helpers."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "core" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_genkv_core_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _host_sync_probe():
    """tests/core/test_host_syncs.py's recorder of host reads of tensor values, and the reads it allows."""
    module = _core_test_module("test_host_syncs")
    return module._host_reads, module._ALLOWED


@pytest.mark.parametrize("method, settings", [
    ("fastar", dict(top_k=2, prompt_top_k=2, block_m=16, block_n=16)),
    ("tempcache", {}),
    ("rolling", dict(window_frames=6)),
])
def test_a_steady_quantized_chunk_reads_no_device_value_on_the_host(method, settings):
    host_reads, allowed = _host_sync_probe()
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=3), method, kv_dtype="int4", **settings)
    rollout = pipe.rollout(pipe.encode_prompt("a red circle"), 15, 32, 32, generator=torch.Generator().manual_seed(0))
    next(rollout)
    next(rollout)  # past the first chunks: buffers allocated, smoothing measured, budgets reached
    sites = host_reads(lambda: next(rollout))
    rollout.close()
    assert sites
    offending = {site: n for site, n in sites.items() if site[:2] not in allowed}
    assert not offending, f"host reads of tensor values inside the chunk loop: {offending}"


@pytest.mark.parametrize("kind", ("bf16",) + KINDS)
@pytest.mark.parametrize("method", ["rolling", "tempcache", "fastar"])
def test_budget_bytes_takes_the_most_frames_that_fit(method, kind):
    from genkv.cache import layer_cache_bytes

    budget = 60_000
    settings = {k: v for k, v in QUANTIZABLE[method].items() if k not in ("budget_frames", "window_frames")}
    pipe, _ = _rollout(method, frames=49, kv_dtype=kind, budget_bytes=budget, **settings)
    stats = genkv.cache_stats(pipe)
    fitted = stats["budget"]
    assert stats["bytes"] == fitted["bytes"] <= budget  # the prediction is what the caches allocate
    store = genkv.get_store(pipe)
    chunk = store.chunk
    one_more = fitted["history_tokens"] + chunk.tokens_per_frame
    assert store.num_layers * layer_cache_bytes(one_more, chunk.num_tokens, kind, store.model_shape) > budget
    if kind == "int4":
        plain, _ = _rollout(method, frames=17, budget_bytes=budget, **settings)
        assert fitted["history_tokens"] >= 3 * genkv.cache_stats(plain)["budget"]["history_tokens"]


_SCALES_PROBE = """
import hashlib, json, sys, torch, genkv
from genkv.testing import tiny_self_forcing_pipeline
pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=0), "fastar", kv_dtype="int4", budget_bytes=60_000)
video = pipe(prompt="a red circle", num_frames=33, output_type="np", generator=torch.Generator().manual_seed(0)).frames
stats = genkv.cache_stats(pipe)
hist = genkv.get_store(pipe).caches["cond"][0].quantized_history()
print(json.dumps(dict(bytes=stats["bytes"], predicted=stats["budget"]["bytes"],
                      tokens=stats["budget"]["history_tokens"], scales=str(hist.k_scale.dtype),
                      zeros=str(hist.v_zero.dtype), frames=hashlib.sha256(video.tobytes()).hexdigest())))
"""


def test_float32_stored_scales_render_the_same_video_and_budget_what_they_allocate():
    """``GENKV_KV_SCALES=fp32`` (read at import, so each storage in its own process): the same frames bit for bit
    (the scale values are fp16's either way), the byte budget predicting what the caches allocate with 4-byte
    scales, and fewer history tokens fitting the same budget."""
    import json
    import os
    import subprocess
    import sys

    runs = {}
    for storage in ("fp16", "fp32"):
        env = dict(os.environ, GENKV_KV_SCALES=storage)
        proc = subprocess.run([sys.executable, "-c", _SCALES_PROBE], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[storage] = json.loads(proc.stdout.strip().splitlines()[-1])
    half, single = runs["fp16"], runs["fp32"]
    assert (half["scales"], half["zeros"], single["scales"], single["zeros"]) == (
        "torch.float16", "torch.float16", "torch.float32", "torch.float32")
    assert single["frames"] == half["frames"]
    for run in (half, single):
        assert run["bytes"] == run["predicted"] <= 60_000
    assert single["tokens"] <= half["tokens"]


def test_budget_bytes_is_refused_by_methods_that_keep_every_token():
    with pytest.raises(ValueError, match="^annsa: budget_bytes needs a bounded method"):
        genkv.get_method("annsa", budget_bytes=10**9)


def test_a_quantized_fixed_layout_runs_a_whole_video_on_two_signatures():
    """CUDA graphs: with int4 codes fastar still keeps one layout for the video (the codes, chunk buffers and
    records never move), so past the first forward two signatures serve every chunk, as with bf16."""
    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(seed=3), "fastar", kv_dtype="int4", top_k=2, prompt_top_k=2,
                             block_m=16, block_n=16)
    store = genkv.get_store(pipe)
    seen, flow_at = [], pipe._flow_at

    def recording(*args, **kwargs):
        seen.append(store.graph_signature())
        return flow_at(*args, **kwargs)

    pipe._flow_at = recording
    for _ in pipe.stream("a red circle", num_frames=45, generator=torch.Generator().manual_seed(0)):
        pass
    assert len(seen) == 20 and seen[0] is None
    assert len(set(seen[5::5])) == 1 and len({s for i, s in enumerate(seen) if i % 5}) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_the_recordable_quantized_tempcache_commit_equals_the_eager_one(kind):
    def rollout(graphs):
        keeper = TemporalMerge(0.9, 1, 1, 5, None, match="stored")
        store = KVCacheStore(keeper, num_layers=2, rope=None, kv_dtype=kind)
        store.reset()
        g = torch.Generator().manual_seed(0)
        base = torch.randn(1, 8, 2, 32, generator=g)
        for chunk in range(5):
            store.begin_chunk(2 * chunk, 2, 8, grid=(2, 4))
            for layer in range(2):
                k = torch.cat([base + 0.05 * torch.randn(1, 8, 2, 32, generator=g) for _ in range(2)], 1)
                store.layer(layer).stage(k, torch.randn(1, 16, 2, 32, generator=g))
            store.commit(graphs)
        return store

    graphs = _core_test_module("test_step_graph")._RunEagerly()  # runs the recordable commit, eagerly
    recorded, eager = rollout(graphs), rollout(None)
    assert len(graphs.keys) >= 3 and graphs.keys[-1] == graphs.keys[-2]  # later commits took the recordable way
    for a, b in zip(recorded.caches["cond"], eager.caches["cond"]):
        assert torch.equal(a.frame_index, b.frame_index) and torch.equal(a.token_count, b.token_count)
        for x, y in zip(dequantize(a.quantized_history()), dequantize(b.quantized_history())):
            assert torch.equal(x, y)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_tempcache_scores_each_quantized_candidate_slot_once(kind, monkeypatch):
    """Merge scoring dequantizes the candidate slots (the previous frame's and the staged frames') once each, not
    once per token and neighbour: with radius 2 (25 neighbours) that was 25 frames' worth of fp32 keys per merging
    frame (at Wan shapes ~15 GiB, twice the history; on CUDA the compiled score kernel gathers without copies)."""
    import genkv.kernels.quant_kv as quant_kv
    from genkv.cache import ChunkInfo, LayerStack

    g = torch.Generator().manual_seed(0)
    grid, heads, dim, layers, budget_frames = (6, 8), 2, 16, 3, 6
    tpf = grid[0] * grid[1]
    keeper = TemporalMerge(threshold=0.9, radius=2, sink_frames=1, budget_frames=budget_frames, max_tokens=None)
    caches = [LayerKVCache(budget_frames * tpf, fixed=True, kv_dtype=kind) for _ in range(layers)]
    LayerStack(caches)
    base = torch.randn(1, tpf, heads, dim, generator=g)

    def commit(c):
        chunk = ChunkInfo(3 * c, 3, tpf, 3 * c, grid)
        for cache in caches:
            keys = torch.cat([base + 0.05 * torch.randn(base.shape, generator=g) for _ in range(3)], 1)
            cache.stage(keys, torch.randn(keys.shape, generator=g))
            cache.label_staged(chunk)
        keeper.commit_layers(caches, chunk)
        for cache in caches:
            cache.staged = 0

    for c in range(3):
        commit(c)
    dequantized = []
    dequantize_keys = quant_kv.dequantize_keys
    monkeypatch.setattr(quant_kv, "dequantize_keys",
                        lambda hist, *a, **k: dequantized.append(hist.k_codes.shape[1]) or dequantize_keys(hist, *a, **k))
    commit(3)
    assert dequantized == [layers * 3 * tpf]  # one pass: the previous frame and the 2 staged frames before the last
    assert int(caches[0].info["merged_groups"]) > 0  # the scoring ran and merged


@pytest.mark.parametrize("layout", ["heads", "tokens"])
def test_stacked_layers_scale_rows_start_aligned_and_bytes_stay_as_predicted(monkeypatch, layout):
    """A ``LayerStack`` lays every layer's slots end to end, so with ``heads``-laid-out scales a layer's scale rows
    start ``capacity`` slots after the previous layer's: the capacity is rounded up to ``SCALE_ALIGN`` slots (lone
    caches too, and again when a longer chunk re-allocates), so each row starts on the 16-byte boundary the kernel's
    asynchronous copies need; commits land as in a lone cache, and ``layer_cache_bytes`` (what ``budget_bytes``
    fits frames by) still predicts the bytes held exactly, under either layout."""
    import genkv.kernels.quant_kv as quant_kv
    from genkv.cache import ChunkInfo, LayerStack, ModelShape, layer_cache_bytes

    monkeypatch.setattr(quant_kv, "SCALE_LAYOUT", layout)
    g = torch.Generator().manual_seed(3)
    tpf, heads, dim = 10, 2, 16  # 3-frame chunks of 30 tokens: no capacity here is a multiple of 16 by itself
    caches = [LayerKVCache(4 * tpf, fixed=True, kv_dtype="int4") for _ in range(3)]
    LayerStack(caches)
    lone = LayerKVCache(4 * tpf, fixed=True, kv_dtype="int4")
    keys, values = torch.randn(1, 3 * tpf, heads, dim, generator=g), torch.randn(1, 3 * tpf, heads, dim, generator=g)
    chunk = ChunkInfo(0, 3, tpf, 0, (2, 5))
    keeper = TemporalMerge(threshold=0.9, radius=1, sink_frames=1, budget_frames=4, max_tokens=None)
    for group in (caches, [lone]):
        for cache in group:
            cache.stage(keys, values)
            cache.label_staged(chunk)
        keeper.commit_layers(group, chunk)
    predicted = layer_cache_bytes(4 * tpf, 3 * tpf, "int4", ModelShape(heads, dim, dtype_bytes=4))
    assert caches[0].nbytes() == lone.nbytes() == predicted

    def assert_aligned(cache):
        assert cache.capacity >= 7 * tpf and (layout == "tokens" or cache.capacity % quant_kv.SCALE_ALIGN == 0)
        hist = cache.quant.codes
        for t in (hist.k_scale, hist.v_scale, hist.v_zero):
            assert quant_kv.scale_layout_of(t) == layout
            if layout == "heads":
                assert t.data_ptr() % (quant_kv.SCALE_ALIGN * t.element_size()) == 0

    for cache in [*caches, lone]:
        assert_aligned(cache)
    for cache in caches:
        hist = cache.quantized_history()
        live = lone.frame_index[: lone.length] >= 0  # (holes left by merges hold whatever an empty slot holds)
        assert torch.equal(cache.frame_index[: cache.length], lone.frame_index[: lone.length]) and live.any()
        for got, want in zip(dequantize(hist), dequantize(lone.quantized_history())):
            assert torch.equal(got[:, live], want[:, live])
    longer = torch.randn(1, 5 * tpf, heads, dim, generator=g)  # a longer chunk re-allocates the stack
    for cache in caches:
        cache.stage(longer, longer)
        assert_aligned(cache)
