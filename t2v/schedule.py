"""The discrete noise schedule and inference timesteps, with diffusers' numerics.

Training noise: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, with a_t = alphas_cumprod[t],
t = 0 .. num_train_timesteps - 1. Everything is float32 as in diffusers' schedulers (ModelScope
computes in float64; the two agree to ~1e-6 relative). Inference timesteps reproduce diffusers'
integer grids exactly, including the differences between DDIM's and DPM-Solver's spacing
formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from t2v.config import TIMESTEP_SPACINGS, ScheduleConfig
from t2v.errors import ConfigError

SPACINGS = TIMESTEP_SPACINGS  # the one list (t2v.config)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """alphas_cumprod (float32, one per training timestep) and how the model predicts."""

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    set_alpha_to_one: bool = False

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        """DDIM's a_prev after the last step: 1, or a_0 as the hub config (false) says."""
        return torch.tensor(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]


def betas(cfg: ScheduleConfig) -> torch.Tensor:
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":  # ModelScope's "linear_sd"
        return torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n,
                              dtype=torch.float32) ** 2
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    raise ConfigError(f"model.schedule.beta_schedule {cfg.beta_schedule!r} is not supported")


def noise_schedule(cfg: ScheduleConfig) -> NoiseSchedule:
    alphas_cumprod = torch.cumprod(1.0 - betas(cfg), dim=0)
    return NoiseSchedule(alphas_cumprod, cfg.prediction_type, cfg.steps_offset,
                         cfg.set_alpha_to_one)


def _check_steps(steps: int, num_train: int, spacing: str) -> None:
    if not 1 <= steps <= num_train:
        raise ConfigError(f"steps must be between 1 and {num_train}, got {steps}")
    if spacing not in SPACINGS:
        raise ConfigError(f"timestep spacing must be one of {SPACINGS}, got {spacing!r}")


def ddim_timesteps(steps: int, spacing: str, num_train: int = 1000,
                   steps_offset: int = 0) -> list[int]:
    """diffusers DDIMScheduler.set_timesteps: `steps` integer timesteps, descending.

    leading:  k * (N // steps) + offset       (ms-1.7b, 50 steps: 981, 961, ..., 1)
    linspace: round(linspace(0, N - 1, steps))
    trailing: round(arange(N, 0, -N / steps)) - 1
    """
    _check_steps(steps, num_train, spacing)
    if spacing == "leading":
        ts = (np.arange(0, steps) * (num_train // steps)).round()[::-1] + steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, num_train - 1, steps).round()[::-1]
    else:
        ts = np.round(np.arange(num_train, 0, -num_train / steps)) - 1
    return [int(t) for t in ts]


def dpm_timesteps(steps: int, spacing: str, num_train: int = 1000,
                  steps_offset: int = 0) -> list[int]:
    """diffusers DPMSolverMultistepScheduler.set_timesteps (its grids differ from DDIM's:
    `steps + 1` points with the last dropped).

    linspace: round(linspace(0, N - 1, steps + 1))[::-1][:-1]   (25 steps: 999, 959, ..., 40)
    leading:  k * (N // (steps + 1)), k = steps .. 1, + offset
    trailing: round(arange(N, 0, -N / steps)) - 1
    """
    _check_steps(steps, num_train, spacing)
    if spacing == "linspace":
        ts = np.linspace(0, num_train - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, steps + 1) * (num_train // (steps + 1))).round()[::-1][:-1]
        ts = ts + steps_offset
    else:
        ts = np.arange(num_train, 0, -num_train / steps).round() - 1
    return [int(t) for t in ts]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion to a timestep: sqrt(a) x0 + sqrt(1 - a) noise."""
    return alpha_cumprod ** 0.5 * x0 + (1 - alpha_cumprod) ** 0.5 * noise


# Conversions between what a model predicts (eps, x0 or v) at x_t with a = alphas_cumprod[t].

def eps_to_x0(x: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (x - (1 - a) ** 0.5 * eps) / a ** 0.5


def x0_to_eps(x: torch.Tensor, x0: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (x - a ** 0.5 * x0) / (1 - a) ** 0.5


def v_to_x0(x: torch.Tensor, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return a ** 0.5 * x - (1 - a) ** 0.5 * v


def v_to_eps(x: torch.Tensor, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return a ** 0.5 * v + (1 - a) ** 0.5 * x


def velocity(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The v-prediction target: sqrt(a) eps - sqrt(1 - a) x0."""
    return a ** 0.5 * eps - (1 - a) ** 0.5 * x0
