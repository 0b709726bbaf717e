"""VAR pipeline and scale-aware budgets on a tiny random-weight VAR (CPU)."""

import json

import pytest
import torch

import genkv
from genkv.pipelines.var import VARCheckpointError, VARPipeline
from genkv.scales import BudgetedScaleCache, ScaleBudgets, calibrate, uniform_caps
from genkv.testing import tiny_var_pipeline


def sample(pipe, labels=(1, 2, 7), seed=0):
    return pipe(class_labels=list(labels), guidance_scale=4.0, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


class _MaskedReference:
    """Attention over the whole teacher-forced sequence with VAR's block-causal training mask (no cache)."""

    def __init__(self, mask):
        self.mask = mask

    def attend(self, layer, scale, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=1.0)


def test_cached_next_scale_logits_equal_a_masked_forward_over_all_scales():
    pipe = tiny_var_pipeline(seed=1)
    model = pipe.transformer
    inputs, logits = [], []
    original = model.forward_scale

    def record(x, cond, block_cond, scale, cache, hidden_only=False):
        inputs.append(x.clone())
        out = original(x, cond, block_cond, scale, cache, hidden_only=hidden_only)
        logits.append(model.logits(out, cond) if hidden_only else out)
        return out

    model.forward_scale = record
    sample(pipe, labels=(4, 5))
    del model.forward_scale
    labels = torch.tensor([4, 5, 10, 10])  # cond rows then uncond rows, as the pipeline batches them
    cond, block_cond = model.condition(labels)
    mask = model.attn_bias_for_masking
    reference = model.forward_scale(torch.cat(inputs, 1), cond, block_cond, 0, _MaskedReference(mask))
    torch.testing.assert_close(torch.cat(logits, 1), reference, rtol=1e-4, atol=1e-4)


def test_scalekv_with_budget_one_reproduces_the_full_cache_and_remove_restores_it():
    pipe = tiny_var_pipeline()
    full = sample(pipe)
    genkv.apply_genkv(pipe, "scalekv", budget=1.0)
    assert genkv.is_patched(pipe)
    assert (sample(pipe) == full).all()
    genkv.apply_genkv(pipe, "scalekv", budget=0.2, mode="genkv")
    assert not (sample(pipe) == full).all()
    genkv.remove_genkv(pipe)
    assert not genkv.is_patched(pipe) and (sample(pipe) == full).all()


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.6])
def test_kept_bytes_never_exceed_the_budget_at_any_scale(budget):
    pipe = tiny_var_pipeline()
    sample(pipe)
    full = genkv.cache_stats(pipe)["scales"]
    genkv.apply_genkv(pipe, "scalekv", budget=budget, mode="genkv")
    sample(pipe)
    stats = genkv.cache_stats(pipe)
    assert stats["method"] == "scalekv" and stats["peak_bytes"] <= budget * max(v["total_bytes"] for v in full.values())
    caps = uniform_caps(3, (1, 2, 3, 4), budget)
    for scale, row in stats["scales"].items():
        assert row["total_bytes"] <= budget * full[scale]["total_bytes"] + 1e-9
        assert all(t <= caps[layer][scale] for layer, t in enumerate(row["tokens"]))


def test_the_kept_tokens_are_the_window_then_the_best_scored_by_a_float64_reference():
    g = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(2, 2, 9, 8, generator=g), dim=-1) * 4  # scale 2: 3x3 tokens
    k = torch.nn.functional.normalize(torch.randn(2, 2, 14, 8, generator=g), dim=-1)   # 5 history + 9 current
    v = torch.randn(2, 2, 14, 8, generator=g)
    cache = BudgetedScaleCache(1, (1, 2, 3), [[1, 5, 5]], window=4, pool_kernel=1)
    kept_k, kept_v = cache.keep(0, 2, q, k, v)
    window = torch.tensor([0, 2, 6, 8])  # a 2x2 grid of patch centres on the 3x3 map: rows/columns 0 and 2
    score = torch.softmax(q[:, :, window].double() @ k.double().transpose(-1, -2), -1).sum(2)
    score[:, :, 5 + window] = float("inf")
    for b in range(2):
        for h in range(2):
            want = sorted(score[b, h].topk(5).indices.tolist())
            assert torch.equal(kept_k[b, h], k[b, h, want]) and torch.equal(kept_v[b, h], v[b, h, want])


