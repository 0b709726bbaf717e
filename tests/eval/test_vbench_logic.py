"""eval/vbench_long.py: its own logic against hand-computed values (no VBench needed), and an end-to-end run
when VBench is installed (a separate environment; skipped here)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[2] / "eval" / "vbench_long.py"


@pytest.fixture(scope="module")
def vb():
    spec = importlib.util.spec_from_file_location("genkv_eval_vbench_long", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


SCORES = {
    "subject_consistency": 0.95, "background_consistency": 0.96, "temporal_flickering": 0.97,
    "motion_smoothness": 0.98, "dynamic_degree": 0.40, "aesthetic_quality": 0.60, "imaging_quality": 0.65,
}
# (x - Min) / (Max - Min) * weight with VBench's NORMALIZE_DIC, dynamic_degree weighted 0.5, sum / 6.5.
QUALITY_BY_HAND = ((0.95 - 0.1462) / (1 - 0.1462) + (0.96 - 0.2615) / (1 - 0.2615) + (0.97 - 0.6293) / (1 - 0.6293)
                   + (0.98 - 0.706) / (0.9975 - 0.706) + 0.5 * 0.40 + 0.60 + 0.65) / 6.5


def test_quality_uses_vbench_normalisation_and_weights(vb):
    assert vb.quality_score(SCORES) == pytest.approx(QUALITY_BY_HAND, abs=1e-12)
    assert QUALITY_BY_HAND == pytest.approx(5.19632 / 6.5, abs=1e-5)  # 0.94144+0.94584+0.91907+0.93997+0.2+0.6+0.65
    assert sum(vb.QUALITY_WEIGHTS.values()) == vb.QUALITY_WEIGHT_SUM == 6.5
    with pytest.raises(ValueError, match="missing \\['dynamic_degree'\\]"):
        vb.quality_score({k: v for k, v in SCORES.items() if k != "dynamic_degree"})


def _clip(video, i, value, root="/w/videos"):
    return {"video_path": f"{root}/split_clip/{video}/{video}_{i:03d}.mp4", "video_results": value}


def test_clips_are_grouped_per_video_by_their_folder(vb):
    # VBench's own grouping makes every clip a "video" (path + text before '_'); the folder is what identifies it.
    assert vb.video_of_clip("/w/videos/split_clip/000-a-cat/000-a-cat_001.mp4") == "000-a-cat"
    assert vb.video_of_clip("/w/videos/split_clip/000-a-cat/000-a-cat_001.mp4/000-a-cat.mp4") == "000-a-cat"
    assert vb.video_of_clip("/w/videos/split_clip/012-a-car/012-a-car_full.mp4") == "012-a-car"
    clips = [_clip("000-a-cat", 0, 0.8), _clip("000-a-cat", 1, 1.0), _clip("000-a-cat", 2, 0.9),
             _clip("001-a-dog", 0, 0.7), {"long_video_cnt": 4}]
    assert vb.per_video_scores("temporal_flickering", clips) == pytest.approx({"000-a-cat": 0.9, "001-a-dog": 0.7})
    # imaging_quality clips are MUSIQ scores in 0-100; dynamic_degree clips are booleans.
    assert vb.per_video_scores("imaging_quality", [_clip("a", 0, 60.0), _clip("a", 1, 70.0)]) == {"a": 0.65}
    assert vb.per_video_scores("dynamic_degree", [_clip("a", 0, True), _clip("a", 1, False),
                                                  _clip("a", 2, False), _clip("a", 3, True)]) == {"a": 0.5}


def test_summary_aggregates_videos_and_computes_quality(vb):
    raw = {}
    for dim, value in SCORES.items():
        scale = 100.0 if dim == "imaging_quality" else 1.0
        # video a: two clips around the value; video b: one clip at value - 0.02 (dynamic_degree: 0/1 clips).
        if dim == "dynamic_degree":
            a_clips, b_clip = [_clip("000-a", 0, True), _clip("000-a", 1, False)], _clip("001-b", 0, False)
        else:
            a_clips = [_clip("000-a", 0, (value + 0.01) * scale), _clip("000-a", 1, (value - 0.01) * scale)]
            b_clip = _clip("001-b", 0, (value - 0.02) * scale)
        raw[dim] = [123.0, [*a_clips, b_clip], []]
    out = vb.summarize(raw, list(SCORES), ["000-a", "001-b"])
    agg = out["aggregate"]
    assert agg["subject_consistency"] == pytest.approx(0.94)  # mean of videos (0.95, 0.93), not of 3 clips
    assert agg["imaging_quality"] == pytest.approx(0.64) and agg["dynamic_degree"] == pytest.approx(0.25)
    assert out["videos"]["000-a"]["subject_consistency"] == pytest.approx(0.95)
    want_b = {**{d: v - 0.02 for d, v in SCORES.items()}, "dynamic_degree": 0.0}
    assert out["videos"]["001-b"]["quality"] == pytest.approx(vb.quality_score(want_b))
    assert out["quality"] == pytest.approx(vb.quality_score(agg))
    assert out["normalized"]["temporal_flickering"] == pytest.approx((agg["temporal_flickering"] - 0.6293) / 0.3707)
    assert out["clips"]["subject_consistency"] == 3 and out["vbench_overall"]["subject_consistency"] == 123.0
    assert out["notes"] == []


def test_summary_without_all_quality_dimensions_has_no_quality(vb):
    raw = {"temporal_flickering": [0.9, [_clip("000-a", 0, 0.9)], []]}
    out = vb.summarize(raw, ["temporal_flickering"], ["000-a", "001-b"])
    assert out["quality"] is None and out["videos"]["000-a"] == {"temporal_flickering": 0.9, "quality": None}
    assert out["videos"]["001-b"]["temporal_flickering"] is None
    assert any("001-b" in n for n in out["notes"]) and any("seven" in n for n in out["notes"])
    with pytest.raises(ValueError, match="no per-clip results for 'dynamic_degree'"):
        vb.summarize(raw, ["dynamic_degree"], ["000-a"])


def test_names_with_underscores_are_refused(vb, tmp_path):
    (tmp_path / "000-ok.mp4").write_bytes(b"")
    assert [p.name for p in vb.video_files(tmp_path)] == ["000-ok.mp4"]
    (tmp_path / "001_bad.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="contain '_' \\(001_bad.mp4\\)"):
        vb.video_files(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .mp4"):
        vb.video_files(tmp_path / "empty")


def test_missing_weights_are_listed_with_their_paths(vb, tmp_path):
    roots = {"vbench": tmp_path / "vb", "torch_hub": tmp_path / "hub"}
    assert vb.missing_weights(["temporal_flickering"], roots) == []
    missing = vb.missing_weights(["motion_smoothness", "subject_consistency"], roots)
    assert [(d, p) for d, p, _ in missing] == [
        ("motion_smoothness", tmp_path / "vb/amt_model/amt-s.pth"),
        ("subject_consistency", tmp_path / "vb/dino_model/facebookresearch_dino_main/hubconf.py"),
        ("subject_consistency", tmp_path / "vb/dino_model/dino_vitbase16_pretrain.pth"),
        ("subject_consistency", tmp_path / "hub/checkpoints/dino_vitbase16_pretrain.pth"),
    ]
    message = vb.missing_weights_message(missing)
    assert str(tmp_path / "vb/amt_model/amt-s.pth") in message and "huggingface.co/lalala125/AMT" in message
    (tmp_path / "vb/amt_model").mkdir(parents=True)
    (tmp_path / "vb/amt_model/amt-s.pth").write_bytes(b"x")
    assert vb.missing_weights(["motion_smoothness"], roots) == []
    assert set(vb.WEIGHT_FILES) == set(vb.QUALITY_DIMENSIONS)


def test_weight_roots_follow_the_environment(vb, tmp_path, monkeypatch):
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "v"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "t"))
    assert vb.weight_roots() == {"vbench": tmp_path / "v", "torch_hub": tmp_path / "t" / "hub"}


def test_configs_are_written_with_absolute_paths_in_vbench_formats(vb, tmp_path):
    paths = vb.write_vbench_configs(tmp_path / "cfg")
    assert set(paths) == {"clip_length_config", "slow_fast_eval_config", "sb_mapping_file_path", "bg_mapping_file_path"}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in paths.values())
    clip = yaml.safe_load(Path(paths["clip_length_config"]).read_text())
    assert clip["temporal_flickering"] == 2.0 and clip["overall_consistency"] == 10.0
    params = yaml.safe_load(Path(paths["slow_fast_eval_config"]).read_text())
    assert params["w_inclip_sb"] == 1.0 and params["w_clip2clip_bg"] == 0.0
    # VBench bisects the table's keys with a float score: keys must be numbers, mapping the identity.
    table = yaml.safe_load(Path(paths["sb_mapping_file_path"]).read_text())
    assert all(isinstance(k, float) for k in table) and table[0.5] == 0.5 and min(table) == 0.0 and max(table) == 1.0


def test_videos_are_staged_in_a_fresh_folder(vb, tmp_path):
    src = tmp_path / "videos"
    src.mkdir()
    (src / "000-a.mp4").write_bytes(b"a")
    stage = tmp_path / "work" / "videos"
    (stage / "split_clip" / "stale").mkdir(parents=True)
    vb.stage_videos([src / "000-a.mp4"], stage)
    assert sorted(p.name for p in stage.iterdir()) == ["000-a.mp4"] and (stage / "000-a.mp4").read_bytes() == b"a"


def test_cli_reports_missing_weights_in_one_message(vb, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "empty-cache"))
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "000-a.mp4").write_bytes(b"")
    assert vb.main([str(tmp_path / "videos"), "--dimensions", "motion_smoothness", "dynamic_degree"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vbench_long: error: VBench model weights are missing")
    assert str(tmp_path / "empty-cache" / "raft_model/models/raft-things.pth") in err
    assert vb.main(["--check-weights", "--dimensions", "temporal_flickering"]) == 0
    assert vb.main(["--check-weights", "--dimensions", "dynamic_degree"]) == 1
    assert "MISSING" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("vbench2_beta_long") is None, reason="VBench is not installed")
def test_end_to_end_temporal_flickering(vb, tmp_path):  # pragma: no cover - needs the VBench environment
    import imageio_ffmpeg  # genkv itself is not installed in the VBench environment
    import numpy as np

    def write(path, frames):
        writer = imageio_ffmpeg.write_frames(str(path), (frames.shape[2], frames.shape[1]), fps=16,
                                             macro_block_size=1, ffmpeg_log_level="error")
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()

    videos = tmp_path / "videos"
    videos.mkdir()
    rng = np.random.default_rng(0)
    write(videos / "000-static.mp4", np.full((80, 96, 160, 3), 128, np.uint8))  # 5 s: three 2 s clips
    write(videos / "001-noise.mp4", rng.integers(0, 256, (80, 96, 160, 3), dtype=np.uint8))
    result = vb.run(videos, ["temporal_flickering"], tmp_path / "vbench.json", "cpu")
    scores = {name: row["temporal_flickering"] for name, row in result["videos"].items()}
    assert scores["000-static"] > 0.99 > scores["001-noise"]
    assert result["clips"]["temporal_flickering"] == 6
    assert json.loads((tmp_path / "vbench.json").read_text())["kind"] == "genkv-vbench-long"


def _random_weight_stand_ins(cache: Path, torch_home: Path) -> None:
    """Random-weight models of the right architectures at the exact paths VBench loads (plumbing only: the
    scores they give mean nothing). CLIP must be TorchScript: clip.load reads the file as such first."""
    import argparse

    import clip.model
    import timm  # noqa: F401  (the stand-in DINO hubconf imports it)
    import torch
    import vbench
    from omegaconf import OmegaConf
    from pyiqa.archs.musiq_arch import MUSIQ
    from vbench.third_party.amt.utils.build_utils import build_from_cfg
    from vbench.third_party.RAFT.core.raft import RAFT

    def save(obj, rel):
        (cache / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, cache / rel)

    for name, dim in (("ViT-B-32.pt", 512), ("ViT-L-14.pt", 768)):
        model = clip.model.CLIP(dim, 224, 1, 64, 32, 77, 49408, 64, 1, 1).eval().float()
        traced = torch.jit.trace(model, (torch.randn(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)),
                                 check_trace=False)
        (cache / "clip_model").mkdir(parents=True, exist_ok=True)
        traced.save(str(cache / "clip_model" / name))
    save(torch.nn.Linear(768, 1).state_dict(), "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth")
    hubconf = cache / "dino_model/facebookresearch_dino_main/hubconf.py"
    hubconf.parent.mkdir(parents=True)
    hubconf.write_text("dependencies = ['torch']\nimport timm\n\n\ndef dino_vitb16(**kwargs):\n"
                       "    return timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0,\n"
                       "                             dynamic_img_size=True, dynamic_img_pad=True)\n")
    (cache / "dino_model/dino_vitbase16_pretrain.pth").write_bytes(b"")
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    (torch_home / "hub" / "checkpoints" / "dino_vitbase16_pretrain.pth").write_bytes(b"")
    save(MUSIQ(pretrained=False).state_dict(), "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth")
    raft = RAFT(argparse.Namespace(small=False, mixed_precision=False, alternate_corr=False))
    save(raft.state_dict(), "raft_model/models/raft-things.pth")
    amt = OmegaConf.load(Path(vbench.__file__).parent / "third_party/amt/cfgs/AMT-S.yaml").network
    save({"state_dict": build_from_cfg(amt).state_dict()}, "amt_model/amt-s.pth")


@pytest.mark.skipif(importlib.util.find_spec("vbench2_beta_long") is None, reason="VBench is not installed")
def test_end_to_end_all_quality_dimensions_offline(vb, tmp_path, monkeypatch):  # pragma: no cover - ~3 min, 2 CPUs
    import imageio_ffmpeg
    import numpy as np
    import vbench.utils

    cache, torch_home = tmp_path / "vbench-cache", tmp_path / "torch"
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(vbench.utils, "CACHE_DIR", str(cache))  # read once at import
    assert vb.missing_weights(list(vb.QUALITY_DIMENSIONS))  # nothing there yet
    _random_weight_stand_ins(cache, torch_home)
    assert vb.missing_weights(list(vb.QUALITY_DIMENSIONS)) == []
    videos = tmp_path / "videos"
    videos.mkdir()
    yy, xx = np.mgrid[0:96, 0:160]
    for name, n in (("000-a-moving-wave", 80), ("001-a-short-one", 40)):  # 5 s -> 3 clips, 2.5 s -> 2 clips
        frames = [np.uint8(128 + 100 * np.sin((xx + 3 * t) / 11)) for t in range(n)]
        writer = imageio_ffmpeg.write_frames(str(videos / f"{name}.mp4"), (160, 96), fps=16, macro_block_size=1,
                                             ffmpeg_log_level="error")
        writer.send(None)
        for f in frames:
            writer.send(np.ascontiguousarray(np.repeat(f[..., None], 3, axis=-1)))
        writer.close()
    result = vb.run(videos, list(vb.QUALITY_DIMENSIONS), tmp_path / "vbench.json", "cpu")
    assert set(result["videos"]) == {"000-a-moving-wave", "001-a-short-one"}
    assert result["clips"] == {d: 5 for d in vb.QUALITY_DIMENSIONS}
    assert all(v is not None for row in result["videos"].values() for v in row.values())
    assert result["quality"] == pytest.approx(vb.quality_score(result["aggregate"]))
    # imaging_quality clips are rescaled like VBench's overall (0-1), so the two agree up to clip weighting.
    assert abs(result["aggregate"]["imaging_quality"] - result["vbench_overall"]["imaging_quality"]) < 0.05
    assert not (videos / "split_clip").exists()  # clips went to the work folder, not next to the videos
