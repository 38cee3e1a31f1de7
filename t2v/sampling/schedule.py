"""The discrete noise schedule and inference timesteps, with diffusers' numerics.

Training noise: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, with a_t = alphas_cumprod[t],
t = 0 .. num_train_timesteps - 1. Everything is float32 as in diffusers' schedulers (ModelScope
computes in float64; the two agree to ~1e-6 relative). Inference timesteps reproduce diffusers'
grids exactly, including the differences between DDIM's, DPM-Solver's and Euler's spacing
formulas. The sigma-space samplers (DPM-Solver, UniPC, Euler) work with
sigma_t = sqrt((1 - a_t) / a_t), the noise-to-signal ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from t2v.config import TIMESTEP_SPACINGS, ScheduleConfig
from t2v.errors import ConfigError

# A denoiser maps (x_t, t) to the model output; a callback sees (step, t, x, x0) after each step.
Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]

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


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (arXiv:2305.08891), Algorithm 1: shift and scale sqrt(a_t) so that
    sqrt(a_T) = 0 (zero terminal SNR: the last timestep is pure noise) while sqrt(a_0) is kept,

        s_t = (sqrt(a_t) - sqrt(a_T)) * sqrt(a_0) / (sqrt(a_0) - sqrt(a_T)),

    then back to betas: a'_t = s_t^2, beta'_t = 1 - a'_t / a'_{t-1} (beta'_0 = 1 - a'_0).
    float32 in diffusers' order of operations (its rescale_zero_terminal_snr)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root ** 2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def noise_schedule(cfg: ScheduleConfig) -> NoiseSchedule:
    """a_t = cumprod(1 - beta); with `rescale_betas_zero_snr`, a_T = 0 exactly (as diffusers'
    DDIMScheduler keeps it; the sigma-space samplers replace it, see `sigma_table`)."""
    b = betas(cfg)
    if cfg.rescale_betas_zero_snr:
        b = rescale_zero_terminal_snr(b)
    alphas_cumprod = torch.cumprod(1.0 - b, dim=0)
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


def euler_timesteps(steps: int, spacing: str, num_train: int = 1000,
                    steps_offset: int = 0) -> list[float] | list[int]:
    """diffusers EulerDiscreteScheduler / EulerAncestralDiscreteScheduler.set_timesteps:
    DDIM's leading and trailing grids, but linspace is not rounded (float32, fractional:
    linspace(0, N - 1, steps), 25 steps: 999.0, 957.375, ...); the model then sees the fraction."""
    if spacing != "linspace":
        return ddim_timesteps(steps, spacing, num_train, steps_offset)
    _check_steps(steps, num_train, spacing)
    return [float(t) for t in np.linspace(0, num_train - 1, steps, dtype=np.float32)[::-1]]


# diffusers' sigma-space schedulers set a_T = 2**-24 (the smallest float16 subnormal) for a
# zero-SNR schedule so that sigma_T = sqrt((1 - a_T) / a_T) stays finite (4096); DDIM keeps 0.
ZERO_SNR_ALPHA_CUMPROD = 2.0 ** -24


def sigma_table(schedule: NoiseSchedule) -> torch.Tensor:
    """sigma_t = sqrt((1 - a_t) / a_t) for every training timestep (float32, as diffusers'
    DPMSolverMultistep, UniPCMultistep and Euler schedulers compute it), with a_T = 2**-24
    where the schedule has zero terminal SNR (a_T = 0)."""
    ac = schedule.alphas_cumprod
    if ac[-1] == 0:
        ac = torch.cat([ac[:-1], ac.new_tensor([ZERO_SNR_ALPHA_CUMPROD])])
    return ((1 - ac) / ac) ** 0.5


def sigmas_at(schedule: NoiseSchedule, timesteps: list, final: str = "zero") -> torch.Tensor:
    """The sigmas of an inference grid plus the level after the last step ("zero" or
    "sigma_min" = sigma_0), float32: linear interpolation of `sigma_table` at fractional
    timesteps (np.interp in float64, then float32, as diffusers)."""
    table = sigma_table(schedule)
    last = 0.0 if final == "zero" else float(table[0])
    sigmas = np.interp(np.asarray(timesteps, dtype=np.float64),
                       np.arange(len(table)), table.numpy())
    return torch.from_numpy(np.append(sigmas, last).astype(np.float32))


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


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0
                      ) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Imagen, arXiv:2205.11487), as diffusers'
    `thresholding=True`: per image, s = clamp(quantile(|x0|, ratio), 1, max_value), then
    x0 <- clamp(x0, -s, s) / s. diffusers' video pipeline folds frames into the batch before
    the scheduler, so a video (B, C, F, H, W) is thresholded frame by frame (quantile over
    C, H, W)."""
    dtype = x0.dtype
    x = x0.float()
    if x.ndim == 5:  # (B, C, F, H, W) -> one row per frame
        b, c, f, h, w = x.shape
        rows = x.permute(0, 2, 1, 3, 4).reshape(b * f, c * h * w)
    else:
        rows = x.reshape(x.shape[0], -1)
    s = torch.quantile(rows.abs(), ratio, dim=1).clamp(min=1, max=max_value)[:, None]
    rows = torch.clamp(rows, -s, s) / s
    if x.ndim == 5:
        return rows.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4).to(dtype)
    return rows.reshape(x.shape).to(dtype)
