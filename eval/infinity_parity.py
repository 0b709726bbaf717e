"""genkv's ``InfinityPipeline`` against the official Infinity code (github FoundationVision/Infinity, MIT),
imported at run time from a checkout you pass (never copied), at a tiny random configuration, float32, CPU.

    python eval/infinity_parity.py --infinity /path/to/Infinity

What it does: builds the official ``Infinity`` transformer (the settings of ``tools/run_infinity.py``'s
``load_infinity``: shared AdaLN, cosine attention, 2D RoPE normalised by the final grid, level embedding in the
first block only, bit labels, ``fused_norm=True``, block chunks) and the official BSQ-VAE at tiny widths,
perturbs every parameter, saves both state dicts to files in the official layouts (the transformer's
``state_dict()``; the tokenizer as ``{"vae": state_dict}``) and loads those files with genkv's loaders, which
also tests them. Then both sample from the same random "T5" features on the official 256px schedule ('0.06M',
7 scales) with CFG: greedy (top_k=1), sampled with the same seed (top-k 900, top-p 0.97, the official
``torch.multinomial`` order), and with guidance at a block's output (``cfg_insertion_layer=-1``); it compares the
sampled bits per scale, the logits per scale and the decoded images.

Stubbed, because the official code imports them and this check needs none of their functions: ``flash_attn``
(its two attention kernels, replaced by plain attention: the official code calls ``flash_attn_varlen_kvpacked_func``
for the T5 cross-attention and the text pool, after casting float32 inputs to bfloat16; the stub computes that
attention in float32 from those bfloat16 inputs and returns bfloat16, as flash-attn does), ``timm`` (a model
registry decorator and ``DropPath``, unused at inference), ``pytz`` (log timestamps), ``torchvision`` (imported by
the VAE module, unused). ``torch.compile`` of the official fused AdaLN ops is turned off (they run eagerly: the same
arithmetic). Nothing official is edited; the runs are instrumented by wrapping ``get_logits`` and the quantizer's
``indices_to_codes`` on the instances to record logits and bits.

Prints one line per check and a final ``RESULT`` line; exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.machinery
import os
import sys
import tempfile
import types
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # the official fused norms are @torch.compile'd

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TOL = 1e-4


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() callers (diffusers) need one
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _varlen_attention(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                      softmax_scale=None, **_):
    """flash-attn's packed varlen attention: q (Nq, H, D), kv (Nk, 2, H, D), sequences given by cumulative
    lengths. float32 arithmetic on the given (bfloat16) values, output in q's dtype."""
    out = torch.empty_like(q)
    for i in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        qi = q[qs:qe].float().transpose(0, 1)[None]
        ki, vi = kv[ks:ke].float().unbind(1)
        o = F.scaled_dot_product_attention(qi, ki.transpose(0, 1)[None], vi.transpose(0, 1)[None], scale=softmax_scale)
        out[qs:qe] = o[0].transpose(0, 1).to(q.dtype)
    return out


def _flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
    """flash-attn's (B, L, H, D) attention; the official model never calls it with customized_flash_attn=False."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
    return out.transpose(1, 2)


class _DropPath(torch.nn.Identity):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__()


def install_stubs() -> None:
    """Stand-ins for the official code's imports that this machine may lack (see the module docstring)."""
    _module("flash_attn", flash_attn_func=_flash_attn_func, flash_attn_varlen_kvpacked_func=_varlen_attention)
    try:
        import timm  # noqa: F401
    except ImportError:
        _module("timm")
        _module("timm.models", register_model=lambda fn: fn)
        _module("timm.models.layers", DropPath=_DropPath, drop_path=lambda x, *a, **k: x)
        _module("timm.loss", SoftTargetCrossEntropy=torch.nn.Module)
    try:
        import pytz  # noqa: F401
    except ImportError:
        _module("pytz", timezone=lambda name: datetime.timezone.utc)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        _module("torchvision", transforms=_module("torchvision.transforms"))


