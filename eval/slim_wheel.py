"""Cut a transformers wheel down to the model folders a sprite-model training run imports, so that the wheels a GPU
run carries fit the device upload limit (64 MiB with the working tree).

The GPU image has torch, triton, einops, accelerate and imageio, but neither diffusers nor transformers, and
``eval/train_tiny.py`` needs transformers for its UMT5 text encoder. The whole transformers 5.25 wheel is 13.8 MB,
92% of it ``transformers/models/*``, one folder per architecture. A training run imports ``umt5`` / ``t5`` (the
text encoder, its tokenizer) and ``auto``; diffusers 0.42.1 imports the configs of ``dinov2_with_registers``,
``siglip`` and ``vit_mae`` when it loads a pipeline. Where peft is installed (the GPU image has it), diffusers
imports it, and peft imports ``AutoTokenizer`` (whose module imports ``encoder_decoder``) and, from 0.21,
``BloomPreTrainedModel``: the first slim wheel lacked those two folders and a training run stopped at its imports
(checked since against peft 0.15.2 and 0.21.2 on the CPU). Kept to those, the wheel is 2.3 MB. Every other file is
kept as it is; the wheel's RECORD lists exactly what is left.

    pip download -d /tmp/w --no-deps transformers==5.25.0 tokenizers==0.23.3 huggingface_hub==2.4.0 ...
    python eval/slim_wheel.py /tmp/w/transformers-5.25.0-py3-none-any.whl .whl-train/
    # on the GPU: pip install --no-deps --target /tmp/site .whl-train/*.whl; export USE_HUB_KERNELS=0
    # (the image's old `kernels` package otherwise breaks transformers' from_pretrained)

The rest of the carried set (2026-12-06: 9.6 MB): tokenizers, huggingface_hub, httpx2, httpcore2, h11, anyio, idna,
truststore, safetensors, regex, pyyaml, tqdm, filelock, fsspec, packaging, typing_extensions (cp312 wheels for the
image's Python 3.12).
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

KEEP = ("umt5", "t5", "auto", "encoder_decoder", "bloom", "dinov2_with_registers", "siglip", "vit_mae")
_MODEL_DIR = re.compile(r"^[^/]+/models/([^/]+)/")


def slim_wheel(source: Path, target: Path, keep: tuple[str, ...] = KEEP) -> tuple[int, int]:
    """Write ``source`` (a wheel) to ``target`` without the ``<package>/models/<name>/`` folders whose name is not in
    ``keep``; the RECORD drops their lines. Returns (files in, files out).

    Example:
        >>> import tempfile, zipfile
        >>> d = Path(tempfile.mkdtemp())
        >>> with zipfile.ZipFile(d / "p-1-py3-none-any.whl", "w") as z:
        ...     for name in ("p/__init__.py", "p/models/a/m.py", "p/models/b/m.py"):
        ...         z.writestr(name, "")
        ...     z.writestr("p-1.dist-info/RECORD", "p/__init__.py,,\\np/models/a/m.py,,\\np/models/b/m.py,,\\n")
        >>> slim_wheel(d / "p-1-py3-none-any.whl", d / "out.whl", keep=("a",))
        (4, 3)
    """
    def kept(name: str) -> bool:
        match = _MODEL_DIR.match(name)
        return match is None or match.group(1) in keep

    with zipfile.ZipFile(source) as wheel_in, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as wheel_out:
        names = wheel_in.namelist()
        for name in (n for n in names if kept(n)):
            data = wheel_in.read(name)
            if name.endswith(".dist-info/RECORD"):
                lines = [line for line in data.decode().splitlines() if line and kept(line.split(",")[0])]
                data = ("\n".join(lines) + "\n").encode()
            wheel_out.writestr(wheel_in.getinfo(name), data)
        return len(names), len(wheel_out.namelist())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path)
    parser.add_argument("out_dir", type=Path, help="folder for the cut-down wheel (same file name)")
    parser.add_argument("--keep", nargs="+", default=list(KEEP), help="model folders kept")
    args = parser.parse_args(argv)
    if not args.wheel.is_file() or args.wheel.suffix != ".whl":
        print(f"error: {args.wheel} is not a wheel file; pass the .whl that pip download wrote", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    target = args.out_dir / args.wheel.name
    if target.resolve() == args.wheel.resolve():
        print("error: out_dir holds the source wheel; write the cut-down one to another folder", file=sys.stderr)
        return 2
    before, after = slim_wheel(args.wheel, target, tuple(args.keep))
    print(f"{target}: {after} of {before} files, {target.stat().st_size / 1e6:.1f} MB "
          f"(from {args.wheel.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
