"""The JSON every small benchmark script writes: when, what command, on what, with which torch, then its rows."""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

import torch


def write_result(out: Path, device: str | torch.device, **fields) -> dict:
    """Write ``fields`` under a header naming the date, the command line, the device and torch; print the path.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "r.json"
        >>> write_result(path, "cpu", rows=[1, 2])["rows"]
        [1, 2]
    """
    device = torch.device(device)
    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        **fields,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"json: {out}")
    return result
