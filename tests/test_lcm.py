"""The LCM sampler (t2v.sampling.lcm): step-exact against diffusers' LCMScheduler at several
step counts, both predictions, zero terminal SNR, custom original_inference_steps and
timestep_scaling; T2V-Turbo's timestep rule; exact on an analytic denoiser."""

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler

from helpers import max_rel_diff
from t2v.config import ScheduleConfig
from t2v.errors import ConfigError
from t2v.pipeline.options import GenerationOptions, LCMOptions
from t2v.sampling.lcm import boundary_scalings, lcm, lcm_timesteps
from t2v.sampling.samplers import SAMPLERS, sampler_options, sampler_timesteps
from t2v.sampling.schedule import add_noise, noise_schedule, velocity, x0_to_eps

STATE_TOL = 1e-6  # every intermediate sample vs diffusers, relative to its max magnitude
ANALYTIC_TOL = 1e-5  # as tests/test_samplers.py: x0 from eps amplifies rounding by 1/sqrt(a)


def toy_model(x, t):
    """A deterministic, nonlinear stand-in for the UNet."""
    return torch.tanh(0.7 * x + 0.001 * t) + 0.1 * torch.sin(3 * x)


def run_diffusers(scheduler, steps, x, original_steps, seed):
    """diffusers' loop, frames folded into the batch around `scheduler.step` as its video
    pipelines do; the step's noise from a generator seeded `seed`."""
    scheduler.set_timesteps(steps, original_inference_steps=original_steps)
    generator = torch.Generator().manual_seed(seed)
    states, denoised, seen = [], [], []
    b, c, f, h, w = x.shape
    fold = lambda y: y.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # noqa: E731
    unfold = lambda y: y.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)  # noqa: E731
    for t in scheduler.timesteps:
        out = toy_model(x, int(t))
        step = scheduler.step(fold(out), t, fold(x), generator=generator)
        x = unfold(step.prev_sample)
        states.append(x)
        denoised.append(unfold(step.denoised))
        seen.append(int(t))
    return seen, states, denoised


@pytest.mark.parametrize("prediction, zero_snr", [("epsilon", False), ("v_prediction", False),
                                                  ("v_prediction", True)])
@pytest.mark.parametrize("steps, original_steps", [(1, 50), (2, 50), (4, 50), (8, 50),
                                                   (3, 100), (25, 50), (50, 50)])
def test_lcm_matches_diffusers(steps, original_steps, prediction, zero_snr):
    cfg = ScheduleConfig(prediction_type=prediction, rescale_betas_zero_snr=zero_snr)
    reference = LCMScheduler(prediction_type=prediction, rescale_betas_zero_snr=zero_snr)
    x = torch.randn(2, 4, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    seen, states, denoised = run_diffusers(reference, steps, x, original_steps, seed=5)
    ours_states, ours_denoised, ours_seen = [], [], []
    final = lcm(toy_model, x, noise_schedule(cfg), steps, original_steps=original_steps,
                generator=torch.Generator().manual_seed(5),
                callback=lambda i, t, xi, d: (ours_states.append(xi), ours_denoised.append(d),
                                              ours_seen.append(t)))
    assert ours_seen == seen
    assert max(max_rel_diff(a, b) for a, b in zip(ours_states, states)) <= STATE_TOL
    assert max(max_rel_diff(a, b) for a, b in zip(ours_denoised, denoised)) <= STATE_TOL
    assert torch.equal(final, ours_states[-1]) and torch.equal(final, ours_denoised[-1])


@pytest.mark.parametrize("scaling", [10.0, 1.0])
def test_boundary_scalings_match_diffusers(scaling):
    reference = LCMScheduler(timestep_scaling=scaling)
    for t in (0, 1, 19, 259, 999):
        c_skip, c_out = boundary_scalings(t, scaling)
        ref_skip, ref_out = reference.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert float(c_skip) == pytest.approx(float(ref_skip), rel=1e-6, abs=1e-12)
        assert float(c_out) == pytest.approx(float(ref_out), rel=1e-6)
    assert boundary_scalings(0, scaling) == (1.0, 0.0)  # the boundary condition: f(x, 0) = x


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 8, 16, 50])
@pytest.mark.parametrize("original_steps", [50, 100, 1000])
def test_lcm_timesteps_match_diffusers_set_timesteps(steps, original_steps):
    reference = LCMScheduler()
    reference.set_timesteps(steps, original_inference_steps=original_steps)
    assert lcm_timesteps(steps, original_steps) == reference.timesteps.tolist()
    assert sampler_timesteps("lcm", steps, noise_schedule(ScheduleConfig()),
                             lcm_original_steps=original_steps) == reference.timesteps.tolist()


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_stride_rule_is_t2v_turbos(steps):
    """T2V-Turbo's T2VTurboScheduler.set_timesteps (scheduler/t2v_turbo_scheduler.py),
    written from its code: every (50 // steps)-th point of the 50-step grid, from 999."""
    c = 1000 // 50
    grid = np.asarray(list(range(1, 50 + 1))) * c - 1
    expected = grid[::-(len(grid) // steps)][:steps].tolist()
    assert lcm_timesteps(steps, 50, rule="stride") == expected
    assert lcm_timesteps(4, 50, rule="stride") == [999, 759, 519, 279]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_is_exact_on_an_analytic_denoiser(steps, prediction):
    """When the data is one point x0*, every step's denoised estimate is x0* up to c_skip's
    share of x_t (c_skip(t) x_t + c_out(t) x0*), and the run ends on it."""
    g = torch.Generator().manual_seed(1)
    x0_star = torch.randn(1, 4, 2, 3, 3, generator=g)
    schedule = noise_schedule(ScheduleConfig(prediction_type=prediction))
    ts = lcm_timesteps(steps)

    def model(x, t):
        a = schedule.alphas_cumprod[t]
        eps = x0_to_eps(x, x0_star, a)
        return eps if prediction == "epsilon" else velocity(x0_star, eps, a)

    x = add_noise(x0_star, torch.randn(x0_star.shape, generator=g), schedule.alphas_cumprod[ts[0]])
    seen = []

    def check(i, t, xi, denoised):
        seen.append(t)
        c_skip, c_out = boundary_scalings(t)
        assert max_rel_diff(denoised, c_out * x0_star + c_skip * previous[0]) <= ANALYTIC_TOL
        previous[0] = xi

    previous = [x]
    final = lcm(model, x, schedule, steps, callback=check,
                generator=torch.Generator().manual_seed(2))
    assert seen == ts
    c_skip, c_out = boundary_scalings(ts[-1])
    assert float(c_skip) < 1e-6
    assert max_rel_diff(final, x0_star) <= 1e-5


def test_lcm_options_and_refusals():
    assert "lcm" in SAMPLERS
    assert sampler_options("lcm", lcm_original_steps=40, lcm_rule="stride") == \
        {"original_steps": 40, "rule": "stride"}
    with pytest.raises(ConfigError, match="original_steps"):
        lcm_timesteps(51, 50)
    with pytest.raises(ConfigError, match="rule"):
        lcm_timesteps(4, 50, rule="linspace")
    with pytest.raises(ConfigError, match="sample.steps"):
        GenerationOptions(sampler="lcm", steps=60)
    with pytest.raises(ConfigError, match="sample.lcm.timesteps"):
        LCMOptions(timesteps="odd")
    with pytest.raises(ConfigError, match="lcm sampler does not take"):
        GenerationOptions(sampler="lcm", steps=4, init_video="v.mp4")
    with pytest.raises(ConfigError, match="eta"):
        GenerationOptions(sampler="lcm", steps=4, eta=0.5)
