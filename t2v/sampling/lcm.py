"""Multistep consistency sampling (Latent Consistency Models, Luo et al. 2023, arXiv:2310.04378,
Algorithm 3), step-exact with diffusers' LCMScheduler, for consistency-distilled models
(docs/few-step.md).

A consistency model maps any x_t of its training grid to the clean sample in one call:

    x0_hat   = the prediction's x0 (eps or v, as the schedule says)
    denoised = c_out(t) x0_hat + c_skip(t) x_t          (the boundary condition: at t = 0 the
    c_skip(t) = s^2 / ((t k)^2 + s^2),                   identity, s = sigma_data = 0.5,
    c_out(t)  = t k / sqrt((t k)^2 + s^2)                k = timestep_scaling)

and between steps the sample is noised again to the next timestep with fresh noise:
x_prev = sqrt(a_prev) denoised + sqrt(1 - a_prev) z. The last step returns `denoised`.

Timesteps come from the distillation grid: `original_steps` points k = N // original_steps
apart, (1..original_steps) * k - 1 (50: 19, 39, ..., 999), of which `steps` are taken:
"even": diffusers' current rule, indices floor(linspace(0, original_steps, steps, endpoint=False))
of the descending grid (4 of 50: 999, 759, 499, 259); "stride": every (original_steps //
steps)-th point from 999, diffusers' rule until 0.24 and T2V-Turbo's (4 of 50: 999, 759, 519,
279).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from t2v.errors import ConfigError
from t2v.noise import step_noise
from t2v.sampling.schedule import Callback, Denoiser, NoiseSchedule, eps_to_x0, v_to_x0

SIGMA_DATA = 0.5  # LCM's boundary-condition constant (diffusers' sigma_data)
LCM_RULES = ("even", "stride")


def lcm_timesteps(steps: int, original_steps: int = 50, num_train: int = 1000,
                  rule: str = "even") -> list[int]:
    """The `steps` timesteps of an LCM run, descending (the module docstring's rules)."""
    if rule not in LCM_RULES:
        raise ConfigError(f"LCM timestep rule must be one of {LCM_RULES}, got {rule!r}")
    if not 1 <= original_steps <= num_train:
        raise ConfigError(f"LCM original_steps must be between 1 and {num_train}, got "
                          f"{original_steps}")
    if not 1 <= steps <= original_steps:
        raise ConfigError(f"LCM steps must be between 1 and original_steps "
                          f"({original_steps}), got {steps}")
    grid = np.arange(1, original_steps + 1) * (num_train // original_steps) - 1
    if rule == "stride":
        return [int(t) for t in grid[::-(original_steps // steps)][:steps]]
    grid = grid[::-1]
    indices = np.floor(np.linspace(0, original_steps, num=steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in grid[indices]]


def boundary_scalings(t: int | torch.Tensor, timestep_scaling: float = 10.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at timestep t, float32 as diffusers computes them."""
    scaled = torch.as_tensor(t, dtype=torch.float32) * timestep_scaling
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + SIGMA_DATA ** 2) ** 0.5
    return c_skip, c_out


def lcm(model: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int, *,
        spacing: str | None = None, start: int = 0, callback: Callback | None = None,
        generator: torch.Generator | None = None, original_steps: int = 50,
        rule: str = "even", timestep_scaling: float = 10.0,
        noise: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Multistep LCM sampling. `spacing` does not apply (the grid is the distillation's,
    `original_steps` and `rule`); the noise between steps is `noise[k]` for the k-th step run,
    else drawn from `generator` by `step_noise` after the model call, as diffusers draws it."""
    del spacing  # LCM's timesteps come from original_steps and rule
    ac = schedule.alphas_cumprod
    timesteps = lcm_timesteps(steps, original_steps, schedule.num_train_timesteps, rule)
    for k, i in enumerate(range(start, len(timesteps))):
        t = timesteps[i]
        out = model(x, t)
        if schedule.prediction_type == "epsilon":
            x0 = eps_to_x0(x, out, ac[t])
        elif schedule.prediction_type == "v_prediction":
            x0 = v_to_x0(x, out, ac[t])
        else:
            raise ConfigError(f"prediction type {schedule.prediction_type!r} is not supported")
        c_skip, c_out = boundary_scalings(t, timestep_scaling)
        denoised = c_out * x0 + c_skip * x
        if i < len(timesteps) - 1:
            a_prev = ac[timesteps[i + 1]]
            z = noise[k] if noise is not None else step_noise(out, generator, denoised.dtype)
            x = a_prev.sqrt() * denoised + (1 - a_prev).sqrt() * z
        else:
            x = denoised
        if callback is not None:
            callback(i, t, x, denoised)
    return x
