"""VBench-Long quality scores for a folder of genkv videos (VBench 0.1.5, ``long_custom_input`` mode).

    pip install -r eval/requirements-vbench.txt     # its own environment: VBench pins transformers==4.33.2
    python eval/vbench_long.py videos/rolling --out runs/rolling/vbench.json
    python eval/vbench_long.py videos/rolling --dimensions temporal_flickering subject_consistency --out x.json
    python eval/vbench_long.py --check-weights      # which weight files each dimension needs, and where

Every video is cut into 2 s clips (``long_custom_input`` forces 2 s), each of VBench's short-video metrics runs per
clip, and this script averages the clips of each video and then the videos. Quality uses VBench's normalisation and
weights (``QUALITY_*`` constants below); it needs all seven quality dimensions.

Work-arounds for VBench 0.1.5 (see the notes next to each function):

* its wheel lacks VBench-Long's config files: :func:`write_vbench_configs` writes them and their absolute paths
  are passed (VBench joins them onto its package folder, which leaves an absolute path unchanged);
* its clip grouping keys on the text before ``_`` and, in custom mode, makes every clip its own "long video":
  genkv names have no ``_`` (names with one are refused) and :func:`per_video_scores` groups clips itself, by
  their ``split_clip/<video>/`` folder;
* it writes clips next to the input videos and silently reuses old ones: videos are linked into a fresh work
  folder per run instead;
* torchvision >= 0.26 has no ``torchvision.io.write_video``, which ``vbench2_beta_long`` imports:
  :func:`install_write_video_shim` puts one back before the import;
* it downloads missing weights with ``wget`` at run time: :func:`missing_weights` checks every file first and the
  run stops with one message listing what is missing and where it is looked for (nothing is downloaded).

The pure logic (names, grouping, Quality, configs, weight check) imports without VBench and is tested in
``tests/eval/test_vbench_logic.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

# -- VBench's scoring constants ----------------------------------------------------------------------------------
# Source: Vchitect/VBench scripts/constant.py (NORMALIZE_DIC, DIM_WEIGHT) and scripts/cal_final_score.py (repo
# @45e79ec; not shipped in the 0.1.5 wheel). Per dimension: (x - Min) / (Max - Min) * weight; Quality = the sum
# over the seven quality dimensions / the sum of their weights (6.5). Total/Semantic need the 946-prompt suite.
QUALITY_DIMENSIONS = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "dynamic_degree",
    "aesthetic_quality",
    "imaging_quality",
)
QUALITY_NORMALIZE = {  # (Min, Max)
    "subject_consistency": (0.1462, 1.0),
    "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0),
    "imaging_quality": (0.0, 1.0),
}
QUALITY_WEIGHTS = {dim: 0.5 if dim == "dynamic_degree" else 1.0 for dim in QUALITY_DIMENSIONS}
QUALITY_WEIGHT_SUM = 6.5
CONSTANTS_SOURCE = "Vchitect/VBench scripts/constant.py NORMALIZE_DIC, DIM_WEIGHT; scripts/cal_final_score.py"

# long_custom_input cuts every video into clips of this many seconds, whatever the config says.
CLIP_SECONDS = 2
# clip_length_mix.yaml as VBench-Long documents it: 2 s, except the three dimensions that need 10 s.
CLIP_LENGTHS = {
    **{dim: 2.0 for dim in (*QUALITY_DIMENSIONS, "object_class", "multiple_objects", "color",
                            "spatial_relationship", "scene", "appearance_style")},
    "human_action": 10.0,
    "temporal_style": 10.0,
    "overall_consistency": 10.0,
}


# -- model weights -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightFile:
    """A file VBench loads for a dimension: ``root`` is ``vbench`` (VBENCH_CACHE_DIR) or ``torch_hub``."""

    root: str
    path: str
    source: str


WEIGHT_FILES: dict[str, list[WeightFile]] = {
    "subject_consistency": [  # DINO ViT-B/16 through torch.hub, source='local'
        WeightFile("vbench", "dino_model/facebookresearch_dino_main/hubconf.py",
                   "git clone https://github.com/facebookresearch/dino"),
        WeightFile("vbench", "dino_model/dino_vitbase16_pretrain.pth",
                   "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
        # DINO's hubconf ignores VBench's `path` and loads from torch hub's checkpoint cache (else downloads).
        WeightFile("torch_hub", "checkpoints/dino_vitbase16_pretrain.pth", "the same file as above"),
    ],
    "background_consistency": [
        WeightFile("vbench", "clip_model/ViT-B-32.pt", "https://openaipublic.azureedge.net/clip/models/"
                   "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"),
    ],
    "temporal_flickering": [],  # mean absolute frame difference: no model
    "motion_smoothness": [
        WeightFile("vbench", "amt_model/amt-s.pth", "https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth"),
    ],
    "dynamic_degree": [
        WeightFile("vbench", "raft_model/models/raft-things.pth",
                   "raft-things.pth from https://dl.dropboxusercontent.com/s/4j4z58wuv8o0mfz/models.zip"),
    ],
    "aesthetic_quality": [
        WeightFile("vbench", "clip_model/ViT-L-14.pt", "https://openaipublic.azureedge.net/clip/models/"
                   "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt"),
        WeightFile("vbench", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
                   "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_l_14_linear.pth"),
    ],
    "imaging_quality": [
        WeightFile("vbench", "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
                   "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/"
                   "musiq_spaq_ckpt-358bb6af.pth"),
    ],
}


def weight_roots() -> dict[str, Path]:
    """Where VBench (``$VBENCH_CACHE_DIR`` or ``~/.cache/vbench``) and torch.hub look for weights."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "torch")
    vbench = os.environ.get("VBENCH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vbench")
    return {"vbench": Path(vbench), "torch_hub": Path(torch_home) / "hub"}


