"""Self-Forcing's few-step flow-matching schedule as a diffusers scheduler config."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin


class SelfForcingScheduler(SchedulerMixin, ConfigMixin):
    """The denoising steps of Self-Forcing / CausVid / LongLive (flow matching, x0 prediction, re-noising).

    ``sampler="renoise"`` (upstream's): each step predicts the clean chunk and re-noises it with fresh noise to
    the next level, which is right for a few-step distilled model. ``sampler="euler"``: plain Euler steps of
    the flow ODE, ``x <- x + (sigma_next - sigma) v``, for an undistilled flow-matching model sampled in more
    steps (genkv's tiny sprite model); the last step still returns the predicted clean chunk.

    Upstream builds ``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)`` with 1000 training steps,
    ``sigma(s) = shift * s / (1 + (shift - 1) * s)`` on ``s = linspace(1, 0, 1001)[:-1]``, and (with
    ``warp_denoising_step``) maps each listed step ``t`` to ``timesteps[1000 - t]``. For the default list this
    gives timesteps ``[1000, 937.5, 833.33, 625]`` (sigmas ``[1, 0.9375, 0.8333, 0.625]``), kept as float32.

    Example:
        >>> s = SelfForcingScheduler()
        >>> [round(float(t), 2) for t in s.timesteps]
        [1000.0, 937.5, 833.33, 625.0]
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 5.0,
        denoising_step_list: tuple[int, ...] = (1000, 750, 500, 250),
        warp_denoising_step: bool = True,
        sampler: str = "renoise",
    ) -> None:
        if sampler not in ("renoise", "euler"):
            raise ValueError(f"sampler must be 'renoise' or 'euler', got {sampler!r}")
        n = num_train_timesteps
        s = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float32)[:-1]
        sigmas = shift * s / (1 + (shift - 1) * s)
        all_timesteps = torch.cat([sigmas * n, torch.zeros(1)])
        all_sigmas = torch.cat([sigmas, torch.zeros(1)])
        steps = torch.tensor(list(denoising_step_list), dtype=torch.long)
        if warp_denoising_step:
            index = n - steps
            self.timesteps = all_timesteps[index]
            self.sigmas = all_sigmas[index]
        else:
            self.timesteps = steps.float()
            self.sigmas = all_sigmas[torch.argmin((all_timesteps[None] - self.timesteps[:, None]).abs(), dim=1)]

    def __len__(self) -> int:
        return len(self.timesteps)

    @staticmethod
    def predict_x0(sample: torch.Tensor, flow: torch.Tensor, sigma: float) -> torch.Tensor:
        """``x0 = x - sigma * v`` in float64, as upstream's ``_convert_flow_pred_to_x0``, returned float32."""
        return (sample.double() - sigma * flow.double()).float()

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """Re-noise ``x0`` to the next step's level: ``(1 - sigma) x0 + sigma noise`` (float32)."""
        return (1.0 - sigma) * x0 + sigma * noise

    def next_sample(self, sample: torch.Tensor, flow: torch.Tensor, x0: torch.Tensor, step: int,
                    noise: torch.Tensor | None) -> torch.Tensor:
        """The sample at step ``step + 1`` from step ``step``'s ``sample``, predicted ``flow`` and ``x0``;
        ``noise`` is used (and needed) by the re-noising sampler only."""
        sigma_next = float(self.sigmas[step + 1])
        if self.config.sampler == "euler":
            return sample + (sigma_next - float(self.sigmas[step])) * flow.float()
        return self.add_noise(x0, noise, sigma_next)
