"""Samplers: step-exact against diffusers' schedulers and ModelScope's DDIM loop, and exact on
an analytic denoiser."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from helpers import max_rel_diff
from reference import modelscope_module
from t2v.config import TIMESTEP_SPACINGS, ScheduleConfig
from t2v.errors import ConfigError
from t2v.sampling.samplers import SAMPLERS, ddim, dpm_solver, first_alpha_cumprod, first_timestep
from t2v.sampling.schedule import (add_noise, ddim_timesteps, dpm_timesteps, eps_to_x0,
                          noise_schedule, sigmas_at, v_to_eps, v_to_x0, velocity, x0_to_eps)

STATE_TOL = 1e-6  # every intermediate sample vs diffusers, relative to its max magnitude
# ModelScope keeps the schedule in float64, diffusers and t2v in float32 (docs/architecture.md).
MODELSCOPE_TOL = 1e-5
# Analytic denoiser: x0 = (x - sqrt(1 - a) eps) / sqrt(a) amplifies float32 rounding by up to
# 1 / sqrt(a_999) ~ 15 at the noisiest step.
ANALYTIC_TOL = 1e-5

STEP_COUNTS = [1, 2, 3, 10, 14, 15, 20, 25, 50]
SPACINGS = list(TIMESTEP_SPACINGS)
PREDICTIONS = ["epsilon", "v_prediction"]

# scheduler/scheduler_config.json of ali-vilab/text-to-video-ms-1.7b (docs/architecture.md).
HUB_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.15.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}


def toy_model(x, t):
    """A deterministic, nonlinear stand-in for the UNet."""
    return torch.tanh(0.7 * x + 0.001 * t) + 0.1 * torch.sin(3 * x)


def start_noise(seed=0):
    return torch.randn(2, 4, 3, 5, 6, generator=torch.Generator().manual_seed(seed))


def run_diffusers(scheduler, steps, x, start=0, **step_kwargs):
    """The diffusers pipeline's loop: fold frames into the batch around `scheduler.step`."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[start:]
    if start and hasattr(scheduler, "set_begin_index"):  # as VideoToVideoSDPipeline does
        scheduler.set_begin_index(start)
    states, seen = [], []
    for t in timesteps:
        out = toy_model(x, int(t))
        b, c, f, h, w = x.shape
        fold = lambda y: y.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # noqa: E731
        x = scheduler.step(fold(out), t, fold(x), **step_kwargs).prev_sample
        x = x.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
        states.append(x)
        seen.append(int(t))
    return seen, states


def run_ours(sampler, schedule, steps, x, **options):
    states, seen = [], []
    sampler(toy_model, x, schedule, steps,
            callback=lambda i, t, xi, x0: (states.append(xi), seen.append(t)), **options)
    return seen, states


def compare(ours, reference):
    (ts_ours, xs_ours), (ts_ref, xs_ref) = ours, reference
    assert ts_ours == ts_ref
    assert len(xs_ours) == len(xs_ref)
    return max(max_rel_diff(a, b) for a, b in zip(xs_ours, xs_ref))


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_ddim_matches_diffusers(steps, spacing, prediction):
    config = {**HUB_SCHEDULER, "timestep_spacing": spacing, "prediction_type": prediction}
    schedule = noise_schedule(ScheduleConfig(prediction_type=prediction))
    worst = 0.0
    for eta in (0.0, 0.7):
        reference = run_diffusers(DDIMScheduler.from_config(config), steps, start_noise(),
                                  eta=eta, generator=torch.Generator().manual_seed(3))
        ours = run_ours(ddim, schedule, steps, start_noise(), spacing=spacing, eta=eta,
                        generator=torch.Generator().manual_seed(3))
        worst = max(worst, compare(ours, reference))
    print(f"[parity] DDIM vs diffusers, {steps} steps {spacing} {prediction}: {worst:.2e}")
    assert worst <= STATE_TOL


