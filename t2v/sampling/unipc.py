"""UniPC (Zhao et al. 2023, arXiv:2302.04867), multistep predictor-corrector, as diffusers'
UniPCMultistepScheduler with its defaults: data prediction (predict_x0), B(h) = e^h - 1
("bh2"), orders 1-3. Shared signature and contract: t2v.sampling.samplers.

With sigma = sqrt((1 - a) / a), alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t,
lambda = log alpha_t - log sigma_t, h = lambda_next - lambda_now, and m_k the x0 predictions
(m_0 the newest), one update of order p from x at s0 to t is

    x_t = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) m_0 - alpha_t B(h) sum_k rho_k D_k,
    D_k = (m_k - m_0) / r_k,   r_k = (lambda_{s_k} - lambda_s0) / h,

with rho solving R rho = b, R_{jk} = r_k^j, b_j = (j+1)! phi_{j+1}(-h) / B(h) (the UniP
predictor uses the first p - 1 equations; rho = 1/2 for p = 2). The UniC corrector redoes the
last step once the model has seen its result, adding r = 1 and D = m_new - m_0 (rho = 1/2 for
p = 1). The model is evaluated only at predictor outputs; the corrected sample feeds the next
predictor, so each step costs one model call.
"""

from __future__ import annotations

from typing import Sequence

import torch

from t2v.errors import ConfigError
from t2v.sampling.schedule import (
    Callback,
    Denoiser,
    NoiseSchedule,
    dpm_timesteps,
    dynamic_threshold,
    sigmas_at,
)


def unipc(model: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int, *,
          spacing: str | None = None, start: int = 0, callback: Callback | None = None,
          generator: torch.Generator | None = None, order: int = 2,
          lower_order_final: bool = True, disable_corrector: Sequence[int] = (),
          final_sigma: str = "zero", thresholding: bool = False,
          dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0
          ) -> torch.Tensor:
    """UniPC-p with bh2, p = `order`: the first step is first order, each later one uses one
    more past prediction up to `order`; with `lower_order_final` the order is capped by the
    steps left (any step count, unlike DPM-Solver's < 15 rule). The corrector runs at every
    step after the first of a run except those whose previous step index is in
    `disable_corrector` (diffusers' list). `final_sigma`: "zero" (default; the last step lands
    on x0) or "sigma_min" (required without `lower_order_final` for orders 2-3).
    `thresholding`: dynamic thresholding of each x0 prediction.
    Deterministic: `generator` is accepted only so that every sampler shares one signature.
    """
    if order not in (1, 2, 3):
        raise ConfigError(f"UniPC order must be 1, 2 or 3, got {order}")
    if final_sigma not in ("zero", "sigma_min"):
        raise ConfigError(f"final_sigma must be 'zero' or 'sigma_min', got {final_sigma!r}")
    if order > 1 and not lower_order_final and final_sigma == "zero":
        # r_k = 0 at a last step to sigma 0: diffusers returns NaN (order 2) or fails (3).
        raise ConfigError("UniPC without lower_order_final needs final_sigma='sigma_min' "
                          "(a multistep update to sigma 0 is degenerate)")
    timesteps = dpm_timesteps(steps, spacing or "linspace", schedule.num_train_timesteps,
                              schedule.steps_offset)  # UniPC's grids are DPM-Solver's
    sigmas = sigmas_at(schedule, timesteps, final_sigma)

    def alpha_sigma_lambda(i: int):
        alpha = 1 / ((sigmas[i] ** 2 + 1) ** 0.5)
        sigma = sigmas[i] * alpha
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def update(x: torch.Tensor, history: list[torch.Tensor], s0: int, t: int, p: int,
               m_new: torch.Tensor | None = None) -> torch.Tensor:
        """One UniP step (m_new None) or UniC correction (m_new: the prediction at t) of
        order p from x at sigma index s0 to t; history[-1 - k] sits at index s0 - k."""
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(t)
        alpha_s0, sigma_s0, lambda_s0 = alpha_sigma_lambda(s0)
        h = lambda_t - lambda_s0
        m0 = history[-1]
        rks, d1s = [], []
        for k in range(1, p):
            rk = (alpha_sigma_lambda(s0 - k)[2] - lambda_s0) / h
            rks.append(rk)
            d1s.append((history[-1 - k] - m0) / rk)
        rks.append(torch.ones(()))
        rks = torch.stack(rks)
        hh = -h  # data prediction
        h_phi_1 = torch.expm1(hh)  # e^{-h} - 1
        h_phi_k = h_phi_1 / hh - 1
        b_h = torch.expm1(hh)  # bh2
        factorial = 1
        rows, b = [], []
        for k in range(1, p + 1):
            rows.append(torch.pow(rks, k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        rows, b = torch.stack(rows), torch.stack(b)
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if m_new is None:  # predictor
            if not d1s:
                return x_t.to(x.dtype)
            rhos = (torch.full((1,), 0.5, dtype=x.dtype, device=x.device) if p == 2 else
                    torch.linalg.solve(rows[:-1, :-1], b[:-1]).to(x.device, x.dtype))
            res = torch.einsum("k,bkc...->bc...", rhos, torch.stack(d1s, dim=1))
            return (x_t - alpha_t * b_h * res).to(x.dtype)
        rhos = (torch.full((1,), 0.5, dtype=x.dtype, device=x.device) if p == 1 else
                torch.linalg.solve(rows, b).to(x.device, x.dtype))
        res = torch.einsum("k,bkc...->bc...", rhos[:-1], torch.stack(d1s, dim=1)) if d1s else 0
        return (x_t - alpha_t * b_h * (res + rhos[-1] * (m_new - m0))).to(x.dtype)

    n = len(timesteps)
    history: list[torch.Tensor] = []  # x0 predictions, oldest first, at most `order`
    step_order, last_sample = 0, x  # the order and start of the last predictor step
    for k, i in enumerate(range(start, n)):
        t = timesteps[i]
        out = model(x, t)
        alpha, sigma, _ = alpha_sigma_lambda(i)
        if schedule.prediction_type == "epsilon":
            x0 = (x - sigma * out) / alpha
        elif schedule.prediction_type == "v_prediction":
            x0 = alpha * x - sigma * out
        else:
            raise ConfigError(f"prediction type {schedule.prediction_type!r} is not supported")
        if thresholding:
            x0 = dynamic_threshold(x0, dynamic_thresholding_ratio, sample_max_value)
        if k > 0 and i - 1 not in disable_corrector:  # UniC on the last predictor step
            x = update(last_sample, history, i - 1, i, step_order, m_new=x0)
        history = (history + [x0])[-order:]
        step_order = min(order, n - i) if lower_order_final else order
        step_order = min(step_order, k + 1)  # warm-up: one more past prediction per step
        last_sample = x
        x = update(x, history, i, i + 1, step_order)
        if callback is not None:
            callback(i, t, x, x0)
    return x