def missing_weights(dimensions: list[str], roots: dict[str, Path] | None = None) -> list[tuple[str, Path, str]]:
    """``(dimension, expected path, where to get it)`` for each weight file not on disk.

    Example:
        >>> missing_weights(["temporal_flickering"])
        []
    """
    roots = roots or weight_roots()
    return [(dim, roots[w.root] / w.path, w.source) for dim in dimensions for w in WEIGHT_FILES[dim]
            if not (roots[w.root] / w.path).is_file()]


def missing_weights_message(missing: list[tuple[str, Path, str]]) -> str:
    """One message naming every missing file, its dimension and its source."""
    lines = [f"  {dim}: {path}  (from {source})" for dim, path, source in missing]
    return ("VBench model weights are missing (genkv never downloads them; place them at these paths, or point "
            "VBENCH_CACHE_DIR / TORCH_HOME at a folder that has them, or drop those --dimensions):\n"
            + "\n".join(lines))


# -- names and grouping ------------------------------------------------------------------------------------------
def video_files(folder: Path) -> list[Path]:
    """The mp4 files to evaluate; names with ``_`` are refused (VBench-Long splits clip names on ``_``).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "000-a-cat.mp4").touch()
        >>> [p.name for p in video_files(d)]
        ['000-a-cat.mp4']
    """
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder of videos")
    files = sorted(p for p in folder.glob("*.mp4") if p.is_file())
    if not files:
        raise ValueError(f"no .mp4 files in {str(folder)!r}")
    bad = [f.name for f in files if "_" in f.stem]
    if bad:
        raise ValueError(f"{len(bad)} file name(s) contain '_' ({', '.join(bad[:3])}); VBench-Long cuts clip names "
                         "at '_': rename them (genkv render names videos without '_')")
    return files


def video_of_clip(path: str) -> str:
    """The genkv video a VBench clip result belongs to.

    VBench-Long writes clips to ``split_clip/<video>/<video>_NNN.mp4`` (``<video>_full.mp4`` for a video shorter
    than a clip), and its subject/background results append ``/<video>.mp4`` to the clip path: the folder after
    ``split_clip`` names the video in every case.

    Example:
        >>> video_of_clip("/w/videos/split_clip/007-a-corgi/007-a-corgi_003.mp4")
        '007-a-corgi'
        >>> video_of_clip("/w/videos/split_clip/007-a-corgi/007-a-corgi_003.mp4/007-a-corgi.mp4")
        '007-a-corgi'
        >>> video_of_clip("007-a-corgi_full.mp4")
        '007-a-corgi'
    """
    parts = Path(path).parts
    if "split_clip" in parts[:-1]:
        return parts[parts.index("split_clip") + 1]
    return re.sub(r"_(\d+|full)$", "", Path(path).stem)


