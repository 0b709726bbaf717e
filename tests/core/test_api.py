"""apply_genkv / remove_genkv / cache_stats / the registry, against the unpatched model."""

import dataclasses

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanRotaryPosEmbed

import genkv
from genkv.processors import GenKVCrossAttnProcessor, GenKVSelfAttnProcessor
from genkv.testing import tiny_wan_transformer


def _inputs(seed=0, frames=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, frames, 8, 8, generator=g)
    t = torch.tensor([500.0])
    text = torch.randn(1, 12, 32, generator=g)
    return x, t, text


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs, return_dict=False)[0]


def test_patched_model_reproduces_the_unpatched_one_and_remove_restores_it_bit_for_bit():
    model = tiny_wan_transformer(seed=3)
    inputs = _inputs()
    before = _run(model, inputs)
    originals = dict(model.attn_processors)
    genkv.apply_genkv(model, "rolling", window_frames=6)
    procs = model.attn_processors
    assert all(isinstance(p, GenKVSelfAttnProcessor) for n, p in procs.items() if ".attn1." in n)
    assert all(isinstance(p, GenKVCrossAttnProcessor) for n, p in procs.items() if ".attn2." in n)
    assert not any(isinstance(p, torch.nn.Module) for p in procs.values())  # nothing enters state_dict
    torch.testing.assert_close(_run(model, inputs), before, rtol=0, atol=1e-6)
    genkv.remove_genkv(model)
    assert all(model.attn_processors[n] is p for n, p in originals.items())
    assert type(model.rope) is WanRotaryPosEmbed
    assert torch.equal(_run(model, inputs), before)
    assert not genkv.is_patched(model)


def test_apply_twice_replaces_the_method_and_remove_still_restores():
    model = tiny_wan_transformer()
    originals = dict(model.attn_processors)
    genkv.apply_genkv(model, "full")
    genkv.apply_genkv(model, "longlive")
    assert genkv.cache_stats(model)["config"] == {
        "method": "rolling", "sink_frames": 3, "window_frames": 9, "rebase_positions": True, "max_position": None
    }
    genkv.remove_genkv(model)
    assert all(model.attn_processors[n] is p for n, p in originals.items())


def test_attention_backend_setting_reaches_genkv_processors():
    model = tiny_wan_transformer()
    inputs = _inputs(1)
    reference = _run(model, inputs)
    genkv.apply_genkv(model, "full")
    model.set_attention_backend("_native_math")
    assert all(p._attention_backend is not None for p in model.attn_processors.values())
    torch.testing.assert_close(_run(model, inputs), reference, rtol=1e-5, atol=1e-6)
    genkv.remove_genkv(model)
    assert all(getattr(p._attention_backend, "value", None) == "_native_math" for p in model.attn_processors.values())


def test_backend_set_before_patching_is_kept():
    model = tiny_wan_transformer()
    model.set_attention_backend("_native_math")
    genkv.apply_genkv(model, "full")
    assert all(getattr(p._attention_backend, "value", None) == "_native_math" for p in model.attn_processors.values())


def test_registry_lists_methods_and_presets():
    assert {"full", "rolling"} <= set(genkv.list_methods())
    assert {"longlive", "self_forcing"} <= set(genkv.list_presets())
    assert genkv.get_method("self_forcing").window_frames == 21


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"window_frames": 0}, "window_frames"),
        ({"sink_frames": -1}, "sink_frames"),
        ({"window_frames": "abc"}, "window_frames"),
        ({"window_frames": 2.5}, "window_frames"),
        ({"rebase_positions": "maybe"}, "rebase_positions"),
        ({"max_position": 3}, "max_position"),
    ],
)
def test_config_validation_names_the_bad_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        genkv.get_method("rolling", **overrides)


def test_unknown_setting_and_method_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid settings: sink_frames, window_frames"):
        genkv.get_method("rolling", windows=3)
    with pytest.raises(ValueError, match="valid methods: .*full.*rolling"):
        genkv.get_method("no-such-method")


def test_set_strings_are_parsed_to_field_types():
    cfg = genkv.get_method("rolling", sink_frames="2", window_frames="12", rebase_positions="false", max_position="none")
    assert (cfg.sink_frames, cfg.window_frames, cfg.rebase_positions, cfg.max_position) == (2, 12, False, None)


def test_window_smaller_than_a_chunk_is_rejected_when_generation_starts():
    from genkv.testing import tiny_self_forcing_pipeline

    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(), "rolling", window_frames=2)
    with pytest.raises(ValueError, match="window_frames=2 is smaller than a chunk"):
        next(iter(pipe.stream("x", num_frames=9)))


def test_a_new_method_is_one_small_class():
    from genkv.keep.base import CacheKeeper

    class KeepNothing(CacheKeeper):
        method_name = "nothing"

        def max_history_tokens(self, chunk):
            return 0

        def commit(self, cache, chunk):
            cache.length = 0

    @genkv.register_method
    @dataclasses.dataclass
    class Nothing(genkv.GenKVMethod):
        name = "test-nothing"

        def build_keeper(self):
            return KeepNothing()

    from genkv.testing import tiny_self_forcing_pipeline

    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(), "test-nothing")
    list(pipe.stream("x", num_frames=21, height=32, width=32))
    assert genkv.cache_stats(pipe)["tokens"] == 0
    assert "test-nothing" in genkv.list_methods()


def test_cache_stats_counts_bytes_of_the_buffers():
    from genkv.testing import tiny_self_forcing_pipeline

    pipe = genkv.apply_genkv(tiny_self_forcing_pipeline(), "full")
    list(pipe.stream("x", num_frames=21, height=32, width=32))
    stats = genkv.cache_stats(pipe)
    layer = pipe.transformer.blocks[0].attn1
    per_token = 2 * layer.heads * (layer.inner_dim // layer.heads) * 4  # K + V, fp32
    assert stats["tokens"] == 2 * 6 * 4  # 2 layers x 6 latent frames x 4 tokens
    assert all(row["used_bytes"] == row["tokens"] * per_token for row in stats["layers"])
    assert stats["bytes"] >= sum(row["used_bytes"] for row in stats["layers"])
    with pytest.raises(ValueError, match="not patched"):
        genkv.cache_stats(tiny_wan_transformer())


def test_patching_something_that_is_not_wan_fails_clearly():
    with pytest.raises(TypeError, match="Wan-style"):
        genkv.apply_genkv(torch.nn.Linear(2, 2), "full")
    with pytest.raises(TypeError, match="pipeline or transformer"):
        genkv.apply_genkv(object(), "full")


def test_processors_are_plain_objects_with_diffusers_attributes():
    model = genkv.apply_genkv(tiny_wan_transformer(), "full")
    for proc in model.attn_processors.values():
        assert hasattr(proc, "_attention_backend") and hasattr(proc, "_parallel_config")
    assert not any("processor" in k for k in model.state_dict())
    genkv.remove_genkv(model)
    assert all(isinstance(p, WanAttnProcessor) for p in model.attn_processors.values())
