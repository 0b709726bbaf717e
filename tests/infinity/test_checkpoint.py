"""Loading Infinity checkpoints in the official layouts: strict keys, config from tensors, shards, tokenizer."""

import json

import pytest
import torch

from genkv.pipelines.infinity import (
    InfinityCheckpointError,
    InfinityConfig,
    InfinityTransformer,
    config_from_state_dict,
    load_bitwise_vae,
    load_infinity_transformer,
)
from genkv.pipelines.infinity.bsq_vae import BitwiseDecoder

CONFIG = InfinityConfig(depth=4, embed_dim=64, num_heads=4, text_channels=256, text_maxlen=20, bits=12,
                        mlp_hidden=96, block_chunks=2)


def _model(config=CONFIG, seed=0):
    return InfinityTransformer(config).init_random(torch.Generator().manual_seed(seed), std=0.1)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_key_names():
    keys = set(_model().state_dict())
    for key in ("cfg_uncond", "text_norm.weight", "text_proj_for_sos.ca.mat_q", "text_proj_for_sos.ca.mat_kv.weight",
                "text_proj_for_ca.0.weight", "text_proj_for_ca.2.bias", "pos_start", "lvl_embed.weight",
                "word_embed.weight", "shared_ada_lin.1.weight", "head_nm.ada_lin.1.weight", "head.weight",
                "block_chunks.1.module.1.sa.mat_qkv.weight", "block_chunks.0.module.0.sa.scale_mul_1H11",
                "block_chunks.0.module.0.sa.zero_k_bias", "block_chunks.0.module.1.ca.mat_q.weight",
                "block_chunks.0.module.1.ca.mat_kv.weight", "block_chunks.0.module.1.ca.v_bias",
                "block_chunks.0.module.0.ffn.fc2.weight", "block_chunks.0.module.0.ca_norm.weight",
                "block_chunks.0.module.0.ada_gss"):
        assert key in keys, key
    assert not any(k.startswith("blocks.") for k in keys)


def test_round_trip_and_config_from_tensors(tmp_path):
    model = _model()
    state = model.state_dict()
    state["attn_bias_for_masking"] = torch.zeros(1)  # a training buffer the official loader drops too
    torch.save(state, tmp_path / "infinity.pth")
    loaded = load_infinity_transformer(tmp_path / "infinity.pth")
    assert loaded.config == CONFIG
    assert _same_state(model, loaded)


@pytest.mark.parametrize("chunks", [1, 4])
def test_config_inference_reads_block_layout_and_shapes(chunks):
    config = InfinityConfig(depth=4, embed_dim=96, num_heads=3, text_channels=128, text_maxlen=7, bits=56,
                            mlp_hidden=128, block_chunks=chunks)
    inferred = config_from_state_dict(InfinityTransformer(config).state_dict())
    assert inferred == config
    assert InfinityTransformer(inferred).text_proj_for_sos.ca.heads == 1  # 128 T5 channels / 128 (official rule)


def test_missing_and_unexpected_keys_are_one_line_errors_naming_them(tmp_path):
    state = _model().state_dict()
    del state["block_chunks.1.module.0.ca.v_bias"]
    state["head.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(InfinityCheckpointError) as err:
        load_infinity_transformer(tmp_path / "bad.pth")
    message = str(err.value)
    assert "\n" not in message
    assert "1 missing (block_chunks.1.module.0.ca.v_bias)" in message
    assert "1 unexpected (head.extra)" in message


def test_wrong_shape_and_other_files_are_reported(tmp_path):
    state = _model().state_dict()
    state["head.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(InfinityCheckpointError, match=r"wrong shape \(head.bias \(3,\) != \(24,\)\)"):
        load_infinity_transformer(tmp_path / "shape.pth")
    torch.save({"trainer": {"gpt_fsdp": {}}}, tmp_path / "ar-ckpt.pth")
    with pytest.raises(InfinityCheckpointError, match=r"\['trainer'\]\['gpt_fsdp'\]"):
        load_infinity_transformer(tmp_path / "ar-ckpt.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(InfinityCheckpointError, match="cannot read"):
        load_infinity_transformer(tmp_path / "empty.pth")
    with pytest.raises(InfinityCheckpointError, match="not found"):
        load_infinity_transformer(tmp_path / "nothing.pth")
    torch.save({"vae": _vae().state_dict()}, tmp_path / "vae.pth")
    with pytest.raises(InfinityCheckpointError, match="looks like the tokenizer"):
        load_infinity_transformer(tmp_path / "vae.pth")


def test_sharded_folder_loads_like_one_file(tmp_path):
    """The 8B ships as shards with a transformers-style index (weight_map: tensor name → shard file)."""
    model = _model()
    state = model.state_dict()
    names = sorted(state)
    shards = {"model-00001-of-00002.bin": names[::2], "model-00002-of-00002.bin": names[1::2]}
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert _same_state(model, load_infinity_transformer(tmp_path))
    weight_map["not.in.any.shard"] = "model-00001-of-00002.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(InfinityCheckpointError, match="not.in.any.shard"):
        load_infinity_transformer(tmp_path)


def _vae(seed=0):
    torch.manual_seed(seed)
    return BitwiseDecoder(bits=6, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, upsample=(1, 2))


@pytest.mark.parametrize("plain_names", [False, True])
def test_tokenizer_decoder_loads_from_the_official_training_dict(tmp_path, plain_names):
    vae = _vae()
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in vae.state_dict().items()}
    if plain_names:  # the official loader also maps nn.Conv2d / nn.GroupNorm names onto its wrappers
        state = {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
                 .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias"): v for k, v in state.items()}
    extra = {"encoder.conv_in.conv.weight": torch.zeros(1), "quantizer.lfq.mask": torch.ones(6),
             "quantize.lfq.mask": torch.ones(6)}
    torch.save({"vae": {**state, **extra}, "optimizer": {}}, tmp_path / "vae.pth")
    loaded = load_bitwise_vae(tmp_path / "vae.pth")
    assert (loaded.bits, loaded.stride) == (6, 4)
    codes = torch.randn(1, 6, 3, 5)
    vae.load_state_dict(loaded.state_dict())
    assert torch.equal(loaded.decode(codes), vae.decode(codes))
    assert loaded.decode(codes).shape == (1, 3, 12, 20)


def test_tokenizer_with_unknown_keys_or_transformer_is_refused(tmp_path):
    torch.save({"vae": {**_vae().state_dict(), "discriminator.w": torch.zeros(1)}}, tmp_path / "vae.pth")
    with pytest.raises(InfinityCheckpointError, match=r"1 unexpected \(discriminator.w\)"):
        load_bitwise_vae(tmp_path / "vae.pth")
    state = {k: v for k, v in _vae().state_dict().items() if not k.endswith("conv2.conv.bias")}
    torch.save({"vae": state}, tmp_path / "missing.pth")
    with pytest.raises(InfinityCheckpointError, match="missing"):
        load_bitwise_vae(tmp_path / "missing.pth")
    torch.save(_model().state_dict(), tmp_path / "model.pth")
    with pytest.raises(InfinityCheckpointError, match="looks like an Infinity transformer"):
        load_bitwise_vae(tmp_path / "model.pth")
