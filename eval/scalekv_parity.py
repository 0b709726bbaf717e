"""genkv's ScaleKV (``mode="official"``) against the official ScaleKV code, on identical random q/k/v.

    git clone https://github.com/StargazerX0/ScaleKV /tmp/scalekv
    python eval/scalekv_parity.py --scalekv /tmp/scalekv              # Infinity-2B shapes, budgets/2b_10%_budget.json
    python eval/scalekv_parity.py --scalekv /tmp/scalekv --model 8b   # Infinity-8B, budgets/8b_10%_budget.json
    python eval/scalekv_parity.py --scalekv /tmp/scalekv --var        # VAR-d16 256px, genkv's caps for --budget

The official code is imported at run time from the checkout (never copied): ``scale_kv.ScaleKVCluster`` (its
per-layer compression call ``update_kv``) and ``enable_scale_kv_{2b,8b}.get_cache_sizes`` (how the scripts read
their budgets file). ``enable_scale_kv_*`` import ``infinity.models.basic.SelfAttention`` only to find modules to
patch; that import pulls in Infinity's model code (flash-attn, ...), so a stub module with an empty
``SelfAttention`` class stands in for it while importing. Nothing else is stubbed.

Per layer, every scale's q/k/v are drawn once and fed to both: the official cluster (its cache: the previous
result + the new scale's k/v, ``update_kv(k, q, v, scale_ind)``, ``base_capacity=650`` as the official scripts
pass it) and genkv's :class:`~genkv.scales.official.OfficialScaleCache` (``keep`` on its own cache + the same
new k/v). Each keeps its own history, so a difference would propagate to later scales. Tokens are identified by
a position id carried in ``v[..., 0]``. Prints, per (layer, scale) that compresses, the Jaccard index of the
kept-token sets (mean and minimum over batch rows and heads) and exits 1 if any mean is below ``--target``.

``--var`` runs VAR's scales instead (the official cluster's hard-coded Infinity scale sizes ``SCALE`` are
replaced by VAR's on the instance), with caps from :func:`~genkv.scales.official.official_style_caps`
handed to the official cluster in its ``cache_sizes`` layout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import types
import warnings
from pathlib import Path

import torch

INFINITY_1M = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@contextlib.contextmanager
def _in_dir(path: Path):
    """The official scripts open ``budgets/...`` relative to the working directory."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def import_official(root: Path, model: str):
    """``scale_kv`` and ``enable_scale_kv_{model}`` from the checkout (module docstring: one stub for importing)."""
    if not (root / "scale_kv.py").is_file():
        raise SystemExit(f"{root} has no scale_kv.py: pass a checkout of github.com/StargazerX0/ScaleKV")
    sys.path.insert(0, str(root))
    stubs = {}
    for name in ("infinity", "infinity.models", "infinity.models.basic"):
        if name not in sys.modules:
            stubs[name] = sys.modules[name] = types.ModuleType(name)
    sys.modules["infinity.models.basic"].SelfAttention = type("SelfAttention", (), {})  # stub, see above
    try:
        scale_kv = importlib.import_module("scale_kv")
        enable = importlib.import_module(f"enable_scale_kv_{model}")
    finally:
        sys.path.pop(0)
        for name in stubs:
            sys.modules.pop(name, None)
    return scale_kv, enable


def official_cache_sizes(enable, root: Path) -> list:
    """The official ``get_cache_sizes`` (it reads ``budgets/{2b,8b}_10%_budget.json`` from the working directory)."""
    with _in_dir(root):
        return enable.get_cache_sizes()


