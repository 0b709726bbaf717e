"""genkv's ``VARPipeline(sampler="official")`` against the official ``VAR.autoregressive_infer_cfg``: same weights,
same seed, same tokens and images.

    python eval/var_parity.py --var /path/to/VAR-checkout --out runs/var_parity.json

``--var`` is a checkout of https://github.com/FoundationVision/VAR: its ``models`` package and ``dist.py`` are
imported from there at run time (nothing of it is copied into genkv). A tiny official VAR + VQ-VAE (random weights,
``attn_l2_norm=True`` as released, one config with shared AdaLN as VAR-d36) is saved to .pth files and read back
through ``VARPipeline.from_pretrained`` as a user's files would be. For every seed and sampling setting (plain
multinomial, top-k/top-p, ``more_smooth``), the official code runs with ``g_seed=seed`` and genkv with
``generator=torch.Generator(device).manual_seed(seed)``; the tokens each scale draws are recorded on both sides.
Exits non-zero when a token differs or an image differs by more than ``--atol``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_json import write_result  # noqa: E402

import genkv.pipelines.var.pipeline as genkv_var  # noqa: E402
from genkv.pipelines.var import VARPipeline  # noqa: E402

# (name, cfg, top_k, top_p, more_smooth); the tiny vocabulary has 32 codes, so top-k stays below it (the official
# code raises for top_k > V).
SETTINGS = [
    ("multinomial", 1.5, 0, 0.0, False),
    ("top-k 20, top-p 0.9", 4.0, 20, 0.9, False),
    ("top-p 0.96", 1.5, 0, 0.96, False),
    ("top-k 20, top-p 0.9, more_smooth", 4.0, 20, 0.9, True),
]
CONFIGS = {  # name → official VAR constructor arguments
    "d3": dict(depth=3, embed_dim=64, num_heads=2, shared_aln=False, patch_nums=(1, 2, 3, 4)),
    "d2-shared-aln": dict(depth=2, embed_dim=64, num_heads=2, shared_aln=True, patch_nums=(1, 2, 3, 4, 5)),
}


def import_official(checkout: Path):
    """The official ``models`` package from a checkout (its folder put first on sys.path for this process)."""
    if not (checkout / "models" / "var.py").is_file():
        raise SystemExit(f"no models/var.py in {checkout}: pass a checkout of https://github.com/FoundationVision/VAR")
    sys.path.insert(0, str(checkout.resolve()))
    import models.var

    return models


def build_official(models, config: dict, seed: int, device: torch.device):
    """A tiny official VQ-VAE (ch 32: its GroupNorms need 32 channels) and VAR with random weights large enough
    that top-k/top-p cut real distributions (the official init makes nearly uniform logits)."""
    torch.manual_seed(seed)
    vae = models.VQVAE(vocab_size=32, z_channels=8, ch=32, test_mode=True, share_quant_resi=4,
                       v_patch_nums=config["patch_nums"])
    var = models.VAR(vae_local=vae, num_classes=10, norm_eps=1e-6, attn_l2_norm=True, flash_if_available=False,
                     fused_if_available=False, drop_path_rate=0.0, **config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in var.named_parameters():
            if not name.endswith("scale_mul_1H11"):
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() >= 2 else 0.05))
    var.rng = torch.Generator(device=device)  # the official model makes its generator on dist.get_device()
    return vae.to(device).eval(), var.to(device).eval()


@contextmanager
def recorded_tokens(models):
    """Both sides' token draws, scale by scale: the official sampler (looked up by name inside ``models.var``) and
    genkv's ``multinomial_draw`` are wrapped for the duration of the block."""
    theirs, ours = [], []
    official, genkv_draw = models.var.sample_with_top_k_top_p_, genkv_var.multinomial_draw

    def official_recording(*args, **kwargs):
        out = official(*args, **kwargs)
        theirs.append(out[:, :, 0].clone())
        return out

    def genkv_recording(logits, generator):
        out = genkv_draw(logits, generator)
        ours.append(out.clone())
        return out

    models.var.sample_with_top_k_top_p_, genkv_var.multinomial_draw = official_recording, genkv_recording
    try:
        yield theirs, ours
    finally:
        models.var.sample_with_top_k_top_p_, genkv_var.multinomial_draw = official, genkv_draw


def compare(models, config_name: str, args, device: torch.device, tmp: Path) -> list[dict]:
    vae, var = build_official(models, CONFIGS[config_name], args.seed, device)
    torch.save(var.state_dict(), tmp / f"var_{config_name}.pth")
    torch.save(vae.state_dict(), tmp / f"vae_{config_name}.pth")
    pipe = VARPipeline.from_pretrained(tmp / f"var_{config_name}.pth", vae=tmp / f"vae_{config_name}.pth",
                                       patch_nums=CONFIGS[config_name]["patch_nums"]).to(device)
    labels = torch.tensor([3, 7, 0, 9], device=device)
    rows = []
    for name, cfg, top_k, top_p, more_smooth in SETTINGS:
        for seed in range(args.seeds):
            with recorded_tokens(models) as (theirs_tokens, ours_tokens):
                theirs = var.autoregressive_infer_cfg(B=len(labels), label_B=labels, g_seed=seed, cfg=cfg,
                                                      top_k=top_k, top_p=top_p, more_smooth=more_smooth)
                ours = pipe(class_labels=labels, guidance_scale=cfg, top_k=top_k, top_p=top_p, sampler="official",
                            more_smooth=more_smooth, generator=torch.Generator(device).manual_seed(seed),
                            output_type="pt").images
            differing = sum(int((a != b).sum()) for a, b in zip(theirs_tokens, ours_tokens))
            total = sum(a.numel() for a in theirs_tokens)
            rows.append(dict(config=config_name, setting=name, seed=seed, tokens=total,
                             tokens_differing=differing if len(theirs_tokens) == len(ours_tokens) else total,
                             image_max_abs_diff=float((theirs - ours).abs().max())))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--var", type=Path, required=True, help="a checkout of FoundationVision/VAR")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per setting")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest image difference allowed (pixels in [0, 1])")
    parser.add_argument("--out", type=Path, default=Path("var_parity.json"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on a GPU too
    torch.backends.cudnn.allow_tf32 = False
    models = import_official(args.var)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for name in CONFIGS for row in compare(models, name, args, device, Path(tmp))]
    tokens = sum(r["tokens"] for r in rows)
    differing = sum(r["tokens_differing"] for r in rows)
    worst = max(r["image_max_abs_diff"] for r in rows)
    runs_equal = sum(r["tokens_differing"] == 0 for r in rows)
    ok = differing == 0 and worst <= args.atol
    print(f"var_parity: {runs_equal}/{len(rows)} runs draw identical tokens ({differing} of {tokens} tokens differ), "
          f"image max abs diff {worst:.2e} (atol {args.atol:g}): {'PASS' if ok else 'FAIL'}")
    write_result(args.out, device, rows=rows, tokens=tokens, tokens_differing=differing, image_max_abs_diff=worst,
                 passed=ok)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
