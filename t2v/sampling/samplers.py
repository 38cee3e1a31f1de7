"""Samplers as plain functions over a denoiser, step-exact with diffusers' schedulers.

Every sampler shares the signature

    sampler(model, x, schedule, steps, *, spacing=None, start=0, callback=None,
            generator=None, **options) -> x0

- `model(x, t) -> prediction` with `t` a python int training timestep (a float for Euler
  with linspace spacing, whose grid is fractional as in diffusers); the prediction is what
  `schedule.prediction_type` says ("epsilon" or "v_prediction"). Guidance is the caller's job.
- `x`: the starting sample in the variance-preserving form x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
  (pure noise, or a noised input for video-to-video). Every sample a sampler passes to
  `callback` or returns is in this form, the sigma-space ones included; a callback may
  modify it in place and the sampler continues from the modified sample.
- `steps`: the number of inference steps of the full schedule; `start` skips the first ones
  (video-to-video runs the last `int(steps * strength)` steps, as diffusers does).
- `spacing`: "leading" / "linspace" / "trailing"; None takes the sampler's diffusers default
  when built from the model's DDIM config ("leading" for DDIM, "linspace" for the others).
- `callback(i, t, x, x0)` after each step: step index, timestep, the new sample and the
  model's current estimate of the clean sample.
- `generator`: the source of any noise a stochastic sampler draws (DDIM with eta > 0, Euler
  ancestral, SDE-DPM-Solver++), in diffusers' order (t2v.noise.step_noise).

Multistep history lives in local variables. Euler and Euler ancestral live in
t2v.sampling.samplers_sigma, UniPC in t2v.sampling.unipc. Equations and the compatibility choices:
docs/samplers.md.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from t2v.errors import ConfigError
from t2v.noise import step_noise  # noqa: F401 (public here too)
from t2v.sampling.samplers_sigma import euler, euler_ancestral
from t2v.sampling.schedule import (
    Callback,
    Denoiser,
    NoiseSchedule,
    ddim_timesteps,
    dpm_timesteps,
    dynamic_threshold,
    eps_to_x0,
    euler_timesteps,
    sigmas_at,
    v_to_eps,
    v_to_x0,
)
from t2v.sampling.lcm import lcm, lcm_timesteps
from t2v.sampling.unipc import unipc


def _x0_and_eps(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    if prediction_type == "epsilon":
        return eps_to_x0(x, out, a), out
    if prediction_type == "v_prediction":
        return v_to_x0(x, out, a), v_to_eps(x, out, a)
    raise ConfigError(f"prediction type {prediction_type!r} is not supported")


def ddim(model: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int, *,
         spacing: str | None = None, start: int = 0, callback: Callback | None = None,
         eta: float = 0.0, generator: torch.Generator | None = None,
         noise: Sequence[torch.Tensor] | None = None, thresholding: bool = False,
         dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0
         ) -> torch.Tensor:
    """DDIM (Song et al. 2021, arXiv:2010.02502), eq. 12, as diffusers' DDIMScheduler.

    With eta > 0 each step adds sigma_t * z, z from `noise[k]` for the k-th step run, else
    drawn from `generator` by `step_noise` (one draw per step, after the model call).
    `thresholding` applies dynamic thresholding to x0 (t2v.sampling.schedule.dynamic_threshold); the
    noise estimate stays the model's, as in diffusers.
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
        if thresholding:
            x0 = dynamic_threshold(x0, dynamic_thresholding_ratio, sample_max_value)
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
               final_sigma: str | None = None, thresholding: bool = False,
               dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0
               ) -> torch.Tensor:
    """Multistep DPM-Solver (Lu et al. 2022, arXiv:2206.00927), DPM-Solver++ (arXiv:2211.01095)
    and its SDE form ("sde-dpmsolver++"; "DPM++ 2M SDE" at order 2), orders 1-3, midpoint form
    for order 2, as diffusers' DPMSolverMultistepScheduler.

    DPM-Solver++ extrapolates data predictions x0, DPM-Solver noise predictions eps. The first
    step is first order (no history), later ones use up to `order` past predictions. The last
    step is first order when `final_sigma` is "zero" (the DPM-Solver++ default: it lands on
    sigma = 0 exactly) or, with `lower_order_final`, when there are fewer than 15 steps, which
    also caps the second-to-last step at second order. DPM-Solver (noise form) cannot step to
    sigma 0 and defaults to "sigma_min" (sigma of timestep 0). The SDE form draws one
    `step_noise` per step from `generator` (float32, after the model call, as diffusers);
    the ODE forms are deterministic. `thresholding`: dynamic thresholding of x0 (for
    DPM-Solver, eps is recomputed from the thresholded x0, as diffusers does).
    """
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if order not in (1, 2, 3):
        raise ConfigError(f"DPM-Solver order must be 1, 2 or 3, got {order}")
    data = algorithm != "dpmsolver"  # DPM-Solver++ (ODE or SDE) works on x0 predictions
    final_sigma = final_sigma or ("zero" if data else "sigma_min")
    if final_sigma not in ("zero", "sigma_min") or (final_sigma == "zero" and not data):
        raise ConfigError(f"final_sigma {final_sigma!r} is not available for {algorithm}")
    timesteps = dpm_timesteps(steps, spacing or "linspace", schedule.num_train_timesteps,
                              schedule.steps_offset)
    sigmas = sigmas_at(schedule, timesteps, final_sigma)  # float32, as diffusers stores them

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
        if thresholding:
            if not data:
                x0 = (x - sigma_s0 * eps) / alpha_s0
            x0 = dynamic_threshold(x0, dynamic_thresholding_ratio, sample_max_value)
            if not data:
                eps = (x - alpha_s0 * x0) / sigma_s0
        history = (history + [x0 if data else eps])[-order:]

        final = i == n - 1 and ((lower_order_final and n < 15) or final_sigma == "zero")
        second_to_last = i == n - 2 and lower_order_final and n < 15
        used = len(history)
        step_order = 1 if final or used < 2 else 2 if (used < 3 or second_to_last) else 3
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(i + 1)
        h = lambda_t - lambda_s0
        sample = x.float()
        d0 = history[-1]
        if step_order >= 2:
            _, _, lambda_s1 = alpha_sigma_lambda(i - 1)
            r0 = (lambda_s0 - lambda_s1) / h
            d1_0 = (1.0 / r0) * (d0 - history[-2])
            d1 = d1_0
        if step_order == 3:
            _, _, lambda_s2 = alpha_sigma_lambda(i - 2)
            r1 = (lambda_s1 - lambda_s2) / h
            d1_1 = (1.0 / r1) * (history[-2] - history[-3])
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        if algorithm == "dpmsolver++":
            phi = alpha_t * (torch.exp(-h) - 1.0)
            x_next = (sigma_t / sigma_s0) * sample - phi * d0
            if step_order == 2:
                x_next = x_next - 0.5 * phi * d1  # midpoint
            elif step_order == 3:
                x_next = (x_next + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
                          - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h ** 2 - 0.5)) * d2)
        elif algorithm == "dpmsolver":
            phi = sigma_t * (torch.exp(h) - 1.0)
            x_next = (alpha_t / alpha_s0) * sample - phi * d0
            if step_order == 2:
                x_next = x_next - 0.5 * phi * d1
            elif step_order == 3:
                x_next = (x_next - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * d1
                          - (sigma_t * ((torch.exp(h) - 1.0 - h) / h ** 2 - 0.5)) * d2)
        else:  # sde-dpmsolver++: x_t = (s_t/s_s) e^-h x + a_t (1 - e^-2h) D + s_t sqrt(1 - e^-2h) z
            z = step_noise(out, generator, torch.float32)
            phi = alpha_t * (1 - torch.exp(-2.0 * h))
            x_next = (sigma_t / sigma_s0 * torch.exp(-h)) * sample + phi * d0
            if step_order == 2:
                x_next = x_next + 0.5 * phi * d1
            elif step_order == 3:
                x_next = (x_next + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
                          + (alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2
                                        - 0.5)) * d2)
            x_next = x_next + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * z
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