def official_models(infinity_dir: Path, depth: int, seed: int, patchify: bool = False):
    """The official transformer and BSQ-VAE at a tiny configuration, every parameter perturbed; ``patchify``:
    the 8B's layout (each token carries 2x2 tokenizer cells: 4 x 16 bits)."""
    import genkv.pipelines  # noqa: F401 - before the stubs: diffusers probes for torchvision when imported

    install_stubs()
    sys.path.insert(0, str(infinity_dir))
    from infinity.models.bsq_vae.vae import vae_model
    from infinity.models.infinity import Infinity

    torch.manual_seed(seed)
    # A 16-bit BSQ tokenizer with one 2x upsampling: decoder levels (1, 1) at the official 128 channels.
    vae = vae_model({}, "dynamic", 16, 2**16, patch_size=2, encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 1])
    model = Infinity(
        vae_local=vae, text_channels=128, text_maxlen=64, shared_aln=True, raw_scale_schedule=None,
        checkpointing="full-block", customized_flash_attn=False, fused_norm=True, pad_to_multiplier=128,
        use_flex_attn=False, add_lvl_embeding_only_first_block=1, use_bit_label=1, rope2d_each_sa_layer=1,
        rope2d_normalized_by_hw=2, pn="0.06M", apply_spatial_patchify=int(patchify), inference_mode=True,
        train_h_div_w_list=[1.0], depth=depth, embed_dim=64, num_heads=2, mlp_ratio=4, block_chunks=2,
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in (model, vae):
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval(), vae.eval()


def genkv_pipeline(model, vae, folder: Path):
    """genkv's pipeline from the official state dicts, saved as files and read back by genkv's loaders."""
    from genkv.pipelines.infinity import InfinityPipeline, load_bitwise_vae, load_infinity_transformer

    torch.save(model.state_dict(), folder / "infinity_tiny.pth")
    torch.save({"vae": vae.state_dict()}, folder / "infinity_vae_tiny.pth")
    transformer = load_infinity_transformer(folder / "infinity_tiny.pth")
    decoder = load_bitwise_vae(folder / "infinity_vae_tiny.pth")
    return InfinityPipeline(transformer, decoder, tokenizer=None, text_encoder=None, pn="0.06M")


def text_features(seed: int, lens=(5, 9), channels: int = 128):
    g = torch.Generator().manual_seed(seed + 2)
    feats = [torch.randn(n, channels, generator=g) for n in lens]
    packed = torch.cat(feats)
    cu = F.pad(torch.tensor(lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    padded = torch.zeros(len(lens), max(lens), channels)
    mask = torch.zeros(len(lens), max(lens), dtype=torch.bool)
    for i, f in enumerate(feats):
        padded[i, : len(f)], mask[i, : len(f)] = f, True
    return (packed, list(lens), cu, max(lens)), (padded, mask)


def _record(obj, name: str, store: list, pick):
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        store.append(pick(args, kwargs, out))
        return out

    setattr(obj, name, wrapper)


def run_official(model, vae, packed, schedule, cfg: float, top_k: int, top_p: float, seed: int, insertion: int):
    logits, bits = [], []
    _record(model, "get_logits", logits, lambda a, k, out: out.detach().clone())
    _record(vae.quantizer.lfq, "indices_to_codes", bits, lambda a, k, out: a[0].detach().clone())
    b = len(packed[1])
    _, _, img = model.autoregressive_infer_cfg(
        vae=vae, scale_schedule=[(1, h, w) for h, w in schedule], label_B_or_BLT=packed, g_seed=seed, B=b,
        cfg_list=[cfg] * len(schedule), tau_list=[1.0] * len(schedule), top_k=top_k, top_p=top_p,
        returns_vemb=1, cfg_insertion_layer=[insertion], vae_type=16, ret_img=True, inference_mode=True)
    del model.get_logits, vae.quantizer.lfq.indices_to_codes
    rgb = img.flip(dims=(3,))  # the official image is uint8 BGR for cv2
    return logits, [x[:, 0].long() for x in bits], rgb


def run_genkv(pipe, padded, cfg: float, top_k: int, top_p: float, seed: int, insertion: int):
    logits = []
    _record(pipe.transformer, "logits", logits, lambda a, k, out: out.detach().clone())
    bits = []
    import genkv.pipelines.infinity.pipeline as module

    original = module.bits_to_codes
    module.bits_to_codes = lambda b: (bits.append(b.detach().clone().long()), original(b))[1]
    try:
        out = pipe(prompt_embeds=padded, guidance_scale=cfg, top_k=top_k, top_p=top_p, output_type="pt",
                   generator=torch.Generator().manual_seed(seed), cfg_insertion_layer=insertion)
    finally:
        module.bits_to_codes = original
        del pipe.transformer.logits
    return logits, bits, out.images


def compare(name: str, official, ours, check_logits: bool = True) -> bool:
    (lo, bo, io), (lg, bg, ig) = official, ours
    bits_equal = len(bo) == len(bg) and all(torch.equal(a, b) for a, b in zip(bo, bg))
    flips = sum(int((a != b).sum()) for a, b in zip(bo, bg)) if len(bo) == len(bg) else -1
    logit_diff = max(float((a - b).abs().max()) for a, b in zip(lo, lg)) if len(lo) == len(lg) else float("inf")
    # The official image is uint8, truncated (``mul_(255).to(torch.uint8)``); genkv's truncated the same way.
    pixels = (ig * 255).permute(0, 2, 3, 1).to(torch.uint8)
    pixel_diff = int((pixels.int() - io.int()).abs().max())
    ok = bits_equal and (logit_diff <= TOL or not check_logits) and pixel_diff <= 1
    print(f"{name}: bits {'equal' if bits_equal else f'DIFFER ({flips} flips)'} over {len(bo)} scales, "
          f"max |logit diff| {logit_diff:.2e}, max |uint8 pixel diff| {pixel_diff} "
          f"({int((pixels != io).sum())} of {pixels.numel()} differ) -> {'ok' if ok else 'FAIL'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--infinity", required=True, type=Path, help="a checkout of FoundationVision/Infinity")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.infinity / "infinity" / "models" / "infinity.py").is_file():
        print(f"{args.infinity} is not an Infinity checkout (no infinity/models/infinity.py)")
        return 2
    torch.set_grad_enabled(False)
    from genkv.pipelines.infinity import scale_schedule

    packed, padded = text_features(args.seed)
    schedule = scale_schedule("0.06M", 1.0)
    runs = [("greedy cfg=3", 3.0, 1, 0.0, 0, False),
            ("sampled cfg=3 top-k 900 top-p 0.97 seed", 3.0, 900, 0.97, 0, False),
            ("greedy cfg=4 at block -1", 4.0, 1, 0.0, -1, False), ("greedy no cfg", 1.0, 1, 0.0, 0, False),
            ("spatial patchify (8B layout) sampled cfg=3", 3.0, 900, 0.97, 0, True)]
    ok, built = True, {}
    for name, cfg, top_k, top_p, insertion, patchify in runs:
        if patchify not in built:
            model, vae = official_models(args.infinity, args.depth, args.seed, patchify)
            with tempfile.TemporaryDirectory() as tmp:
                built[patchify] = model, vae, genkv_pipeline(model, vae, Path(tmp))
        model, vae, pipe = built[patchify]
        official = run_official(model, vae, packed, schedule, cfg, top_k, top_p, args.seed, insertion)
        ours = run_genkv(pipe, padded, cfg, top_k, top_p, args.seed, insertion)
        ok &= compare(name, official, ours)
    print(f"RESULT infinity parity (depth {args.depth}, width 64, 2 heads, 16-bit tokenizer, 0.06M 1:1, 7 scales, "
          f"float32 CPU, {len(runs)} runs): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
