"""Where the decoder runs: the device a ``vae_device`` names, checked before anything is moved there.

With a second GPU, decoding there takes the VAE's ~118 ms a chunk (Wan2.1 shapes, H200) off the GPU that
denoises: each chunk's final latents are copied over (peer to peer, ~0.6 MB at 480x832) and decoded while the
first GPU denoises the next chunk. A side stream on the same GPU hides none of that work, only launch gaps.
"""

from __future__ import annotations

import torch


def resolve_vae_device(device: "str | torch.device") -> torch.device:
    """``device`` as a ``torch.device`` that exists here, or a one-line ``ValueError`` saying what to pass.

    Example:
        >>> resolve_vae_device("cpu")
        device(type='cpu')
    """
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"vae_device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"vae_device {str(target)!r}: no CUDA device is visible here; leave vae_device out "
                             "(one device decodes as it denoises)")
        index = 0 if target.index is None else target.index
        if index >= count:
            devices = ", ".join(f"cuda:{i}" for i in range(count))
            hint = ("it needs a second GPU; leave it out to decode on the GPU that denoises" if count == 1
                    else f"use one of {devices}")
            raise ValueError(f"vae_device {str(target)!r} does not exist: this machine has {count} CUDA "
                             f"device{'s' if count > 1 else ''} ({devices}); {hint}")
        return torch.device("cuda", index)
    if target.type != "cpu":
        raise ValueError(f"vae_device {str(target)!r} is not supported; use cpu, cuda or cuda:N")
    return target
