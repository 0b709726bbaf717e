"""Collect the JSON files genkv writes under a folder of runs and build one Markdown report.

Recognised files (anywhere below the folder):

* ``genkv render`` summaries (``NNN-slug.json`` with ``prompt``, ``video``, ``method``, ``fps``): grouped into one
  *run* per folder;
* ``genkv eval fidelity`` output (``"kind": "genkv-fidelity"``) and ``eval/vbench_long.py`` output
  (``"kind": "genkv-vbench-long"``): attached to the run whose folder they evaluated (``test`` /
  ``videos_dir``: the same path, else the same folder name, else the run folder the JSON sits in), otherwise a
  run of their own;
* ``eval/bench_rollout.py`` output (``runs: [{spec, ...}]``): a separate benchmark table.

Unreadable or unrelated JSON is ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIDELITY_KIND = "genkv-fidelity"
VBENCH_KIND = "genkv-vbench-long"


@dataclass
class Run:
    """Everything known about one run (one folder of renders, or one evaluated folder)."""

    name: str
    folder: Path | None = None
    renders: list[dict] = field(default_factory=list)
    fidelity: dict | None = None
    vbench: dict | None = None


@dataclass
class RunsIndex:
    runs: list[Run]
    bench: list[tuple[str, dict]]

    @property
    def empty(self) -> bool:
        return not self.runs and not self.bench


def _is_render_summary(data: Any) -> bool:
    return isinstance(data, dict) and {"prompt", "video", "method", "fps"} <= data.keys()


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def collect_runs(root: str | Path) -> RunsIndex:
    """Scan ``root`` recursively for genkv JSON files and group them into runs (see the module docstring).

    Example:
        >>> import json, tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / "rolling").mkdir()
        >>> _ = (root / "rolling" / "000-a.json").write_text(json.dumps(
        ...     {"prompt": "a", "video": "000-a.mp4", "method": {"method": "rolling"}, "fps": 9.5}))
        >>> [(r.name, len(r.renders)) for r in collect_runs(root).runs]
        [('rolling', 1)]
    """
    root = Path(root)
    by_folder: dict[Path, Run] = {}
    evaluations: list[tuple[Path, dict]] = []
    bench: list[tuple[str, dict]] = []
    for path in sorted(root.rglob("*.json")):
        data = _load(path)
        if _is_render_summary(data):
            folder = path.parent.resolve()
            name = path.parent.relative_to(root).as_posix() if path.parent != root else root.name
            by_folder.setdefault(folder, Run(name=name, folder=folder)).renders.append(data)
        elif isinstance(data, dict) and data.get("kind") in (FIDELITY_KIND, VBENCH_KIND):
            evaluations.append((path, data))
        elif isinstance(data, dict) and isinstance(data.get("runs"), list):
            rel = path.relative_to(root).as_posix()
            bench += [(rel, r) for r in data["runs"] if isinstance(r, dict) and "spec" in r]

    runs = list(by_folder.values())
    for path, data in evaluations:
        target = Path(data.get("test") or data.get("videos_dir") or path.parent)
        run = _match(runs, target, path.parent.resolve())
        if run is None:
            run = Run(name=target.name, folder=target)
            runs.append(run)
        slot = "fidelity" if data["kind"] == FIDELITY_KIND else "vbench"
        setattr(run, slot, data)
    return RunsIndex(runs=sorted(runs, key=lambda r: r.name), bench=bench)


def _match(runs: list[Run], target: Path, json_folder: Path) -> Run | None:
    try:
        resolved = target.resolve()
    except OSError:
        resolved = target
    for test in (lambda r: r.folder == resolved,  # the evaluated folder itself
                 lambda r: r.folder is not None and r.folder.name == target.name,  # copied from another machine
                 lambda r: r.folder == json_folder):  # the JSON sits inside the run folder
        hits = [r for r in runs if test(r)]
        if len(hits) == 1:
            return hits[0]
    return None


def method_label(method: Any) -> str:
    """``{"method": "rolling", "window_frames": 21}`` -> ``rolling (window_frames=21)``.

    Example:
        >>> method_label({"method": "rolling", "sink_frames": 1, "window_frames": 21})
        'rolling (sink_frames=1, window_frames=21)'
    """
    if not isinstance(method, dict):
        return str(method)
    fields = ", ".join(f"{k}={v}" for k, v in method.items() if k != "method")
    name = str(method.get("method", "?"))
    return f"{name} ({fields})" if fields else name


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def _num(value: Any, spec: str, unit: str = "", scale: float = 1.0) -> str:
    if value is None or not isinstance(value, (int, float)):
        return "-"
    return f"{value * scale if scale != 1.0 else value:{spec}}{unit}"


def _bytes(value: Any) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (``3.00 GiB``, ``161.5 KiB``)."""
    if not isinstance(value, (int, float)):
        return "-"
    for unit, size, spec in (("GiB", 2**30, ".2f"), ("MiB", 2**20, ".1f"), ("KiB", 2**10, ".1f")):
        if value >= size:
            return f"{value / size:{spec}} {unit}"
    return f"{value:.0f} B"


