"""``genkv eval``: fidelity of a render against its full-cache reference, and one report over runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from .errors import CLIError

eval_app = typer.Typer(help="Evaluate renders: fidelity against a reference, and a summary report.", no_args_is_help=True)


def _lpips_note() -> str | None:
    """LPIPS needs the `lpips` package and AlexNet weights on disk; genkv never downloads them."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return "LPIPS skipped: the lpips package is not installed (pip install lpips, with AlexNet weights cached)"
    import torch

    weights = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
    if not weights.is_file():
        return f"LPIPS skipped: AlexNet weights not found at {weights} (genkv does not download weights)"
    return None


@eval_app.command("fidelity")
def fidelity(
    reference: Path = typer.Argument(..., help="Folder of reference videos (e.g. the `full` render)."),
    test: Path = typer.Argument(..., help="Folder of videos to compare (same file names)."),
    out: Path = typer.Option(Path("fidelity.json"), "--out", "-o", help="JSON file to write."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of PSNR/SSIM against frame index."),
    fps: float = typer.Option(16.0, "--fps", help="Frame rate, for the drift window."),
    drift_seconds: float = typer.Option(2.0, "--drift-seconds", help="Seconds compared at the start and end."),
) -> None:
    """PSNR and SSIM per frame and per video, drift from the first to the last seconds."""
    from genkv.metrics.fidelity import compare_videos, finite_or_none, pair_videos
    from genkv.video import read_frames

    try:
        pairs = pair_videos(reference, test)
    except ValueError as err:
        raise CLIError(str(err)) from None
    videos = {}
    for ref_path, test_path in pairs:
        try:
            result = compare_videos(read_frames(ref_path), read_frames(test_path), fps, drift_seconds)
        except ValueError as err:
            raise CLIError(f"{test_path.name}: {err}") from None
        result["identical"] = not math.isfinite(result["psnr_mean"])
        result["psnr"] = [finite_or_none(v) for v in result["psnr"]]
        result["psnr_mean"] = finite_or_none(result["psnr_mean"])
        for key in ("psnr_first", "psnr_last"):
            result["drift"][key] = finite_or_none(result["drift"][key])
        videos[test_path.name] = result
    finite = [v["psnr_mean"] for v in videos.values() if v["psnr_mean"] is not None]
    summary = {
        "videos": len(videos),
        "psnr_mean": sum(finite) / len(finite) if finite else None,
        "ssim_mean": sum(v["ssim_mean"] for v in videos.values()) / len(videos),
        "identical_videos": sum(v["identical"] for v in videos.values()),
    }
    notes = [n for n in (_lpips_note(),) if n]
    report = {"reference": str(reference), "test": str(test), "summary": summary, "videos": videos, "notes": notes}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            notes.append("no plot: matplotlib is not installed")
        else:
            fig, axes = plt.subplots(1, 2, figsize=(12, 4))
            for name, v in videos.items():
                axes[0].plot([p if p is not None else float("nan") for p in v["psnr"]], label=name[:30])
                axes[1].plot(v["ssim"], label=name[:30])
            axes[0].set_title("PSNR (dB) vs frame")
            axes[1].set_title("SSIM vs frame")
            for ax in axes:
                ax.set_xlabel("frame")
                ax.grid(alpha=0.3)
            axes[0].legend(fontsize=7)
            fig.tight_layout()
            plot.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(plot, dpi=100)
    psnr = "identical" if summary["psnr_mean"] is None else f"{summary['psnr_mean']:.2f} dB"
    typer.echo(f"{len(videos)} videos: PSNR {psnr}, SSIM {summary['ssim_mean']:.4f} -> {out}")
    for note in notes:
        typer.echo(f"note: {note}", err=True)


@eval_app.command("report")
def report(
    runs: Path = typer.Argument(..., help="Folder with one sub-folder per run (render outputs and eval JSON)."),
    out: Path = typer.Option(Path("report.md"), "--out", "-o", help="Markdown file to write."),
) -> None:
    """One Markdown table: method, fps, peak memory, KV bytes, fidelity, VBench quality per run folder."""
    if not runs.is_dir():
        raise CLIError(f"{str(runs)!r} is not a folder; pass the folder holding one sub-folder per run")
    rows = []
    bench_rows = []
    fidelity = {}
    for path in sorted(runs.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and "runs" in data and isinstance(data["runs"], list):
            bench_rows += [(path, r) for r in data["runs"] if "spec" in r]
        elif isinstance(data, dict) and "summary" in data and "videos" in data and "test" in data:
            fidelity[Path(data["test"]).resolve()] = data["summary"]
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
        renders = []
        for path in sorted(folder.glob("*.json")):
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "prompt" in data and "fps" in data:
                renders.append(data)
        vbench = None
        vbench_file = folder / "vbench.json"
        if vbench_file.is_file():
            vbench = json.loads(vbench_file.read_text()).get("quality")
        fid = fidelity.get(folder.resolve())
        if not renders and fid is None and vbench is None:
            continue
        method = renders[0]["method"]["method"] if renders else folder.name
        rows.append(
            {
                "run": folder.name,
                "method": method,
                "videos": len(renders),
                "fps": sum(r["fps"] for r in renders) / len(renders) if renders else None,
                "peak": max(r["peak_memory_bytes"] for r in renders) if renders else None,
                "kv": max(r["kv_bytes"] for r in renders) if renders else None,
                "psnr": fid.get("psnr_mean") if fid else None,
                "ssim": fid.get("ssim_mean") if fid else None,
                "vbench": vbench,
            }
        )
    if not rows and not bench_rows:
        raise CLIError(f"no genkv render summaries, fidelity or benchmark JSON found under {str(runs)!r}")

    def fmt(value, spec: str, unit: str = "") -> str:
        return "-" if value is None else f"{value:{spec}}{unit}"

    lines = ["| run | method | videos | frames/s | peak memory | KV cache | PSNR vs full | SSIM vs full | VBench quality |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['method']} | {r['videos']} | {fmt(r['fps'], '.2f')} | "
            f"{fmt(r['peak'] and r['peak'] / 2**30, '.2f', ' GiB')} | {fmt(r['kv'] and r['kv'] / 2**30, '.2f', ' GiB')} | "
            f"{fmt(r['psnr'], '.2f', ' dB')} | {fmt(r['ssim'], '.4f')} | {fmt(r['vbench'], '.4f')} |"
        )
    if bench_rows:
        lines += ["", "| benchmark | method | frames | fps (steady) | median chunk | peak memory | KV cache |",
                  "|---|---|---|---|---|---|---|"]
        for path, r in bench_rows:
            lines.append(
                f"| {path.name} | {r['spec']}{' +compile' if r.get('compile') else ''} | {r['frames']} | "
                f"{r['fps_steady']:.2f} | {fmt(r.get('chunk_median_s') and r['chunk_median_s'] * 1000, '.0f', ' ms')} | "
                f"{fmt(r.get('peak_memory_bytes') and r['peak_memory_bytes'] / 2**30, '.2f', ' GiB')} | "
                f"{fmt(r.get('kv_bytes_final') and r['kv_bytes_final'] / 2**30, '.2f', ' GiB')} |"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    typer.echo(f"{len(rows)} runs, {len(bench_rows)} benchmark rows -> {out}")
