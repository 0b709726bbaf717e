"""eval/train_tiny.py end to end on a CPU with its --smoke sizes: the two-run mode (VAE, then the rest)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
import train_tiny  # noqa: E402


def test_vae_run_then_model_run_gives_a_loadable_pipeline_that_keeps_the_vae(tmp_path):
    from diffusers import AutoencoderKLWan

    from genkv.pipelines import SelfForcingPipeline

    assert train_tiny.main(["--out", str(tmp_path / "vae"), "--smoke", "--stop-after-vae",
                            "--tar", str(tmp_path / "vae.tar")]) == 0
    assert train_tiny.main(["--out", str(tmp_path / "model"), "--smoke", "--vae-from", str(tmp_path / "vae.tar"),
                            "--vae-minutes", "0", "--scheduler-steps", "3", "--guidance", "1", "2"]) == 0
    pipe = SelfForcingPipeline.from_pretrained(tmp_path / "model", torch_dtype=torch.float32)
    assert pipe.scheduler.config.sampler == "euler" and len(pipe.scheduler.timesteps) == 3
    assert pipe.config.default_guidance_scale in (1.0, 2.0)
    first = AutoencoderKLWan.from_pretrained(tmp_path / "vae" / "vae")
    for (name, a), b in zip(first.state_dict().items(), pipe.vae.state_dict().values()):
        assert torch.equal(a.half().float(), b), name  # the model run kept the VAE (saved in fp16)
    assert (tmp_path / "model" / "samples" / "red.png").is_file()