def _mean(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def _max(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return max(values) if values else None


def run_row(run: Run) -> list[str]:
    """The cells of one run in the main table (see :data:`RUN_COLUMNS`)."""
    renders = run.renders
    methods = sorted({method_label(r.get("method")) for r in renders})
    frames = sorted({r.get("frames") for r in renders if isinstance(r.get("frames"), int)})
    frames_cell = "-" if not frames else str(frames[0]) if len(frames) == 1 else f"{frames[0]}-{frames[-1]}"
    incomplete = sum(1 for r in renders if r.get("interrupted") or r.get("error"))
    videos = f"{len(renders)}" + (f" ({incomplete} incomplete)" if incomplete else "")
    fid = (run.fidelity or {}).get("summary", {})
    drift = fid.get("drift", {}).get("psnr", {})
    vb = run.vbench or {}
    quality = vb.get("quality")
    return [
        _cell(run.name),
        _cell(" / ".join(methods) if methods else "-"),
        videos if renders else "-",
        frames_cell,
        _num(_mean([r.get("fps") for r in renders]), ".2f"),
        _bytes(_max([r.get("peak_memory_bytes") for r in renders])),
        _bytes(_max([r.get("kv_bytes") for r in renders])),
        _num(fid.get("psnr_mean"), ".2f"),
        _num(fid.get("ssim_mean"), ".4f"),
        _num(fid.get("lpips_mean"), ".4f"),
        _num(drift.get("delta"), "+.2f"),
        _num(quality, ".2f", scale=100.0),
    ]


RUN_COLUMNS = ["run", "method", "videos", "frames", "frames/s", "peak memory", "KV cache", "PSNR (dB)", "SSIM",
               "LPIPS", "PSNR drift (dB)", "VBench Quality (%)"]

BENCH_COLUMNS = ["file", "spec", "compile", "frames", "frames/s total", "frames/s steady", "median chunk",
                 "flatness", "peak memory", "KV final"]


def bench_row(source: str, r: dict) -> list[str]:
    frames = _num(r.get("frames"), "d")
    if r.get("oom_at_frame") is not None:
        frames += f" (OOM at {r['oom_at_frame']})"
    return [
        _cell(source),
        _cell(r.get("spec", "-")),
        "yes" if r.get("compile") else "no",
        frames,
        _num(r.get("fps_total"), ".2f"),
        _num(r.get("fps_steady"), ".2f"),
        _num(r.get("chunk_median_s"), ".0f", " ms", 1000.0),
        _num(r.get("flatness_last20_over_20to40"), ".3f"),
        _bytes(r.get("peak_memory_bytes")),
        _bytes(r.get("kv_bytes_final")),
    ]


def markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a GitHub Markdown table.

    Example:
        >>> markdown_table(["a", "b"], [["1", "2"]])
        ['| a | b |', '|---|---|', '| 1 | 2 |']
    """
    header = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return header + ["| " + " | ".join(r) + " |" for r in rows]


def build_report(index: RunsIndex) -> str:
    """The Markdown report: runs table, VBench per-dimension table (if any), benchmark table (if any)."""
    lines = ["# genkv runs", ""]
    if index.runs:
        lines += markdown_table(RUN_COLUMNS, [run_row(r) for r in index.runs])
        lines += [
            "",
            "frames/s: mean over the run's videos (render wall time, model loading excluded); peak memory and KV "
            "cache: largest over the videos. PSNR/SSIM/LPIPS: mean over frames and videos against the reference "
            "render (`genkv eval fidelity`); PSNR drift: last minus first seconds. VBench Quality: "
            "`eval/vbench_long.py` (long_custom_input, official normalisation and weights).",
        ]
        notes = [f"- {r.name}: {n}" for r in index.runs for n in (r.fidelity or {}).get("notes", [])]
        notes += [f"- {r.name}: {n}" for r in index.runs for n in (r.vbench or {}).get("notes", [])]
        if notes:
            lines += ["", "Notes:", "", *notes]
    vb_runs = [r for r in index.runs if r.vbench]
    if vb_runs:
        dims: list[str] = []
        for r in vb_runs:
            dims += [d for d in r.vbench.get("dimensions", []) if d not in dims]
        rows = [[_cell(r.name), *(_num(r.vbench.get("aggregate", {}).get(d), ".2f", scale=100.0) for d in dims),
                 _num(r.vbench.get("quality"), ".2f", scale=100.0)] for r in vb_runs]
        lines += ["", "## VBench-Long dimensions (%)", "", *markdown_table(["run", *dims, "Quality"], rows)]
    if index.bench:
        lines += ["", "## Rollout benchmarks (eval/bench_rollout.py)", ""]
        lines += markdown_table(BENCH_COLUMNS, [bench_row(s, r) for s, r in index.bench])
    return "\n".join(lines) + "\n"