def clip_scale(dimension: str) -> float:
    """VBench divides imaging_quality (MUSIQ, 0-100) by 100 only in its overall number, not per clip."""
    return 0.01 if dimension == "imaging_quality" else 1.0


def per_video_scores(dimension: str, clip_results: list) -> dict[str, float]:
    """Mean over each video's clips of VBench's per-clip results (``{"video_path", "video_results"}``).

    Example:
        >>> per_video_scores("temporal_flickering", [
        ...     {"video_path": "/v/split_clip/000-a/000-a_000.mp4", "video_results": 0.8},
        ...     {"video_path": "/v/split_clip/000-a/000-a_001.mp4", "video_results": 1.0}])
        {'000-a': 0.9}
    """
    groups: dict[str, list[float]] = {}
    for entry in clip_results:
        if not isinstance(entry, dict) or "video_path" not in entry:
            continue  # e.g. temporal_flickering's {"long_video_cnt": n}
        value = entry.get("video_results")
        if isinstance(value, (bool, int, float)):  # dynamic_degree reports True/False per clip
            groups.setdefault(video_of_clip(entry["video_path"]), []).append(float(value) * clip_scale(dimension))
    return {name: statistics.fmean(values) for name, values in sorted(groups.items())}


# -- Quality -----------------------------------------------------------------------------------------------------
def normalized_score(dimension: str, value: float) -> float:
    """``(value - Min) / (Max - Min)`` with VBench's constants (not weighted).

    Example:
        >>> normalized_score("motion_smoothness", 0.9975), normalized_score("temporal_flickering", 0.6293)
        (1.0, 0.0)
    """
    low, high = QUALITY_NORMALIZE[dimension]
    return (value - low) / (high - low)


def quality_score(scores: dict[str, float]) -> float:
    """VBench Quality in [0, 1] (leaderboards print it x100) from the seven raw quality-dimension scores.

    Example:
        >>> perfect = {d: 1.0 for d in QUALITY_DIMENSIONS} | {"motion_smoothness": 0.9975}
        >>> quality_score(perfect)
        1.0
    """
    missing = [d for d in QUALITY_DIMENSIONS if d not in scores]
    if missing:
        raise ValueError(f"Quality needs all seven quality dimensions; missing {missing}")
    total = sum(normalized_score(d, scores[d]) * QUALITY_WEIGHTS[d] for d in QUALITY_DIMENSIONS)
    return total / QUALITY_WEIGHT_SUM


def summarize(raw: dict, dimensions: list[str], videos: list[str]) -> dict:
    """Per-video and aggregate scores (and Quality when all seven dimensions ran) from VBench's result JSON.

    ``raw`` is ``<name>_eval_results.json``: per dimension ``[overall, per-clip results, ...]``. The aggregate of
    a dimension is the mean over videos of each video's clip mean (VBench's own overall, kept as
    ``vbench_overall``, is a mean over clips in custom mode).
    """
    per_dim: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    for dim in dimensions:
        entry = raw.get(dim)
        if not isinstance(entry, list) or len(entry) < 2 or not isinstance(entry[1], list):
            raise ValueError(f"VBench returned no per-clip results for {dim!r}")
        per_dim[dim] = per_video_scores(dim, entry[1])
        lost = sorted(set(videos) - set(per_dim[dim]))
        if lost:
            notes.append(f"{dim}: no clip results for {len(lost)} videos ({', '.join(lost[:3])})")
    aggregate = {d: statistics.fmean(v.values()) if v else None for d, v in per_dim.items()}
    complete = all(d in aggregate and aggregate[d] is not None for d in QUALITY_DIMENSIONS)
    per_video = {}
    for name in videos:
        row = {d: per_dim[d].get(name) for d in dimensions}
        have = {d: v for d, v in row.items() if v is not None}
        row["quality"] = quality_score(have) if all(d in have for d in QUALITY_DIMENSIONS) else None
        per_video[name] = row
    if not complete:
        notes.append("Quality not computed: it needs all seven quality dimensions")
    return {
        "dimensions": list(dimensions),
        "aggregate": aggregate,
        "normalized": {
            d: normalized_score(d, v) for d, v in aggregate.items() if v is not None and d in QUALITY_NORMALIZE
        },
        "quality": quality_score(aggregate) if complete else None,
        "videos": per_video,
        "clips": {d: sum(1 for e in raw[d][1] if isinstance(e, dict) and "video_path" in e) for d in dimensions},
        "vbench_overall": {d: raw[d][0] for d in dimensions},
        "notes": notes,
    }