def sde_dpmsolver_pp(model, x, schedule, steps, **options) -> torch.Tensor:
    """SDE-DPM-Solver++ multistep, "DPM++ 2M SDE" at the default order 2 (stochastic)."""
    return dpm_solver(model, x, schedule, steps, algorithm="sde-dpmsolver++", **options)


ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")  # diffusers' algorithm_type names

# The names are diffusers' scheduler or algorithm_type names (k-diffusion's for Euler).
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": ddim,
    "dpmsolver++": dpmsolver_pp,
    "dpmsolver": dpmsolver,
    "sde-dpmsolver++": sde_dpmsolver_pp,
    "unipc": unipc,
    "euler": euler,
    "euler_a": euler_ancestral,
    "lcm": lcm,  # consistency-distilled models only (t2v.sampling.lcm)
}
# Samplers whose diffusers scheduler has `solver_order`, and those with `thresholding`.
ORDER_SAMPLERS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "unipc")
THRESHOLDING_SAMPLERS = ("ddim", "dpmsolver++", "dpmsolver", "sde-dpmsolver++", "unipc")


def sampler_options(sampler: str, *, eta: float = 0.0, solver_order: int = 2,
                    thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                    sample_max_value: float = 1.0, noise_start: bool = False,
                    lcm_original_steps: int = 50, lcm_rule: str = "even") -> dict:
    """The keyword options `sampler` takes from the generation settings; a setting it cannot
    honour is refused (ConfigError, one line). `noise_start`: x is text-to-video's N(0, I)
    draw, which the Euler samplers scale as diffusers does (t2v.sampling.samplers_sigma).
    `lcm_*`: the LCM sampler's distillation grid (t2v.sampling.lcm)."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {tuple(SAMPLERS)}, got {sampler!r}")
    if sampler != "ddim" and eta > 0:
        raise ConfigError(f"eta applies to the ddim sampler only (sampler is {sampler})")
    if thresholding and sampler not in THRESHOLDING_SAMPLERS:
        raise ConfigError(f"thresholding applies to the {', '.join(THRESHOLDING_SAMPLERS)} "
                          f"samplers only (sampler is {sampler})")
    if not 0.0 < dynamic_thresholding_ratio <= 1.0:
        raise ConfigError(f"dynamic_thresholding_ratio must be in (0, 1], got "
                          f"{dynamic_thresholding_ratio}")
    if not sample_max_value >= 1.0:
        raise ConfigError(f"sample_max_value must be >= 1, got {sample_max_value}")
    options: dict = {"eta": eta} if sampler == "ddim" else {}
    if sampler in ORDER_SAMPLERS:
        options["order"] = solver_order
    if sampler in ("euler", "euler_a"):
        options["noise_start"] = noise_start
    if sampler == "lcm":
        options.update(original_steps=lcm_original_steps, rule=lcm_rule)
    if thresholding:
        options.update(thresholding=True, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                       sample_max_value=sample_max_value)
    return options


def sampler_timesteps(sampler: str, steps: int, schedule: NoiseSchedule,
                      spacing: str | None = None, lcm_original_steps: int = 50,
                      lcm_rule: str = "even") -> list:
    """The sampler's inference timesteps (its diffusers scheduler's grid; `spacing` None: its
    default when built from the model's DDIM config, "leading" for DDIM, else "linspace"; LCM's
    from its distillation grid)."""
    n, offset = schedule.num_train_timesteps, schedule.steps_offset
    if sampler == "lcm":
        return lcm_timesteps(steps, lcm_original_steps, n, lcm_rule)
    if sampler == "ddim":
        return ddim_timesteps(steps, spacing or "leading", n, offset)
    if sampler in ("euler", "euler_a"):
        return euler_timesteps(steps, spacing or "linspace", n, offset)
    return dpm_timesteps(steps, spacing or "linspace", n, offset)


def first_timestep(sampler: str, steps: int, schedule: NoiseSchedule, spacing: str | None = None,
                   start: int = 0) -> int | float:
    """The timestep the sampler starts at (a float for Euler's fractional linspace grid)."""
    return sampler_timesteps(sampler, steps, schedule, spacing)[start]


def first_alpha_cumprod(sampler: str, steps: int, schedule: NoiseSchedule,
                        spacing: str | None = None, start: int = 0) -> torch.Tensor:
    """a at the first step, where video-to-video noises its input to (x = sqrt(a) x0 +
    sqrt(1 - a) eps): alphas_cumprod[t] for DDIM; 1 / (sigma^2 + 1) from the sigma-space
    samplers' own sigma (interpolated at Euler's fractional timesteps, 2**-24 for a zero-SNR
    a_T), as their diffusers schedulers' add_noise uses."""
    t = first_timestep(sampler, steps, schedule, spacing, start)
    if sampler == "ddim":
        return schedule.alphas_cumprod[t]
    sigma = sigmas_at(schedule, [t])[0]
    return 1 / (sigma ** 2 + 1)