def test_ddim_hub_default_timesteps():
    """The hub config implies 'leading' spacing with steps_offset 1: 981, 961, ..., 1."""
    scheduler = DDIMScheduler.from_config(HUB_SCHEDULER)
    scheduler.set_timesteps(50)
    ours = ddim_timesteps(50, "leading", 1000, 1)
    assert ours == scheduler.timesteps.tolist() and ours[0] == 981 and ours[-1] == 1


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_dpm_solver_matches_diffusers(steps, spacing, prediction):
    """DPM-Solver built from the hub's DDIM config, as users do (`from_config`)."""
    ddim_config = DDIMScheduler.from_config(HUB_SCHEDULER).config
    schedule = noise_schedule(ScheduleConfig(prediction_type=prediction))
    worst = 0.0
    for algorithm in ("dpmsolver++", "dpmsolver"):
        for order in (1, 2, 3):
            for lower_order_final in (True, False):
                final = "zero" if algorithm == "dpmsolver++" else "sigma_min"
                reference = DPMSolverMultistepScheduler.from_config(
                    ddim_config, timestep_spacing=spacing, prediction_type=prediction,
                    solver_order=order, algorithm_type=algorithm,
                    lower_order_final=lower_order_final, final_sigmas_type=final)
                ours = run_ours(dpm_solver, schedule, steps, start_noise(), spacing=spacing,
                                order=order, algorithm=algorithm,
                                lower_order_final=lower_order_final)
                worst = max(worst, compare(ours, run_diffusers(reference, steps, start_noise())))
    print(f"[parity] DPM-Solver vs diffusers, {steps} steps {spacing} {prediction}: {worst:.2e}")
    assert worst <= STATE_TOL


@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_pp_to_sigma_min_matches_diffusers(steps):
    ddim_config = DDIMScheduler.from_config(HUB_SCHEDULER).config
    reference = DPMSolverMultistepScheduler.from_config(ddim_config, final_sigmas_type="sigma_min",
                                                        solver_order=3)
    ours = run_ours(dpm_solver, noise_schedule(ScheduleConfig()), steps, start_noise(),
                    order=3, final_sigma="sigma_min")
    assert compare(ours, run_diffusers(reference, steps, start_noise())) <= STATE_TOL


def test_dpm_solver_default_recipe_timesteps():
    """The model card's recipe: DPMSolverMultistepScheduler.from_config(DDIM config), 25 steps:
    'linspace' spacing, 999, 959, ..., 40."""
    reference = DPMSolverMultistepScheduler.from_config(
        DDIMScheduler.from_config(HUB_SCHEDULER).config)
    reference.set_timesteps(25)
    ours = dpm_timesteps(25, "linspace", 1000, 1)
    assert ours == reference.timesteps.tolist() and ours[:2] == [999, 959] and ours[-1] == 40


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++"])
def test_starting_late_matches_diffusers_begin_index(sampler):
    """Video-to-video runs only the last steps (diffusers: timesteps[t_start:] and
    set_begin_index(t_start))."""
    steps, start = 20, 8
    if sampler == "ddim":
        reference = DDIMScheduler.from_config(HUB_SCHEDULER)
    else:
        reference = DPMSolverMultistepScheduler.from_config(
            DDIMScheduler.from_config(HUB_SCHEDULER).config)
    expected = run_diffusers(reference, steps, start_noise(), start=start)
    ours = run_ours(SAMPLERS[sampler], noise_schedule(ScheduleConfig()), steps, start_noise(),
                    start=start)
    assert compare(ours, expected) <= STATE_TOL
    assert first_timestep(sampler, steps, noise_schedule(ScheduleConfig()), start=start) == \
        expected[0][0]


