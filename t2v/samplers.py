"""Samplers as plain functions over a denoiser, step-exact with diffusers' schedulers.

Every sampler shares the signature

    sampler(model, x, schedule, steps, *, spacing=None, start=0, callback=None,
            generator=None, **options) -> x0

- `model(x, t) -> prediction` with `t` a python int training timestep; the prediction is what
  `schedule.prediction_type` says ("epsilon" or "v_prediction"). Guidance is the caller's job.
- `x`: the starting sample (pure noise, or a noised input for video-to-video).
- `steps`: the number of inference steps of the full schedule; `start` skips the first ones
  (video-to-video runs the last `int(steps * strength)` steps, as diffusers does).
- `spacing`: "leading" / "linspace" / "trailing"; None takes the sampler's diffusers default
  when built from the model's DDIM config ("leading" for DDIM, "linspace" for DPM-Solver).
- `callback(i, t, x, x0)` after each step: step index, timestep, the new sample and the
  model's current estimate of the clean sample.
- `generator`: the source of any noise a stochastic sampler draws (DDIM with eta > 0).

Multistep history lives in local variables. Equations and the compatibility choices:
docs/samplers.md.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from t2v.errors import ConfigError
from t2v.noise import randn
from t2v.schedule import (NoiseSchedule, ddim_timesteps, dpm_timesteps, eps_to_x0, v_to_eps,
                          v_to_x0)

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def _x0_and_eps(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    if prediction_type == "epsilon":
        return eps_to_x0(x, out, a), out
    if prediction_type == "v_prediction":
        return v_to_x0(x, out, a), v_to_eps(x, out, a)
    raise ConfigError(f"prediction type {prediction_type!r} is not supported")


def step_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise for one stochastic step, drawn in diffusers' pipeline order: the pipeline folds
    video latents to ((b f), c, h, w) before `scheduler.step`, so a 5-D (B, C, F, H, W) sample
    gets randn(B, F, C, H, W) permuted; on the generator's device, then moved."""
    if x.ndim == 5:
        b, c, f, h, w = x.shape
        return randn((b, f, c, h, w), generator, x.device, x.dtype).permute(0, 2, 1, 3, 4)
    return randn(x.shape, generator, x.device, x.dtype)


