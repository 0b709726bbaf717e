"""``genkv calibrate``: measure a VAR model's layer selectivity and write ScaleKV budgets as JSON."""

from __future__ import annotations

from pathlib import Path

from .errors import CLIError


def parse_classes(text: str, num_classes: int) -> list[int]:
    try:
        labels = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise CLIError(f"--classes {text!r} must be integers separated by commas, e.g. 207,360,387") from None
    if not labels:
        raise CLIError("--classes is empty; give a few ImageNet class ids, e.g. 207,360,387")
    bad = [x for x in labels if not 0 <= x < num_classes]
    if bad:
        raise CLIError(f"--classes: unknown class label {bad[0]}; this model has classes 0..{num_classes - 1}")
    return labels


def run_calibrate(model: str, vae: Path | None, out: Path, budget: float, classes: str, device: str,
                  drafter_fraction: float, seed: int, method: str = "scalekv", alpha: float = 0.5) -> int:
    import json

    import torch

    from genkv.scales import calibrate
    from genkv.scales.heads import classify_heads

    if method not in ("scalekv", "hack"):
        raise CLIError(f"--method must be scalekv or hack, got {method!r}")
    if not 0.0 <= alpha <= 1.0:
        raise CLIError(f"--alpha must be in [0, 1], got {alpha}")
    if not 0.0 < budget <= 1.0:
        raise CLIError(f"--budget must be in (0, 1], got {budget}")
    if not 0.0 <= drafter_fraction < 1.0:
        raise CLIError(f"--drafter-fraction must be in [0, 1), got {drafter_fraction}")
    if out.exists() and out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a folder; give a .json file path")
    if model == "tiny-random":
        from genkv.testing import tiny_var_pipeline

        pipe = tiny_var_pipeline()
    else:
        from genkv.pipelines.var import VARCheckpointError, VARPipeline

        if vae is None:
            raise CLIError("--vae is required with a VAR checkpoint (vae_ch160v4096z32.pth)")
        try:
            pipe = VARPipeline.from_pretrained(model, vae=vae)
        except VARCheckpointError as err:
            raise CLIError(str(err)) from None
    if device != "cpu":
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe.to(device, dtype=torch.bfloat16 if device.startswith("cuda") else None)
    labels = parse_classes(classes, pipe.transformer.config.num_classes)
    out.parent.mkdir(parents=True, exist_ok=True)
    if method == "hack":
        roles = classify_heads(pipe, labels, alpha=alpha, seed=seed)
        out.write_text(json.dumps(roles, indent=1))
        n = sum(map(sum, roles["contextual"]))
        total = len(roles["contextual"]) * len(roles["contextual"][0])
        print(f"wrote {out}: depth {roles['depth']}, {n} of {total} heads contextual")
        return 0
    budgets = calibrate(pipe, labels, budget=budget, drafter_fraction=drafter_fraction, seed=seed)
    budgets.save(out)
    drafters = ", ".join(f"scale {s}: {v}" for s, v in budgets.drafters.items())
    print(f"wrote {out}: depth {budgets.depth}, budget {budget}, drafter layers {drafters or 'none'}")
    return 0
