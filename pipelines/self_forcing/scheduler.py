"""Self-Forcing's few-step flow-matching schedule as a diffusers scheduler config."""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin


SAMPLERS = ("renoise", "euler", "dpmpp_2m")


def _log_snr(sigma: float) -> float:
    """``lambda = log(alpha / sigma)`` with ``alpha = 1 - sigma``; -inf at pure noise, +inf at clean data."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log((1.0 - sigma) / sigma)


class SelfForcingScheduler(SchedulerMixin, ConfigMixin):
    """The denoising steps of Self-Forcing / CausVid / LongLive (flow matching, x0 prediction, re-noising).

    ``sampler="renoise"`` (upstream's): each step predicts the clean chunk and re-noises it with fresh noise to
    the next level, which is right for a few-step distilled model. ``sampler="euler"``: plain Euler steps of
    the flow ODE, ``x <- x + (sigma_next - sigma) v``, for an undistilled flow-matching model sampled in more
    steps (genkv's tiny sprite model); the last step still returns the predicted clean chunk. ``sampler=
    "dpmpp_2m"``: DPM-Solver++(2M) (Lu et al., 2022), the second-order multistep solver in data prediction: it
    reuses the previous step's predicted clean chunk, so it costs no extra forward, and reaches Euler's accuracy
    in far fewer steps. Its first-order step is exactly Euler's (for ``x = (1 - sigma) x0 + sigma noise``, DDIM
    and Euler coincide).

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
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        n = num_train_timesteps
        s = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float32)[:-1]
        sigmas = shift * s / (1 + (shift - 1) * s)
        all_timesteps = torch.cat([sigmas * n, torch.zeros(1)])
        all_sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._history: tuple[torch.Tensor, float] | None = None  # dpmpp_2m: the previous step's x0, lambda
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
        sigma, sigma_next = float(self.sigmas[step]), float(self.sigmas[step + 1])
        if self.config.sampler == "euler":
            return sample + (sigma_next - sigma) * flow.float()
        if self.config.sampler == "dpmpp_2m":
            return self._dpmpp_2m(sample, x0, step, sigma, sigma_next)
        return self.add_noise(x0, noise, sigma_next)

    def _dpmpp_2m(self, sample: torch.Tensor, x0: torch.Tensor, step: int, sigma: float,
                  sigma_next: float) -> torch.Tensor:
        """``x <- (s'/s) x + (1 - s'/s) D`` where ``D`` is the predicted clean chunk, extrapolated in log-SNR
        from the previous step's when there is one: ``D = (1 + 1/2r) x0 - (1/2r) x0_prev``,
        ``r = h_prev / h``, ``h = lambda' - lambda``. The history is this chunk's: step 0 starts afresh."""
        previous = self._history if step > 0 else None
        lam, lam_next = _log_snr(sigma), _log_snr(sigma_next)
        denoised = x0.float()
        if previous is not None and math.isfinite(previous[1]) and math.isfinite(lam_next):
            r = (lam - previous[1]) / (lam_next - lam)
            denoised = (1.0 + 0.5 / r) * denoised - (0.5 / r) * previous[0]
        self._history = (x0.float(), lam)
        ratio = sigma_next / sigma
        return ratio * sample + (1.0 - ratio) * denoised
