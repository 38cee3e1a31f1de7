"""Euler and Euler ancestral (Karras et al. 2022, arXiv:2206.00364; k-diffusion's samplers), as
diffusers' EulerDiscreteScheduler and EulerAncestralDiscreteScheduler.

They integrate in sigma space: with sigma = sqrt((1 - a) / a), the sample s = x sqrt(sigma^2 + 1)
(x the variance-preserving x_t of t2v's sampler contract) obeys ds/dsigma = (s - x0) / sigma.
The loop keeps s (in the model's dtype, as diffusers does between steps), gives the model
x = s / sqrt(sigma^2 + 1) (diffusers' `scale_model_input`) and gives callbacks that same x; if a
callback replaces it (t2v.pipeline.text_to_video's callback_on_step_end copies returned latents into it), s
is recomputed from the new x. Keeping s rather than x matters: diffusers' update
s + (sigma_next - sigma) (s - x0) / sigma cancels s ~ sigma_max * noise down to x0, so one
rounding of s (4096 x noise with a zero-SNR schedule) would show in the result.
Shared signature and contract: t2v.sampling.samplers.
"""

from __future__ import annotations

import torch

from t2v.errors import ConfigError
from t2v.noise import step_noise
from t2v.sampling.schedule import Callback, Denoiser, NoiseSchedule, euler_timesteps, sigmas_at


def _denoised(out: torch.Tensor, s: torch.Tensor, sigma: torch.Tensor,
              prediction_type: str) -> torch.Tensor:
    """x0 from the model output at the sigma-space sample s: eps: s - sigma eps;
    v: -sigma / sqrt(sigma^2 + 1) v + s / (sigma^2 + 1) (diffusers' c_out, c_skip)."""
    if prediction_type == "epsilon":
        return s - sigma * out
    if prediction_type == "v_prediction":
        return out * (-sigma / (sigma ** 2 + 1) ** 0.5) + (s / (sigma ** 2 + 1))
    raise ConfigError(f"prediction type {prediction_type!r} is not supported")


def _sigma_space_loop(model: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int,
                      spacing: str | None, start: int, callback: Callback | None,
                      noise_start: bool, update) -> torch.Tensor:
    """The loop shared by both samplers; `update(s, x0, sigma, sigma_next, out)` is the step in
    sigma space (float32). `noise_start`: x is the N(0, I) draw of a text-to-video run and
    starts as diffusers' x * init_noise_sigma (sigma_max for linspace and trailing spacing,
    sqrt(sigma_max^2 + 1) for leading) rather than as x_t (x sqrt(sigma_0^2 + 1))."""
    spacing = spacing or "linspace"
    timesteps = euler_timesteps(steps, spacing, schedule.num_train_timesteps,
                                schedule.steps_offset)
    sigmas = sigmas_at(schedule, timesteps)
    s = None
    for i in range(start, len(timesteps)):
        t, sigma, sigma_next = timesteps[i], sigmas[i], sigmas[i + 1]
        scale = (sigma ** 2 + 1) ** 0.5
        if s is None:
            init = sigmas.max() if spacing != "leading" else (sigmas.max() ** 2 + 1) ** 0.5
            s = x * (init if noise_start else scale)
        model_input = s / scale
        if i > start and not torch.equal(x, model_input):  # a callback replaced x
            s, model_input = x * scale, x
        out = model(model_input, t)
        x0 = _denoised(out, s.float(), sigma, schedule.prediction_type)
        s = update(s.float(), x0, sigma, sigma_next, out).to(out.dtype)
        x = s / (sigma_next ** 2 + 1) ** 0.5
        if callback is not None:
            callback(i, t, x, x0)
    return x


def euler(model: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int, *,
          spacing: str | None = None, start: int = 0, callback: Callback | None = None,
          generator: torch.Generator | None = None, noise_start: bool = False) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al., Algorithm 1 without churn):

        d = (s - x0) / sigma_i,    s_{i+1} = s + (sigma_{i+1} - sigma_i) d,

    sigma_n = 0, so the last step returns x0. diffusers' grid: linspace (its default) is
    fractional and sigmas are interpolated there. `noise_start`: see _sigma_space_loop.
    Deterministic: `generator` is accepted only so that every sampler shares one signature.
    """
    def update(s, x0, sigma, sigma_next, out):
        derivative = (s - x0) / sigma
        return s + derivative * (sigma_next - sigma)

    return _sigma_space_loop(model, x, schedule, steps, spacing, start, callback, noise_start,
                             update)


def euler_ancestral(model: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int, *,
                    spacing: str | None = None, start: int = 0,
                    callback: Callback | None = None,
                    generator: torch.Generator | None = None,
                    noise_start: bool = False) -> torch.Tensor:
    """Euler ancestral (k-diffusion's sample_euler_ancestral, eta 1): an Euler step down to
    sigma_down, then fresh noise up to sigma_{i+1}:

        sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2),
        sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2),
        s_{i+1} = s + (sigma_down - sigma_i) (s - x0) / sigma_i + sigma_up z.

    z: one `step_noise` per step from `generator`, after the model call (diffusers' order; the
    last step draws too, with sigma_up = 0). `noise_start`: see _sigma_space_loop.
    """
    def update(s, x0, sigma, sigma_next, out):
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        derivative = (s - x0) / sigma
        s = s + derivative * (sigma_down - sigma)
        return s + step_noise(out, generator) * sigma_up

    return _sigma_space_loop(model, x, schedule, steps, spacing, start, callback, noise_start,
                             update)