def test_calibration_json_round_trips_and_refuses_another_depth(tmp_path):
    pipe = tiny_var_pipeline()
    budgets = calibrate(pipe, [0, 1, 2, 3], budget=0.3)
    for s in range(1, 3):  # each scale's total stays within the budget
        assert sum(budgets.caps[layer][s] for layer in range(3)) <= sum(uniform_caps(3, (1, 2, 3, 4), 0.3)[0][s]
                                                                        for _ in range(3))
    path = tmp_path / "budgets.json"
    budgets.save(path)
    assert ScaleBudgets.load(path, depth=3, patch_nums=(1, 2, 3, 4)) == budgets
    genkv.apply_genkv(pipe, "scalekv", budgets=str(path), mode="genkv")
    sample(pipe)
    assert genkv.cache_stats(pipe)["scales"][2]["tokens"] == [budgets.caps[layer][2] for layer in range(3)]
    with pytest.raises(ValueError, match="depth 3.*depth 4"):
        deeper = tiny_var_pipeline(depth=4)
        genkv.apply_genkv(deeper, "scalekv", budgets=str(path), mode="genkv")
        sample(deeper)
    data = json.loads(path.read_text())
    data["depth"] = 5
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="calibrated for depth 5"):
        ScaleBudgets.load(path, depth=3)


def test_official_key_names_load_strictly_and_mismatches_are_listed(tmp_path):
    pipe = tiny_var_pipeline()
    var_state, vae_state = pipe.transformer.state_dict(), pipe.vqvae.state_dict()
    for key in ("word_embed.weight", "class_emb.weight", "pos_start", "pos_1LC", "lvl_embed.weight", "lvl_1L",
                "attn_bias_for_masking", "blocks.0.attn.mat_qkv.weight", "blocks.0.attn.q_bias",
                "blocks.0.attn.v_bias", "blocks.0.attn.zero_k_bias", "blocks.0.attn.scale_mul_1H11",
                "blocks.0.attn.proj.weight", "blocks.0.ffn.fc1.weight", "blocks.0.ffn.fc2.bias",
                "blocks.0.ada_lin.1.weight", "head_nm.ada_lin.1.weight", "head.weight"):
        assert key in var_state, key
    for key in ("quantize.embedding.weight", "quantize.ema_vocab_hit_SV", "quantize.quant_resi.qresi_ls.1.weight",
                "quant_conv.weight", "post_quant_conv.bias", "encoder.conv_in.weight",
                "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.down.2.attn.0.qkv.weight", "encoder.mid.attn_1.proj_out.weight",
                "decoder.up.2.block.1.conv2.weight", "decoder.up.1.upsample.conv.weight",
                "decoder.mid.block_2.conv1.weight",
                "decoder.norm_out.weight", "decoder.conv_out.weight"):
        assert key in vae_state, key
    var_path, vae_path = tmp_path / "var_tiny.pth", tmp_path / "vae_tiny.pth"
    torch.save(vae_state, vae_path)
    from genkv.pipelines.var import load_vqvae
    from genkv.pipelines.var.checkpoint import load_strict

    vqvae = load_vqvae(vae_path, (1, 2, 3, 4))
    assert all(torch.equal(a, b) for a, b in zip(vqvae.state_dict().values(), vae_state.values()))
    broken = dict(var_state)
    broken.pop("blocks.1.attn.q_bias")
    broken["blocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(VARCheckpointError, match=r"1 missing \(blocks.1.attn.q_bias\); 1 unexpected"):
        load_strict(pipe.transformer, broken, "var_tiny.pth")
    torch.save(var_state, var_path)
    with pytest.raises(VARCheckpointError, match="position table of 30 tokens"):
        VARPipeline.from_pretrained(var_path, vae=vae_path)
    with pytest.raises(VARCheckpointError, match="looks like the VQ-VAE"):
        VARPipeline.from_pretrained(vae_path, vae=vae_path)
    with pytest.raises(VARCheckpointError, match="not found"):
        VARPipeline.from_pretrained(tmp_path / "nope.pth", vae=vae_path)


def test_a_256px_schedule_checkpoint_round_trips_through_from_pretrained(tmp_path):
    from genkv.pipelines.var import MultiScaleVQVAE, VARConfig, VARTransformer

    config = VARConfig(depth=2, num_classes=5, vocab_size=16, z_channels=4, width=32, head_dim=16)  # 680 tokens
    model = VARTransformer(config).init_random(torch.Generator().manual_seed(0), std=0.2)
    vae = MultiScaleVQVAE(vocab_size=16, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, share_quant_resi=4)
    torch.save(model.state_dict(), tmp_path / "var_d2.pth")
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    pipe = VARPipeline.from_pretrained(tmp_path / "var_d2.pth", vae=tmp_path / "vae.pth")
    assert pipe.transformer.config.depth == 2 and pipe.transformer.config.patch_nums[-1] == 16
    direct = VARPipeline(model.eval(), vae.eval())
    assert (sample(pipe, labels=(1,)) == sample(direct, labels=(1,))).all()


def test_bad_input_gets_one_clear_error():
    pipe = tiny_var_pipeline()
    with pytest.raises(ValueError, match="unknown class label 10: this model has classes 0..9"):
        sample(pipe, labels=(1, 10))
    for budget in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="budget"):
            genkv.apply_genkv(pipe, "scalekv", budget=budget)
    with pytest.raises(ValueError, match="video"):
        genkv.apply_genkv(pipe, "rolling")