# -- VBench 0.1.5 work-arounds -------------------------------------------------------------------------------------
def write_vbench_configs(folder: Path) -> dict[str, str]:
    """Write the files missing from the 0.1.5 wheel; returns absolute paths by ``evaluate()`` keyword.

    ``clip_length_mix.yaml`` holds VBench-Long's documented lengths (``long_custom_input`` uses 2 s anyway).
    Slow-fast fusion: without ``dev_flag`` the weights come from the ``w_inclip=1, w_clip2clip=0`` arguments, so
    the fused score is the in-clip score; the fusion code still opens ``slow_fast_params.yaml`` (read with
    ``.get``, content unused here) and looks the clip-to-clip score up in a mapping table ``{score: mapped}``
    (numeric keys, bisected), which is written as the identity.
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "clip_length_config": ("clip_length_mix.yaml", "".join(f"{d}: {s}\n" for d, s in CLIP_LENGTHS.items())),
        "slow_fast_eval_config": ("slow_fast_params.yaml", "".join(
            f"w_inclip_{p}: 1.0\nw_clip2clip_{p}: 0.0\n" for p in ("sb", "bg"))),
        "sb_mapping_file_path": ("subject_mapping_table.yaml", _identity_table()),
        "bg_mapping_file_path": ("background_mapping_table.yaml", _identity_table()),
    }
    paths = {}
    for key, (name, text) in files.items():
        (folder / name).write_text(text)
        paths[key] = str((folder / name).resolve())
    return paths


def _identity_table(step: float = 0.01) -> str:
    return "".join(f"{i * step:.2f}: {i * step:.2f}\n" for i in range(int(round(1 / step)) + 1))


def install_write_video_shim() -> None:
    """Give ``torchvision.io`` a ``write_video`` again (removed in torchvision 0.26; vbench2_beta_long imports it).

    VBench calls it as ``write_video(path, frames, fps=fps)`` with uint8 ``[T, H, W, 3]`` tensors; H.264 through
    imageio-ffmpeg, like torchvision's default ``libx264``.
    """
    import torchvision.io

    if hasattr(torchvision.io, "write_video"):
        return

    def write_video(filename, video_array, fps, video_codec="libx264", options=None, **_unused):
        import imageio_ffmpeg
        import numpy as np

        frames = video_array.cpu().numpy() if hasattr(video_array, "cpu") else np.asarray(video_array)
        frames = frames.astype(np.uint8, copy=False)
        writer = imageio_ffmpeg.write_frames(str(filename), (frames.shape[2], frames.shape[1]), fps=float(fps),
                                             codec="libx264", macro_block_size=1, ffmpeg_log_level="error")
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()

    torchvision.io.write_video = write_video


def stage_videos(files: list[Path], folder: Path) -> Path:
    """Link the videos into a fresh ``folder`` (VBench writes ``split_clip/`` there and reuses stale clips)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for f in files:
        try:
            (folder / f.name).symlink_to(f.resolve())
        except OSError:  # file systems without symlinks
            shutil.copy2(f, folder / f.name)
    return folder


