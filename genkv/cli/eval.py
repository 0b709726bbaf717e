"""``genkv eval``: fidelity of renders against their full-cache reference, and one Markdown report over runs.

    genkv eval fidelity videos/full videos/fastar --out runs/fastar-fidelity.json --plot runs/fastar.png
    genkv eval report runs/ --out runs/report.md

Wired into the main app with ``app.add_typer(eval_app, name="eval")``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .errors import CLIError

eval_app = typer.Typer(
    help="Evaluate renders: fidelity against a reference render, and a summary report over runs.",
    no_args_is_help=True,
)


@eval_app.command("fidelity")
def fidelity(
    reference: Path = typer.Argument(..., help="Folder of reference videos (normally the `full` method's render)."),
    test: Path = typer.Argument(..., help="Folder of videos to compare; paired with the reference by file name."),
    out: Path = typer.Option(..., "--out", "-o", help="JSON file to write."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of PSNR/SSIM (and LPIPS) against time."),
    drift_seconds: float = typer.Option(2.0, "--drift-seconds", help="Seconds averaged at the start and at the end."),
    fps: Optional[float] = typer.Option(None, "--fps", help="Frame rate for the drift windows (default: the mp4's)."),
    device: str = typer.Option("cpu", "--device", help="Torch device for SSIM and LPIPS (cpu, cuda, cuda:N)."),
    lpips: bool = typer.Option(True, "--lpips/--no-lpips", help="LPIPS when the lpips package and weights are local."),
    lpips_net: str = typer.Option("alex", "--lpips-net", help="LPIPS backbone: alex, vgg or squeeze."),
) -> None:
    """PSNR and SSIM per frame and per video (plus LPIPS when available offline), and start-to-end drift."""
    if drift_seconds <= 0:
        raise CLIError(f"--drift-seconds must be > 0, got {drift_seconds}")
    if fps is not None and fps <= 0:
        raise CLIError(f"--fps must be > 0, got {fps}")
    if out.suffix.lower() != ".json":
        raise CLIError(f"--out {str(out)!r} should be a .json file")
    for folder in (reference, test):  # checked again by pair_videos; here before torch is imported
        if not folder.is_dir():
            raise CLIError(f"{str(folder)!r} is not a folder; pass a folder of mp4 files (genkv render --out)")

    from genkv.metrics import LpipsScorer, LpipsUnavailable, compare_video_files, pair_videos

    try:
        matched = pair_videos(reference, test)
    except ValueError as err:
        raise CLIError(str(err)) from None

    notes: list[str] = []
    scorers = {}
    if lpips:
        try:
            scorers["lpips"] = LpipsScorer(lpips_net, device=device)
        except LpipsUnavailable as why:
            notes.append(str(why))
    else:
        notes.append("LPIPS skipped: --no-lpips")
    if matched.reference_only:
        notes.append(f"{len(matched.reference_only)} reference videos have no test video: {matched.reference_only[:5]}")
    if matched.test_only:
        notes.append(f"{len(matched.test_only)} test videos have no reference video: {matched.test_only[:5]}")

    videos: dict[str, dict] = {}
    for ref_path, test_path in matched.pairs:
        try:
            result = compare_video_files(ref_path, test_path, fps, drift_seconds, scorers=scorers, device=device)
        except ValueError as err:
            raise CLIError(f"{test_path.name}: {err}") from None
        notes += _render_mismatches(ref_path, test_path)
        videos[test_path.name] = result
        typer.echo(f"{test_path.name}: {_describe(result)}")

    summary = _summarise(videos, list(scorers))
    report = {
        "kind": "genkv-fidelity",
        "reference": str(reference.resolve()),
        "test": str(test.resolve()),
        "definitions": {
            "psnr": "dB, 10*log10(255^2/MSE) over RGB per frame; null = identical frame (counted in identical_frames, "
            "left out of means)",
            "ssim": "Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03, per RGB channel then averaged, valid positions",
            "lpips": f"lpips package, net {lpips_net}, frames in [-1, 1]" if scorers else "not computed (see notes)",
            "drift": f"mean over the first vs the last {drift_seconds} s of frames; delta = last - first",
        },
        "summary": summary,
        "videos": videos,
        "unmatched": {"reference_only": matched.reference_only, "test_only": matched.test_only},
        "notes": notes,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if plot is not None:
        note = _plot(videos, list(scorers), plot)
        if note:
            notes.append(note)
            out.write_text(json.dumps(report, indent=1))
    typer.echo(f"{len(videos)} videos: {_describe(summary)} -> {out}")
    for note in notes:
        typer.echo(f"note: {note}", err=True)


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _describe(r: dict) -> str:
    text = f"PSNR {_fmt(r['psnr_mean'], '.2f', ' dB')}, SSIM {_fmt(r['ssim_mean'], '.4f')}"
    if "lpips_mean" in r:
        text += f", LPIPS {_fmt(r['lpips_mean'], '.4f')}"
    delta = r["drift"]["psnr"]["delta"]
    return text + f", PSNR drift {_fmt(delta, '+.2f', ' dB')}"


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _summarise(videos: dict[str, dict], extra: list[str]) -> dict:
    """Means over videos of the per-video means and drift (videos with no finite value are left out)."""
    rows = list(videos.values())
    summary: dict = {
        "videos": len(rows),
        "frames": sum(r["frames"] for r in rows),
        "identical_frames": sum(r["identical_frames"] for r in rows),
        "psnr_mean": _mean([r["psnr_mean"] for r in rows]),
        "psnr_of_mean_mse": _mean([r["psnr_of_mean_mse"] for r in rows]),
        "ssim_mean": _mean([r["ssim_mean"] for r in rows]),
        "drift": {"seconds": rows[0]["drift"]["seconds"]},
    }
    for name in extra:
        summary[f"{name}_mean"] = _mean([r[f"{name}_mean"] for r in rows])
    for name in ["psnr", "ssim", *extra]:
        summary["drift"][name] = {k: _mean([r["drift"][name][k] for r in rows]) for k in ("first", "last", "delta")}
    return summary


def _render_mismatches(ref_path: Path, test_path: Path) -> list[str]:
    """Warn when the two renders' JSON summaries say they are not the same prompt and seed."""
    ref_json, test_json = ref_path.with_suffix(".json"), test_path.with_suffix(".json")
    if not (ref_json.is_file() and test_json.is_file()):
        return []
    try:
        a, b = json.loads(ref_json.read_text()), json.loads(test_json.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    notes = [
        f"{test_path.name}: {key} differs from the reference ({a.get(key)!r} vs {b.get(key)!r})"
        for key in ("prompt", "seed", "model", "height", "width")
        if key in a and key in b and a[key] != b[key]
    ]
    method = a.get("method", {}).get("method") if isinstance(a.get("method"), dict) else None
    if method not in (None, "full"):
        notes.append(f"{ref_path.name}: the reference was rendered with method {method!r}, not 'full'")
    return notes


def _plot(videos: dict[str, dict], extra: list[str], path: Path) -> str | None:
    """Metric against time, one thin line per video and their mean; the drift windows shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    import numpy as np

    names = ["psnr", "ssim", *extra]
    titles = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS"}
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        curves = []
        for video, r in videos.items():
            y = np.array([np.nan if v is None else v for v in r[name]], dtype=float)
            t = np.arange(len(y)) / r["fps"]
            ax.plot(t, y, lw=0.8, alpha=0.5 if len(videos) > 1 else 1.0, label=video[:28] if len(videos) <= 8 else None)
            curves.append(y)
        if len(curves) > 1:
            n = min(len(c) for c in curves)
            r0 = next(iter(videos.values()))
            ax.plot(np.arange(n) / r0["fps"], np.nanmean([c[:n] for c in curves], axis=0), color="black", lw=1.6,
                    label="mean")
        r0 = next(iter(videos.values()))
        w = r0["drift"][name]["frames"] / r0["fps"]
        end = r0["frames"] / r0["fps"]
        ax.axvspan(0, w, color="tab:green", alpha=0.08)
        ax.axvspan(end - w, end, color="tab:red", alpha=0.08)
        ax.set_title(titles.get(name, name))
        ax.set_xlabel("time (s)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    r0 = next(iter(videos.values()))
    window = r0["drift"]["psnr"]["frames"] / r0["fps"]  # --drift-seconds, capped at half the video
    fig.suptitle(f"fidelity to the reference; shaded: first/last {window:g} s (drift windows)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


@eval_app.command("report")
def report(
    runs: Path = typer.Argument(..., help="Folder holding render folders, fidelity/VBench JSON and bench JSON."),
    out: Path = typer.Option(..., "--out", "-o", help="Markdown file to write."),
) -> None:
    """One Markdown report: per run speed, memory, fidelity and VBench Quality; benchmark runs apart."""
    if not runs.is_dir():
        raise CLIError(f"{str(runs)!r} is not a folder; pass the folder holding the runs (render --out folders)")
    from genkv.metrics.report import build_report, collect_runs
    index = collect_runs(runs)
    if index.empty:
        raise CLIError(
            f"no genkv render summaries, fidelity, VBench or benchmark JSON found under {str(runs)!r}; "
            "pass the parent folder of the `genkv render --out` folders"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_report(index))
    typer.echo(f"{len(index.runs)} runs, {len(index.bench)} benchmark rows -> {out}")