def test_one_int_label_is_a_batch_of_one_and_other_label_types_are_one_line_errors():
    pipe = tiny_var_pipeline()
    one = pipe(class_labels=7, guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="np")
    assert (one.images == sample(pipe, labels=(7,))).all()
    for labels in ("7", 7.0, True, None):
        with pytest.raises(ValueError, match="class_labels must be") as info:
            pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="np")
        assert "\n" not in str(info.value)


def test_an_empty_or_unsupported_checkpoint_is_a_one_line_error(tmp_path):
    from genkv.pipelines.var.checkpoint import load_var_transformer

    empty = tmp_path / "var_d30.pth"
    empty.write_bytes(b"")
    with pytest.raises(VARCheckpointError, match="the file is empty") as info:
        load_var_transformer(empty)
    assert "\n" not in str(info.value)
    pipe = tiny_var_pipeline()
    no_l2 = {k: v for k, v in pipe.transformer.state_dict().items() if "scale_mul" not in k}
    torch.save(no_l2, tmp_path / "no_l2.pth")
    with pytest.raises(VARCheckpointError, match="attn_l2_norm=False"):
        load_var_transformer(tmp_path / "no_l2.pth", patch_nums=tuple(pipe.transformer.config.patch_nums))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(VARCheckpointError, match="cannot read VAR checkpoint"):
        load_var_transformer(garbage)