# -- running -----------------------------------------------------------------------------------------------------
def run(videos: Path, dimensions: list[str], out: Path, device: str = "cuda", work: Path | None = None) -> dict:
    """Evaluate ``videos`` with VBench-Long and write the summary JSON to ``out`` (returned too)."""
    files = video_files(videos)
    missing = missing_weights(dimensions)
    if missing:
        raise ValueError(missing_weights_message(missing))
    install_write_video_shim()
    try:
        import torch
        import vbench
        from vbench2_beta_long import VBenchLong
    except ImportError as err:
        raise ValueError(f"VBench is not importable ({err}); use an environment from eval/requirements-vbench.txt")
    work = (work or out.parent / f"{out.stem}-work").resolve()
    staged = stage_videos(files, work / "videos")
    configs = write_vbench_configs(work / "configs")
    full_info = Path(vbench.__file__).parent / "VBench_full_info.json"
    settings = dict(  # VBench-Long's non-dev settings (eval_long.py without --dev_flag / --static_filter_flag)
        use_semantic_splitting=False, static_filter_flag=False, sb_clip2clip_feat_extractor="dino",
        bg_clip2clip_feat_extractor="clip", w_inclip=1.0, w_clip2clip=0.0, dev_flag=False,
        imaging_quality_preprocessing_mode="longer", num_of_samples_per_prompt=5,
    )
    VBenchLong(torch.device(device), str(full_info), str(work / "results")).evaluate(
        videos_path=str(staged), name="genkv", dimension_list=list(dimensions), local=True,
        mode="long_custom_input", **settings, **configs,
    )
    raw = json.loads((work / "results" / "genkv_eval_results.json").read_text())
    result = {
        "kind": "genkv-vbench-long",
        "videos_dir": str(videos.resolve()),
        "vbench_version": getattr(vbench, "__version__", "0.1.5"),
        "mode": "long_custom_input",
        "clip_seconds": CLIP_SECONDS,
        "settings": settings,
        "constants": {"normalize": QUALITY_NORMALIZE, "weights": QUALITY_WEIGHTS, "weight_sum": QUALITY_WEIGHT_SUM,
                      "source": CONSTANTS_SOURCE},
        **summarize(raw, list(dimensions), [f.stem for f in files]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


def print_weights(dimensions: list[str]) -> int:
    """List each dimension's weight files with ok/missing; 0 if all are present."""
    roots = weight_roots()
    for dim in dimensions:
        for w in WEIGHT_FILES[dim] or [None]:
            if w is None:
                print(f"{dim:24s} ok       (no model)")
                continue
            path = roots[w.root] / w.path
            print(f"{dim:24s} {'ok' if path.is_file() else 'MISSING':8s} {path}  <- {w.source}")
    return 1 if missing_weights(dimensions, roots) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("videos", type=Path, nargs="?", help="folder of genkv mp4 files (genkv render --out)")
    parser.add_argument("--out", type=Path, help="summary JSON (default: VIDEOS/vbench.json)")
    parser.add_argument("--dimensions", nargs="+", default=list(QUALITY_DIMENSIONS), choices=QUALITY_DIMENSIONS,
                        metavar="DIM", help=f"default: the seven quality dimensions ({', '.join(QUALITY_DIMENSIONS)})")
    parser.add_argument("--device", default="cuda", help="torch device (VBench-Long is meant for cuda)")
    parser.add_argument("--work", type=Path, help="scratch folder for clips and raw results (default: next to --out)")
    parser.add_argument("--check-weights", action="store_true", help="list the weight files and exit")
    args = parser.parse_args(argv)
    if args.check_weights:
        return print_weights(args.dimensions)
    if args.videos is None:
        parser.error("VIDEOS is required (or pass --check-weights)")
    out = args.out or args.videos / "vbench.json"
    try:
        result = run(args.videos, args.dimensions, out, args.device, args.work)
    except ValueError as err:
        print(f"vbench_long: error: {err}", file=sys.stderr)
        return 2
    scores = ", ".join(f"{d} {v:.4f}" for d, v in result["aggregate"].items() if v is not None)
    quality = "-" if result["quality"] is None else f"{100 * result['quality']:.2f}%"
    print(f"{len(result['videos'])} videos: {scores}; Quality {quality} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
