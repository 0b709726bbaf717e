"""``set_vae_device`` / ``--vae-device``: decoding on another device gives the same frames, and a device that is
not there is refused in one line (issue 25).

On a CPU-only machine the decoding device is the CPU itself, so these tests check the plumbing and the errors;
the CUDA tests (the same GPU twice, and a second GPU where there is one) check the overlapped copy and decode.
"""

import numpy as np
import pytest
import torch

from genkv.pipelines.self_forcing.vae_device import resolve_vae_device
from genkv.testing import tiny_self_forcing_pipeline


def _frames(pipe, **kwargs):
    chunks = list(pipe.stream("a red circle moving left", num_frames=21,
                              generator=torch.Generator().manual_seed(3), **kwargs))
    return np.concatenate([np.asarray(c.cpu() if isinstance(c, torch.Tensor) else c) for c in chunks])


def test_frames_equal_with_the_vae_on_its_own_device():
    reference = _frames(tiny_self_forcing_pipeline(seed=0))
    pipe = tiny_self_forcing_pipeline(seed=0).set_vae_device("cpu")
    assert pipe.vae_device == torch.device("cpu")
    np.testing.assert_array_equal(_frames(pipe), reference)
    assert pipe.set_vae_device(None).vae_device is None


def test_image_to_video_encodes_where_the_vae_is():
    image = np.zeros((64, 64, 3), np.uint8)
    image[20:40, 10:30] = (230, 40, 40)
    reference = _frames(tiny_self_forcing_pipeline(seed=0), image=image)
    pipe = tiny_self_forcing_pipeline(seed=0).set_vae_device("cpu")
    latents = pipe.encode_frames(image[None])
    assert latents.device == pipe._execution_device  # handed back to the denoising device
    np.testing.assert_array_equal(_frames(pipe, image=image), reference)


@pytest.mark.parametrize("name, count, message", [
    ("cuda:1", 0, "no CUDA device is visible"),
    ("cuda:1", 1, "does not exist: this machine has 1 CUDA device (cuda:0); it needs a second GPU"),
    ("cuda:3", 2, "does not exist: this machine has 2 CUDA devices (cuda:0, cuda:1); use one of cuda:0, cuda:1"),
    ("gpu1", 2, "is not a device"),
    ("meta", 2, "is not supported"),
])
def test_a_device_that_is_not_there_is_one_line(monkeypatch, name, count, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(ValueError) as err:
        resolve_vae_device(name)
    assert message in str(err.value) and "\n" not in str(err.value)
    pipe = tiny_self_forcing_pipeline(seed=0)
    with pytest.raises(ValueError, match="vae_device"):
        pipe.set_vae_device(name)
    assert pipe.vae_device is None  # nothing changed


def test_an_existing_device_resolves_with_its_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_vae_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_vae_device("cuda") == torch.device("cuda", 0)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_frames(vae_device, overlap):
    pipe = tiny_self_forcing_pipeline(seed=0, device="cuda:0")
    if vae_device is not None:
        pipe.set_vae_device(vae_device)
    chunks = list(pipe.stream("a red circle moving left", num_frames=33, overlap_decode=overlap,
                              generator=torch.Generator("cuda:0").manual_seed(3)))
    return np.concatenate(chunks), pipe


@cuda
@pytest.mark.parametrize("overlap", [True, False])
def test_the_same_gpu_twice_gives_the_same_frames(overlap):
    reference, _ = _cuda_frames(None, overlap)
    frames, pipe = _cuda_frames("cuda:0", overlap)
    np.testing.assert_array_equal(frames, reference)
    assert pipe.vae.device == torch.device("cuda", 0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("overlap", [True, False])
def test_a_second_gpu_decodes_the_same_frames(overlap):
    reference, _ = _cuda_frames(None, overlap)
    frames, pipe = _cuda_frames("cuda:1", overlap)
    assert pipe.vae.device == torch.device("cuda", 1) and pipe.transformer.device == torch.device("cuda", 0)
    np.testing.assert_array_equal(frames, reference)  # the same kernels on the same GPU model: bit for bit