def test_genkv_calibrate_writes_budgets_that_apply_genkv_reuses(tmp_path, capsys):
    from genkv.cli.main import main

    out = tmp_path / "budgets.json"
    assert main(["calibrate", "tiny-random", "--out", str(out), "--budget", "0.3", "--classes", "1,2,3",
                 "--device", "cpu"]) == 0
    budgets = ScaleBudgets.load(out, depth=3)
    assert budgets.budget == 0.3 and budgets == calibrate(tiny_var_pipeline(), [1, 2, 3], budget=0.3)
    for args, message in ((["--budget", "0"], "--budget must be in (0, 1]"),
                          (["--classes", "1,x"], "must be integers"),
                          (["--classes", "4,10"], "unknown class label 10")):
        assert main(["calibrate", "tiny-random", "--out", str(out), "--device", "cpu", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["calibrate", str(tmp_path / "missing.pth"), "--vae", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


def test_hack_with_budget_one_is_the_full_cache_and_keeps_within_budget_below():
    pipe = tiny_var_pipeline()
    full_images = sample(pipe)
    full = genkv.cache_stats(pipe)["scales"]
    genkv.apply_genkv(pipe, "hack", budget=1.0)
    assert (sample(pipe) == full_images).all()
    for budget in (0.3, 0.6):
        genkv.apply_genkv(pipe, "hack", budget=budget, mode="genkv")
        images = sample(pipe)
        assert not (images == full_images).all()
        stats = genkv.cache_stats(pipe)
        assert stats["method"] == "hack"
        for scale, row in stats["scales"].items():
            assert row["total_bytes"] <= budget * full[scale]["total_bytes"] + 1e-9


def test_hack_head_roles_from_calibration_split_each_layer(tmp_path):
    from genkv.cli.main import main
    from genkv.scales.heads import HeadAwareScaleCache

    path = tmp_path / "heads.json"
    assert main(["calibrate", "tiny-random", "--method", "hack", "--alpha", "0.5", "--out", str(path),
                 "--classes", "1,2", "--device", "cpu"]) == 0
    roles = json.loads(path.read_text())["contextual"]
    assert sum(map(sum, roles)) == 3  # half of 3 layers x 2 heads
    pipe = genkv.apply_genkv(tiny_var_pipeline(), "hack", budget=0.4, roles=str(path))
    sample(pipe)
    cache = pipe.last_cache
    assert isinstance(cache, HeadAwareScaleCache)
    for layer, mask in cache.contextual.items():
        assert mask == [bool(x) for x in roles[layer]]
    with pytest.raises(ValueError, match="depth 3.*depth 4"):
        sample(genkv.apply_genkv(tiny_var_pipeline(depth=4), "hack", budget=0.4, roles=str(path)))


def test_var_methods_refuse_video_pipelines():
    from genkv.testing import tiny_self_forcing_pipeline

    with pytest.raises(ValueError, match="next-scale"):
        genkv.apply_genkv(tiny_self_forcing_pipeline(), "scalekv", budget=0.5)


def test_bench_var_runs_on_the_tiny_model(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
    try:
        import bench_var
    finally:
        sys.path.pop(0)
    out = tmp_path / "bench.json"
    args = ["--tiny", "--repeats", "1", "--batches", "2", "--max-batch-limit", "4", "--out", str(out)]
    assert bench_var.main(args) == 0
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"full", "scalekv-0.1", "hack-0.3"}
    assert rows["scalekv-0.1"]["kv_bytes"] <= 0.1 * rows["full"]["kv_bytes"]
    assert rows["hack-0.3"]["kv_bytes"] <= 0.3 * rows["full"]["kv_bytes"]
    assert data["largest_batch"]["tiny/full"] == 4  # no OOM on a CPU: the search stops at the limit


def test_phi_refiner_choice_per_scale_matches_the_official_vqvae():
    """Scales 2 and 7 of 10 sit exactly between two of the four Phi ticks; the official VQ-VAE (numpy float64
    argmin) picks [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]. A float32 tick table picks differently there (a bug this
    test pins: the whole pipeline then matches the official sampler to 4e-7 with greedy sampling)."""
    from genkv.pipelines.var import MultiScaleVQVAE

    vae = MultiScaleVQVAE(vocab_size=8, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, share_quant_resi=4)
    phis = list(vae.quantize.quant_resi.qresi_ls)
    assert [phis.index(vae.quantize.quant_resi.at(s / 9)) for s in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_sampler_draws_from_the_top_k_top_p_restricted_softmax_and_never_a_masked_token():
    from genkv.pipelines.var.pipeline import sample_top_k_top_p

    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 3.0, 0.5, 2.5])
    # Reference in float64: keep the top 5, then the smallest prefix (by probability) whose mass reaches 0.9.
    p = logits.double().softmax(-1)
    keep = torch.zeros(7, dtype=torch.bool)
    keep[p.topk(5).indices] = True
    order = torch.where(keep, p, torch.zeros_like(p)).argsort(descending=True)
    q = torch.where(keep, p, torch.zeros_like(p)) / p[keep].sum()
    nucleus = torch.zeros(7, dtype=torch.bool)
    mass = 0.0
    for i in order.tolist():
        if mass >= 0.9:
            break
        nucleus[i], mass = True, mass + q[i].item()
    expected = torch.where(nucleus, q, torch.zeros_like(q))
    expected /= expected.sum()
    draws = sample_top_k_top_p(logits.expand(4, 50_000, 7), 5, 0.9, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws.flatten(), minlength=7).double() / draws.numel()
    assert (freq[~nucleus] == 0).all()
    assert torch.allclose(freq, expected, atol=4e-3)
    again = sample_top_k_top_p(logits.expand(4, 50_000, 7), 5, 0.9, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_sampling_and_ffn_in_image_slices_give_the_same_images():
    pipe = tiny_var_pipeline(seed=1)
    whole = pipe(class_labels=[1, 2, 3, 4, 5], generator=torch.Generator().manual_seed(0), output_type="pt").images
    pipe.sample_batch = 2
    sliced = pipe(class_labels=[1, 2, 3, 4, 5], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(whole, sliced)
    pipe.transformer.ffn_slice_elements = 64  # every FFN in slices of one image row
    assert torch.equal(whole, pipe(class_labels=[1, 2, 3, 4, 5], generator=torch.Generator().manual_seed(0),
                                   output_type="pt").images)
    pipe.sample_batch = 64
    other_seed = pipe(class_labels=[1, 2, 3, 4, 5], generator=torch.Generator().manual_seed(1), output_type="pt")
    assert not torch.equal(whole, other_seed.images)


def test_window_attention_in_batch_slices_equals_one_float64_softmax():
    from genkv.scales.cache import window_attention

    q, k = torch.randn(5, 3, 4, 8), torch.randn(5, 3, 11, 8)
    want = torch.softmax(q.double() @ k.double().transpose(-1, -2), dim=-1).sum(2)
    for elements in (1, 3 * 11 * 8 * 2, 2**27):
        got = window_attention(q, k, lambda p: p.sum(2), slice_elements=elements)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_merging_evicted_duplicate_keys_is_exact_attention():
    from genkv.scales.heads import merge_into_kept

    g = torch.Generator().manual_seed(0)
    b, h, d, distinct = 2, 3, 8, 5
    base = torch.nn.functional.normalize(torch.randn(b, h, distinct, d, generator=g, dtype=torch.float64), dim=-1)
    copies = torch.randint(0, distinct, (b, h, 7), generator=g)
    keys = torch.cat([base, base.gather(2, copies[..., None].expand(-1, -1, -1, d))], dim=2)  # 7 duplicates
    values = torch.randn(b, h, keys.shape[2], d, generator=g, dtype=torch.float64)
    counts = torch.ones(b, h, keys.shape[2], dtype=torch.float64)
    query = torch.randn(b, h, 4, d, generator=g, dtype=torch.float64) * 3
    keep = torch.arange(distinct).expand(b, h, -1)  # every distinct key kept once, every duplicate evicted
    k, v, c = merge_into_kept(keys, values, counts, keep)
    assert torch.equal(c.sum(-1), counts.sum(-1))
    want = torch.softmax(query @ keys.transpose(-1, -2), dim=-1) @ values
    got = torch.softmax(query @ k.transpose(-1, -2) + c.log()[:, :, None, :], dim=-1) @ v
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_hack_with_merge_keeps_k_v_and_counts_within_the_budget_and_budget_one_is_full():
    full = tiny_var_pipeline()
    reference = sample(full)
    full_bytes = {s: v["total_bytes"] for s, v in genkv.cache_stats(full)["scales"].items()}
    merged = genkv.apply_genkv(tiny_var_pipeline(), "hack", budget=0.4, merge=True, mode="genkv")
    images = sample(merged)
    stats = genkv.cache_stats(merged)
    for scale, row in stats["scales"].items():
        assert row["total_bytes"] <= 0.4 * full_bytes[scale] + 1e-9
    assert images.shape == reference.shape
    assert (sample(genkv.apply_genkv(tiny_var_pipeline(), "hack", budget=1.0, merge=True)) == reference).all()
    assert not (images == sample(genkv.apply_genkv(tiny_var_pipeline(), "hack", budget=0.4, mode="genkv"))).all()  # merges
    with pytest.raises(ValueError, match="merge must be true or false"):
        genkv.apply_genkv(tiny_var_pipeline(), "hack", merge=2)