def test_ddim_injected_noise_equals_generator_noise():
    schedule = noise_schedule(ScheduleConfig())
    drawn = run_ours(ddim, schedule, 5, start_noise(), eta=1.0,
                     generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    noise = [torch.randn(2, 3, 4, 5, 6, generator=g).permute(0, 2, 1, 3, 4) for _ in range(5)]
    injected = run_ours(ddim, schedule, 5, start_noise(), eta=1.0, noise=noise)
    assert all(torch.equal(a, b) for a, b in zip(drawn[1], injected[1]))


def test_ddim_matches_modelscope_ddim_sample_loop():
    """ModelScope's GaussianDiffusion.ddim_sample_loop: 50 steps, eta 0, guidance 9 with two
    model calls; ours gets the same guidance as a denoiser wrapper."""
    diffusion = modelscope_module("diffusion")
    betas = diffusion.beta_schedule("linear_sd", 1000, init_beta=0.00085, last_beta=0.012)
    reference = diffusion.GaussianDiffusion(betas, mean_type="eps", var_type="fixed_small",
                                            loss_type="mse", rescale_timesteps=False)

    def conditional_model(x, t, y):
        return toy_model(x, t.view(-1, 1, 1, 1, 1).float()) + 0.05 * y

    noise = start_noise()
    cond, uncond = torch.ones(1), torch.zeros(1)
    expected = reference.ddim_sample_loop(noise.clone(), conditional_model,
                                          model_kwargs=[{"y": cond}, {"y": uncond}],
                                          guide_scale=9.0, ddim_timesteps=50, eta=0.0)

    def guided(x, t):
        t = torch.full((x.shape[0],), t)
        u, c = conditional_model(x, t, uncond), conditional_model(x, t, cond)
        return u + 9.0 * (c - u)

    actual = ddim(guided, noise.clone(), noise_schedule(ScheduleConfig()), 50)
    diff = max_rel_diff(actual, expected)
    print(f"[parity] DDIM vs ModelScope ddim_sample_loop: {diff:.2e}")
    assert diff <= MODELSCOPE_TOL


def analytic_model(x0_star, schedule, prediction):
    """The exact denoiser when the data is the single point x0*; at Euler's fractional
    timesteps a = 1 / (sigma^2 + 1) with the interpolated sigma."""
    def model(x, t):
        a = schedule.alphas_cumprod[t] if isinstance(t, int) else \
            1 / (sigmas_at(schedule, [t])[0] ** 2 + 1)
        eps = x0_to_eps(x, x0_star, a)
        return eps if prediction == "epsilon" else velocity(x0_star, eps, a)
    return model


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("steps", [1, 2, 5, 14, 25, 50])
@pytest.mark.parametrize("sampler, options", [
    ("ddim", {}), ("ddim", {"eta": 1.0}), ("dpmsolver++", {"order": 1}),
    ("dpmsolver++", {"order": 2}), ("dpmsolver++", {"order": 3}), ("dpmsolver", {"order": 2}),
    ("dpmsolver", {"order": 3}), ("unipc", {"order": 1}), ("unipc", {"order": 2}),
    ("unipc", {"order": 3}), ("euler", {}), ("euler", {"spacing": "trailing"}), ("euler_a", {}),
    ("sde-dpmsolver++", {"order": 2}), ("sde-dpmsolver++", {"order": 3}),
], ids=["ddim", "ddim-eta1", "dpmpp-1", "dpmpp-2", "dpmpp-3", "dpm-2", "dpm-3", "unipc-1",
        "unipc-2", "unipc-3", "euler", "euler-trailing", "euler_a", "sde-2", "sde-3"])
def test_exact_on_analytic_denoiser(sampler, options, steps, prediction):
    """Every prediction of x0 is x0*, and the sampler ends on x0* when its last noise level is 0
    (DDIM with set_alpha_to_one, DPM-Solver++ (ODE and SDE: whatever noise it draws), UniPC,
    Euler (ancestral)), else on the analytic state at sigma_min."""
    g = torch.Generator().manual_seed(1)
    x0_star = torch.randn(1, 4, 2, 3, 3, generator=g)
    z = torch.randn(1, 4, 2, 3, 3, generator=g)
    schedule = noise_schedule(ScheduleConfig(prediction_type=prediction,
                                             set_alpha_to_one=sampler == "ddim"))
    spacing = options.pop("spacing", None)
    x_start = add_noise(x0_star, z, first_alpha_cumprod(sampler, steps, schedule, spacing))
    predictions = []
    final = SAMPLERS[sampler](analytic_model(x0_star, schedule, prediction), x_start, schedule,
                              steps, spacing=spacing,
                              callback=lambda i, t, x, x0: predictions.append(x0),
                              generator=torch.Generator().manual_seed(2), **options)
    assert len(predictions) == steps
    assert max(max_rel_diff(p, x0_star) for p in predictions) <= ANALYTIC_TOL
    if sampler == "dpmsolver":  # lands on sigma_min, i.e. timestep 0
        expected = x0_star if options.get("eta") else add_noise(x0_star, z,
                                                                schedule.alphas_cumprod[0])
    else:
        expected = x0_star
    assert max_rel_diff(final, expected) <= ANALYTIC_TOL


def test_hub_ddim_ends_at_alpha_zero_on_analytic_denoiser():
    """With the hub's set_alpha_to_one=false DDIM's last step lands on a_prev = a_0, so the
    deterministic sampler returns sqrt(a_0) x0* + sqrt(1 - a_0) z, not x0*."""
    schedule = noise_schedule(ScheduleConfig())
    g = torch.Generator().manual_seed(1)
    x0_star, z = torch.randn(1, 4, 1, 2, 2, generator=g), torch.randn(1, 4, 1, 2, 2, generator=g)
    x = add_noise(x0_star, z, schedule.alphas_cumprod[981])
    final = ddim(analytic_model(x0_star, schedule, "epsilon"), x, schedule, 50)
    assert max_rel_diff(final, add_noise(x0_star, z, schedule.alphas_cumprod[0])) <= ANALYTIC_TOL


def test_prediction_conversions_are_consistent():
    schedule = noise_schedule(ScheduleConfig())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    for t in (0, 500, 999):
        a = schedule.alphas_cumprod[t]
        x = add_noise(x0, eps, a)
        v = velocity(x0, eps, a)
        assert torch.allclose(eps_to_x0(x, eps, a), x0, atol=1e-4)
        assert torch.allclose(x0_to_eps(x, x0, a), eps, atol=1e-4)
        assert torch.allclose(v_to_x0(x, v, a), x0, atol=1e-5)
        assert torch.allclose(v_to_eps(x, v, a), eps, atol=1e-5)


def test_schedule_matches_diffusers_and_modelscope():
    schedule = noise_schedule(ScheduleConfig())
    reference = DDIMScheduler.from_config(HUB_SCHEDULER)
    assert torch.equal(schedule.alphas_cumprod, reference.alphas_cumprod)
    diffusion = modelscope_module("diffusion")
    ms = torch.cumprod(1 - diffusion.beta_schedule("linear_sd", 1000, 0.00085, 0.012), 0)
    assert max_rel_diff(schedule.alphas_cumprod.double(), ms) < 2e-6
    linear = noise_schedule(ScheduleConfig(beta_schedule="linear"))
    reference = DDIMScheduler.from_config({**HUB_SCHEDULER, "beta_schedule": "linear"})
    assert torch.equal(linear.alphas_cumprod, reference.alphas_cumprod)


def test_bad_options_are_refused():
    schedule = noise_schedule(ScheduleConfig())
    with pytest.raises(ConfigError, match="order"):
        dpm_solver(toy_model, start_noise(), schedule, 5, order=4)
    with pytest.raises(ConfigError, match="final_sigma"):
        dpm_solver(toy_model, start_noise(), schedule, 5, algorithm="dpmsolver",
                   final_sigma="zero")
    with pytest.raises(ConfigError, match="steps"):
        ddim(toy_model, start_noise(), schedule, 0)
    with pytest.raises(ConfigError, match="spacing"):
        ddim(toy_model, start_noise(), schedule, 5, spacing="cosine")
    with pytest.raises(ConfigError, match="eta"):
        ddim(toy_model, start_noise(), schedule, 5, eta=-1.0)
