"""LPIPS (Zhang et al. 2018) per frame, only when it can run without downloading anything.

The ``lpips`` package ships its small linear heads (``lpips/weights/v0.1/{net}.pth``) but builds the backbone
with torchvision's ImageNet weights, which torchvision downloads into ``<torch hub dir>/checkpoints/`` on first
use. genkv never downloads: :func:`lpips_unavailable` checks the package and both files first, and callers skip
LPIPS with its message when it returns one. To enable it, install ``lpips`` (and torchvision) and place the
backbone file there, e.g. on a machine with network: ``python -c "import lpips; lpips.LPIPS(net='alex')"``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# torchvision's ImageNet checkpoints that lpips' backbones load (file names fixed by torchvision's URLs).
BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


class LpipsUnavailable(RuntimeError):
    """LPIPS cannot run offline here; the message says what is missing and where it was looked for."""


def backbone_path(net: str = "alex") -> Path:
    """Where torchvision looks for (and would download) the backbone of ``lpips.LPIPS(net=net)``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def lpips_unavailable(net: str = "alex") -> str | None:
    """``None`` if LPIPS with backbone ``net`` can run from local files, else a one-line reason.

    Example:
        >>> msg = lpips_unavailable("alex")
        >>> msg is None or msg.startswith("LPIPS skipped")
        True
    """
    if net not in BACKBONE_FILES:
        return f"LPIPS skipped: unknown network {net!r}; choose one of {sorted(BACKBONE_FILES)}"
    try:
        import lpips
    except ImportError:
        return "LPIPS skipped: the lpips package is not installed (pip install lpips torchvision)"
    head = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    if not head.is_file():
        return f"LPIPS skipped: the lpips linear head {head} is missing"
    backbone = backbone_path(net)
    if not backbone.is_file():
        return f"LPIPS skipped: {net} backbone weights not found at {backbone} (genkv does not download weights)"
    return None


class LpipsScorer:
    """Per-frame LPIPS between two uint8 batches ``[N, H, W, 3]`` (lower is closer; 0 for identical frames).

    Raises :class:`LpipsUnavailable` at construction when :func:`lpips_unavailable` gives a reason, so
    building it can never trigger a download.

    Example:
        >>> import numpy as np
        >>> try:
        ...     score = LpipsScorer("alex")
        ... except LpipsUnavailable as why:
        ...     score = None
        >>> a = np.zeros((2, 64, 64, 3), np.uint8)
        >>> score is None or score(a, a).tolist() == [0.0, 0.0]
        True
    """

    def __init__(self, net: str = "alex", device: str = "cpu"):
        reason = lpips_unavailable(net)
        if reason is not None:
            raise LpipsUnavailable(reason)
        import lpips
        import torch

        self.torch = torch
        self.device = torch.device(device)
        # The backbone file is present, so torchvision loads it from the cache instead of downloading.
        self.model = lpips.LPIPS(net=net, verbose=False).to(self.device).eval()

    def __call__(self, ref: np.ndarray, test: np.ndarray) -> np.ndarray:
        torch = self.torch

        def to_tensor(x: np.ndarray):  # LPIPS expects RGB NCHW in [-1, 1]
            t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device).permute(0, 3, 1, 2).float()
            return t / 127.5 - 1.0

        with torch.no_grad():
            d = self.model(to_tensor(ref), to_tensor(test))
        return d.reshape(len(ref)).double().cpu().numpy()