def draw(b: int, h: int, n: int, d: int, first_id: int, g: torch.Generator):
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.nn.functional.normalize(torch.randn(b, h, n, d, generator=g), dim=-1)
    v = torch.randn(b, h, n, d, generator=g)
    v[..., 0] = torch.arange(first_id, first_id + n, dtype=torch.float32)  # token ids (exact in float32)
    return q, k, v


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per (batch row, head) Jaccard index of two sets of token ids (B, H, n) and (B, H, m)."""
    out = torch.empty(a.shape[:2], dtype=torch.float64)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            x, y = set(a[i, j].long().tolist()), set(b[i, j].long().tolist())
            out[i, j] = len(x & y) / max(1, len(x | y))
    return out


def run(args) -> int:
    from genkv.scales.official import OfficialScaleCache, cumulative, load_official_budgets, official_style_caps

    root = Path(args.scalekv).resolve()
    scale_kv, enable = import_official(root, args.model)
    if args.var:
        patch_nums, depth = VAR_256, args.depth or 16
        caps = official_style_caps(depth, patch_nums, args.budget, drafters=(0,))
        cache_sizes = [None, None] + [[caps.caps[layer][s] for layer in range(depth)] for s in range(len(patch_nums))]
        label = f"VAR 256px scales, {depth} layers, genkv official-style caps at budget {args.budget}"
    else:
        patch_nums, depth = INFINITY_1M, {"2b": 32, "8b": 40}[args.model]
        budget_file = f"budgets/{args.model}_10%_budget.json"
        cache_sizes = official_cache_sizes(enable, root)
        caps = load_official_budgets(root / budget_file, depth, patch_nums)
        label = f"Infinity 1M scales, {depth} layers, {budget_file}"
    genkv_cache = OfficialScaleCache(depth, patch_nums, caps.caps, caps.base_capacity, keep_start=args.keep_start)
    base = args.base_capacity if args.base_capacity is not None else (650 if not args.var else caps.base_capacity)
    print(f"{label}; batch {args.batch} x {args.heads} heads x {args.head_dim}; official base_capacity {base}, "
          f"genkv {caps.base_capacity}; keep_start={args.keep_start}")
    cum, worst, rows = cumulative(patch_nums), 1.0, []
    for layer in range(depth):
        official = scale_kv.ScaleKVCluster(cache_sizes=cache_sizes, window_size=16, base_capacity=base,
                                           kernel_size=5, pooling="maxpool", layer_idx=layer)
        if args.var:
            official.SCALE = [p * p for p in patch_nums]  # its hard-coded Infinity sizes, per instance
        g = torch.Generator().manual_seed(1000 * args.seed + layer)
        ok = ov = gk = gv = None
        line = []
        for s, p in enumerate(patch_nums):
            q, k, v = draw(args.batch, args.heads, p * p, args.head_dim, cum[s] - p * p, g)
            cat = lambda old, new: new if old is None else torch.cat([old, new], dim=2)  # noqa: E731
            ok, ov = official.update_kv(cat(ok, k), q, cat(ov, v), s)
            gk, gv = genkv_cache.keep(layer, s, q, cat(gk, k), cat(gv, v))
            if ov.shape[2] < cum[s] or gv.shape[2] < cum[s]:  # something was evicted: compare
                j = jaccard(ov[..., 0], gv[..., 0])
                worst = min(worst, float(j.mean()))
                line.append(f"s{s}:{float(j.mean()):.3f}/{float(j.min()):.3f}({ov.shape[2]},{gv.shape[2]})")
                rows.append(float(j.mean()))
        print(f"layer {layer:2d} " + " ".join(line), flush=True)
    print(f"{len(rows)} compressed (layer, scale) pairs; Jaccard mean over rows/heads: min {worst:.4f}, "
          f"mean {sum(rows) / max(1, len(rows)):.4f} (target >= {args.target})")
    return 0 if worst >= args.target else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scalekv", required=True, help="a checkout of github.com/StargazerX0/ScaleKV")
    parser.add_argument("--model", choices=("2b", "8b"), default="2b", help="which official budgets file")
    parser.add_argument("--var", action="store_true", help="VAR 256px scales and genkv's caps for --budget")
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--depth", type=int, default=None, help="--var: layers (default 16, VAR-d16)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2, help="rows (2 = one image with guidance)")
    parser.add_argument("--base-capacity", type=int, default=None, help="the official cluster's (default 650)")
    parser.add_argument("--keep-start", type=int, default=1, help="genkv's start-token protection (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.95)
    args = parser.parse_args(argv)
    args.keep_start = bool(args.keep_start)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the official code warns on every fallback window
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