def ddim(model: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int, *,
         spacing: str | None = None, start: int = 0, callback: Callback | None = None,
         eta: float = 0.0, generator: torch.Generator | None = None,
         noise: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, arXiv:2010.02502), eq. 12, as diffusers' DDIMScheduler.

    With eta > 0 each step adds sigma_t * z, z from `noise[k]` for the k-th step run, else
    drawn from `generator` by `step_noise` (one draw per step, after the model call).
    """
    if eta < 0:
        raise ConfigError(f"eta must be >= 0, got {eta}")
    ac = schedule.alphas_cumprod
    timesteps = ddim_timesteps(steps, spacing or "leading", schedule.num_train_timesteps,
                               schedule.steps_offset)
    # diffusers' previous timestep is t - N // steps for every spacing (not the next entry of
    # a linspace/trailing grid); reproduced for step-exact parity.
    stride = schedule.num_train_timesteps // steps
    for k, i in enumerate(range(start, len(timesteps))):
        t = timesteps[i]
        out = model(x, t)
        a_t = ac[t]
        a_prev = ac[t - stride] if t - stride >= 0 else schedule.final_alpha_cumprod
        x0, eps = _x0_and_eps(out, x, a_t, schedule.prediction_type)
        variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
        std = eta * variance ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if eta > 0:
            z = noise[k] if noise is not None else step_noise(out, generator)
            x = x + std * z
        if callback is not None:
            callback(i, t, x, x0)
    return x


def dpm_solver(model: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int, *,
               spacing: str | None = None, start: int = 0, callback: Callback | None = None,
               generator: torch.Generator | None = None, order: int = 2,
               algorithm: str = "dpmsolver++", lower_order_final: bool = True,
               final_sigma: str | None = None) -> torch.Tensor:
    """Multistep DPM-Solver (Lu et al. 2022, arXiv:2206.00927) and DPM-Solver++ (arXiv:2211.01095),
    orders 1-3, midpoint form for order 2, as diffusers' DPMSolverMultistepScheduler.

    DPM-Solver++ extrapolates data predictions x0, DPM-Solver noise predictions eps. The first
    step is first order (no history), later ones use up to `order` past predictions. The last
    step is first order when `final_sigma` is "zero" (the DPM-Solver++ default: it lands on
    sigma = 0 exactly) or, with `lower_order_final`, when there are fewer than 15 steps, which
    also caps the second-to-last step at second order. DPM-Solver (noise form) cannot step to
    sigma 0 and defaults to "sigma_min" (sigma of timestep 0). The solvers are deterministic:
    `generator` is accepted only so that every sampler shares one signature.
    """
    if algorithm not in ("dpmsolver++", "dpmsolver"):
        raise ConfigError(f"algorithm must be 'dpmsolver++' or 'dpmsolver', got {algorithm!r}")
    if order not in (1, 2, 3):
        raise ConfigError(f"DPM-Solver order must be 1, 2 or 3, got {order}")
    final_sigma = final_sigma or ("zero" if algorithm == "dpmsolver++" else "sigma_min")
    if final_sigma not in ("zero", "sigma_min") or (algorithm, final_sigma) == ("dpmsolver",
                                                                                 "zero"):
        raise ConfigError(f"final_sigma {final_sigma!r} is not available for {algorithm}")
    ac = schedule.alphas_cumprod
    timesteps = dpm_timesteps(steps, spacing or "linspace", schedule.num_train_timesteps,
                              schedule.steps_offset)
    all_sigmas = ((1 - ac) / ac) ** 0.5  # float32, as diffusers computes and stores them
    last = torch.tensor(0.0) if final_sigma == "zero" else all_sigmas[0]
    sigmas = torch.stack([all_sigmas[t] for t in timesteps] + [last.float()])

    def alpha_sigma_lambda(i: int):
        alpha = 1 / ((sigmas[i] ** 2 + 1) ** 0.5)
        sigma = sigmas[i] * alpha
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    n = len(timesteps)
    history: list[torch.Tensor] = []  # converted predictions, oldest first
    for i in range(start, n):
        t = timesteps[i]
        out = model(x, t)
        alpha_s0, sigma_s0, lambda_s0 = alpha_sigma_lambda(i)
        # In terms of alpha = sqrt(a_t), sigma = sqrt(1 - a_t), as diffusers writes them.
        if schedule.prediction_type == "epsilon":
            x0, eps = (x - sigma_s0 * out) / alpha_s0, out
        elif schedule.prediction_type == "v_prediction":
            x0, eps = alpha_s0 * x - sigma_s0 * out, alpha_s0 * out + sigma_s0 * x
        else:
            raise ConfigError(f"prediction type {schedule.prediction_type!r} is not supported")
        history = (history + [x0 if algorithm == "dpmsolver++" else eps])[-order:]

        final = i == n - 1 and ((lower_order_final and n < 15) or final_sigma == "zero")
        second_to_last = i == n - 2 and lower_order_final and n < 15
        used = len(history)
        step_order = 1 if final or used < 2 else 2 if (used < 3 or second_to_last) else 3
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(i + 1)
        h = lambda_t - lambda_s0
        sample = x.float()
        d0 = history[-1]
        if algorithm == "dpmsolver++":
            phi = alpha_t * (torch.exp(-h) - 1.0)
            x_next = (sigma_t / sigma_s0) * sample - phi * d0
        else:
            phi = sigma_t * (torch.exp(h) - 1.0)
            x_next = (alpha_t / alpha_s0) * sample - phi * d0
        if step_order >= 2:
            _, _, lambda_s1 = alpha_sigma_lambda(i - 1)
            h_0 = lambda_s0 - lambda_s1
            r0 = h_0 / h
            d1_0 = (1.0 / r0) * (d0 - history[-2])
        if step_order == 2:
            x_next = x_next - 0.5 * phi * d1_0  # midpoint
        elif step_order == 3:
            _, _, lambda_s2 = alpha_sigma_lambda(i - 2)
            r1 = (lambda_s1 - lambda_s2) / h
            d1_1 = (1.0 / r1) * (history[-2] - history[-3])
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
            if algorithm == "dpmsolver++":
                x_next = (x_next + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
                          - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h ** 2 - 0.5)) * d2)
            else:
                x_next = (x_next - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * d1
                          - (sigma_t * ((torch.exp(h) - 1.0 - h) / h ** 2 - 0.5)) * d2)
        x = x_next.to(out.dtype)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def dpmsolver_pp(model, x, schedule, steps, **options) -> torch.Tensor:
    """DPM-Solver++ multistep (data prediction): the model card's 25-step recipe."""
    return dpm_solver(model, x, schedule, steps, algorithm="dpmsolver++", **options)


def dpmsolver(model, x, schedule, steps, **options) -> torch.Tensor:
    """DPM-Solver multistep (noise prediction)."""
    return dpm_solver(model, x, schedule, steps, algorithm="dpmsolver", **options)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": ddim,
    "dpmsolver++": dpmsolver_pp,
    "dpmsolver": dpmsolver,
}


def first_timestep(sampler: str, steps: int, schedule: NoiseSchedule, spacing: str | None = None,
                   start: int = 0) -> int:
    """The timestep the sampler starts at (video-to-video noises its input to it)."""
    if sampler == "ddim":
        grid = ddim_timesteps(steps, spacing or "leading", schedule.num_train_timesteps,
                              schedule.steps_offset)
    else:
        grid = dpm_timesteps(steps, spacing or "linspace", schedule.num_train_timesteps,
                             schedule.steps_offset)
    return grid[start]
