"""UniPC, Euler, Euler ancestral and SDE-DPM-Solver++; zero terminal SNR and dynamic
thresholding for every sampler that has them: step-exact against diffusers' schedulers (built
from the hub's DDIM config, as users build them). The analytic-denoiser test covering every
sampler is in tests/test_samplers.py; the pipeline-level parity in tests/test_pipeline.py."""

import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as reference_rescale

from helpers import diffusers_scheduler, max_rel_diff
from t2v.config import TIMESTEP_SPACINGS, ScheduleConfig
from t2v.pipeline.options import GenerationOptions
from t2v.errors import ConfigError
from t2v.sampling.samplers import (SAMPLERS, THRESHOLDING_SAMPLERS, first_alpha_cumprod, first_timestep,
                          sampler_options)
from t2v.sampling.schedule import (ZERO_SNR_ALPHA_CUMPROD, add_noise, betas, dynamic_threshold,
                          noise_schedule, rescale_zero_terminal_snr, sigma_table)
from t2v.sampling.unipc import unipc

# Every intermediate sample vs diffusers, max |diff| relative to max |reference| (as
# tests/test_samplers.py). For Euler, diffusers' sigma-space states s are compared as
# s / sqrt(sigma^2 + 1), the form t2v's samplers pass on.
STATE_TOL = 1e-6
# Analytic denoiser: x0 = (x - sqrt(1 - a) eps) / sqrt(a) amplifies float32 rounding by up to
# 1 / sqrt(a_999) ~ 15 at the noisiest step (as tests/test_samplers.py).
ANALYTIC_TOL = 1e-5

STEP_COUNTS = [1, 2, 3, 10, 14, 15, 25, 50]
SPACINGS = list(TIMESTEP_SPACINGS)
PREDICTIONS = ["epsilon", "v_prediction"]
NEW_SAMPLERS = ["unipc", "euler", "euler_a", "sde-dpmsolver++"]
STOCHASTIC = ("euler_a", "sde-dpmsolver++")


def toy_model(x, t):
    """A deterministic, nonlinear stand-in for the UNet (t may be fractional: Euler)."""
    return torch.tanh(0.7 * x + 0.001 * t) + 0.1 * torch.sin(3 * x)


def start_noise(seed=0):
    return torch.randn(2, 4, 3, 5, 6, generator=torch.Generator().manual_seed(seed))


def run_diffusers(scheduler, steps, noise, start=0, x0=None, seed=None, eta=None):
    """diffusers' TextToVideoSDPipeline loop: noise * init_noise_sigma (or, from `start`,
    add_noise(x0) as VideoToVideoSDPipeline), scale_model_input, frames folded into the batch
    around `scheduler.step`. States are returned in t2v's variance-preserving form."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[start:]
    if start:
        scheduler.set_begin_index(start)
    sigma_space = isinstance(scheduler, (EulerDiscreteScheduler,
                                         EulerAncestralDiscreteScheduler))
    if x0 is None:
        x = noise * scheduler.init_noise_sigma
    else:
        x = scheduler.add_noise(x0, noise, timesteps[:1])
    kwargs = {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}
    if eta is not None:  # DDIM
        kwargs["eta"] = eta
    states, seen = [], []
    for k, t in enumerate(timesteps):
        t_value = float(t) if sigma_space else int(t)
        out = toy_model(scheduler.scale_model_input(x, t), t_value)
        b, c, f, h, w = x.shape
        fold = lambda y: y.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # noqa: E731
        x = scheduler.step(fold(out), t, fold(x), **kwargs).prev_sample
        x = x.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
        if sigma_space:  # s -> x_t
            states.append(x / (scheduler.sigmas[start + k + 1] ** 2 + 1) ** 0.5)
        else:
            states.append(x)
        seen.append(t_value)
    return seen, states


def run_ours(sampler, schedule, steps, noise, start=0, x0=None, seed=None, spacing=None,
             **options):
    if x0 is None:
        x = noise
        if sampler in ("euler", "euler_a"):
            options["noise_start"] = True  # as the pipeline passes for text-to-video
    else:
        a = first_alpha_cumprod(sampler, steps, schedule, spacing, start)
        x = add_noise(x0, noise, a)
    if seed is not None:
        options["generator"] = torch.Generator().manual_seed(seed)
    states, seen = [], []
    SAMPLERS[sampler](toy_model, x, schedule, steps, spacing=spacing, start=start,
                      callback=lambda i, t, xi, x0: (states.append(xi), seen.append(t)),
                      **options)
    return seen, states


def compare(ours, reference):
    (ts_ours, xs_ours), (ts_ref, xs_ref) = ours, reference
    assert ts_ours == ts_ref
    assert len(xs_ours) == len(xs_ref)
    assert all(torch.isfinite(x).all() for x in xs_ref + xs_ours)
    return max(max_rel_diff(a, b) for a, b in zip(xs_ours, xs_ref))


def parity(sampler, steps, spacing, prediction, schedule_options=None, seed=None,
           diffusers_options=None, **options):
    """Worst state difference of one run of `sampler` against its diffusers scheduler."""
    schedule_options = schedule_options or {}
    schedule = noise_schedule(ScheduleConfig(prediction_type=prediction, **schedule_options))
    reference = diffusers_scheduler(sampler, timestep_spacing=spacing, prediction_type=prediction,
                                    **schedule_options, **(diffusers_options or {}))
    expected = run_diffusers(reference, steps, start_noise(), seed=seed,
                             eta=options.get("eta"))
    return compare(run_ours(sampler, schedule, steps, start_noise(), seed=seed, spacing=spacing,
                            **options), expected)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("sampler", ["unipc", "sde-dpmsolver++"])
def test_multistep_solvers_match_diffusers(sampler, steps, spacing, prediction):
    """UniPC (bh2, predict_x0) and SDE-DPM-Solver++ (algorithm_type="sde-dpmsolver++"; order
    2 is "DPM++ 2M SDE"; same generator), orders 1-3, with and without lower_order_final."""
    worst = 0.0
    for order in (1, 2, 3):
        for lower_order_final in (True, False):
            # UniPC without lower_order_final must end at sigma_min (test_bad_options...).
            final = "sigma_min" if sampler == "unipc" and not lower_order_final else "zero"
            worst = max(worst, parity(
                sampler, steps, spacing, prediction, seed=3 if sampler in STOCHASTIC else None,
                order=order, lower_order_final=lower_order_final, final_sigma=final,
                diffusers_options=dict(solver_order=order, lower_order_final=lower_order_final,
                                       final_sigmas_type=final)))
    print(f"[parity] {sampler} vs diffusers, {steps} steps {spacing} {prediction}: {worst:.2e}")
    assert worst <= STATE_TOL


@pytest.mark.parametrize("disable_corrector", [[0], [1, 2], [0, 3, 7]])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_disable_corrector_matches_diffusers(order, disable_corrector):
    worst = parity("unipc", 10, "linspace", "epsilon", order=order,
                   disable_corrector=disable_corrector,
                   diffusers_options=dict(solver_order=order,
                                          disable_corrector=disable_corrector))
    assert worst <= STATE_TOL


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_euler_and_euler_ancestral_match_diffusers(steps, spacing, prediction):
    """Same generator, same result: Euler ancestral draws its step noise as diffusers."""
    worst = max(parity("euler", steps, spacing, prediction),
                parity("euler_a", steps, spacing, prediction, seed=3))
    print(f"[parity] Euler(-a) vs diffusers, {steps} steps {spacing} {prediction}: {worst:.2e}")
    assert worst <= STATE_TOL


@pytest.mark.parametrize("sample_max_value", [1.0, 2.5])
@pytest.mark.parametrize("sampler", THRESHOLDING_SAMPLERS)
def test_thresholding_matches_diffusers(sampler, sample_max_value):
    """diffusers' thresholding=True (per frame: its pipeline folds frames into the batch); the
    toy model's x0 predictions exceed the threshold, so the clamp engages."""
    options = dict(thresholding=True, dynamic_thresholding_ratio=0.9,
                   sample_max_value=sample_max_value)
    worst, changed = 0.0, False
    for prediction in PREDICTIONS:
        for steps in (1, 3, 10, 25):
            extra = {"eta": 0.7} if sampler == "ddim" else {}
            seed = 3 if sampler in ("ddim", "sde-dpmsolver++") else None
            worst = max(worst, parity(sampler, steps, "leading", prediction, seed=seed,
                                      diffusers_options=options, **options, **extra))
            schedule = noise_schedule(ScheduleConfig(prediction_type=prediction))
            plain = run_ours(sampler, schedule, steps, start_noise(), seed=seed, **extra)
            thresholded = run_ours(sampler, schedule, steps, start_noise(), seed=seed,
                                   **options, **extra)
            changed |= not torch.equal(plain[1][-1], thresholded[1][-1])
    print(f"[parity] {sampler} thresholding vs diffusers (max {sample_max_value}): {worst:.2e}")
    assert worst <= STATE_TOL and changed


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler", NEW_SAMPLERS)
def test_starting_late_matches_diffusers_video_to_video(sampler, spacing):
    """Video-to-video runs the last steps from the input noised to the first of them:
    diffusers' add_noise at timesteps[start] with set_begin_index(start). first_timestep is
    that timestep (fractional for Euler's linspace grid), first_alpha_cumprod its noise level
    as the scheduler's add_noise applies it."""
    steps, start = 20, 8
    x0 = torch.randn(2, 4, 3, 5, 6, generator=torch.Generator().manual_seed(4))
    seed = 3 if sampler in STOCHASTIC else None
    for prediction in PREDICTIONS:
        schedule = noise_schedule(ScheduleConfig(prediction_type=prediction))
        reference = diffusers_scheduler(sampler, timestep_spacing=spacing,
                                        prediction_type=prediction)
        expected = run_diffusers(reference, steps, start_noise(), start=start, x0=x0, seed=seed)
        ours = run_ours(sampler, schedule, steps, start_noise(), start=start, x0=x0, seed=seed,
                        spacing=spacing)
        diff = compare(ours, expected)
        print(f"[parity] {sampler} from step {start} of {steps}, {spacing} {prediction}: "
              f"{diff:.2e}")
        # The start differs in rounding: sqrt(a) x0 + sqrt(1 - a) eps, a = 1 / (sigma^2 + 1),
        # against diffusers' alpha_t x0 + sigma_t eps (Euler: x0 + sigma eps in sigma space).
        assert diff <= STATE_TOL
        assert first_timestep(sampler, steps, schedule, spacing, start) == expected[0][0]


# -- zero terminal SNR ---------------------------------------------------------------------

ZERO_SNR = {"rescale_betas_zero_snr": True}


def test_zero_snr_schedule_matches_diffusers():
    """Betas as diffusers' rescale_zero_terminal_snr; a_T = 0 exactly where DDIMScheduler keeps
    it, 2**-24 in the sigma-space schedulers (sigma_T = 4096), so each sampler sees the a_T of
    its own diffusers scheduler."""
    cfg = ScheduleConfig(**ZERO_SNR)
    assert torch.equal(rescale_zero_terminal_snr(betas(ScheduleConfig())),
                       reference_rescale(betas(ScheduleConfig())))
    schedule = noise_schedule(cfg)
    ddim = diffusers_scheduler("ddim", **ZERO_SNR)
    assert torch.equal(schedule.alphas_cumprod, ddim.alphas_cumprod)
    assert schedule.alphas_cumprod[-1] == 0 and schedule.alphas_cumprod[0] == \
        noise_schedule(ScheduleConfig()).alphas_cumprod[0]  # a_0 kept
    for sampler in ("dpmsolver++", "unipc", "euler", "euler_a"):
        reference = diffusers_scheduler(sampler, **ZERO_SNR)
        assert reference.alphas_cumprod[-1] == ZERO_SNR_ALPHA_CUMPROD
        ac = reference.alphas_cumprod
        assert torch.equal(sigma_table(schedule), ((1 - ac) / ac) ** 0.5), sampler
    assert sigma_table(schedule)[-1] == pytest.approx(4096.0, rel=1e-6)  # sqrt(2**24 - 1)
    plain = noise_schedule(ScheduleConfig())  # no zero SNR: the table is the plain one
    ac = plain.alphas_cumprod
    assert torch.equal(sigma_table(plain), ((1 - ac) / ac) ** 0.5)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 25, 50])
# lcm has no spacing (its grid is the distillation's): zero SNR in tests/test_lcm.py.
@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "lcm"])
def test_zero_snr_samplers_match_diffusers(sampler, steps, spacing):
    """Every sampler against its scheduler built with rescale_betas_zero_snr=True and
    v_prediction, the way such models are run ("trailing" starts at t = 999, pure noise)."""
    seed = 3 if sampler in STOCHASTIC + ("ddim",) else None
    options = {"eta": 0.7} if sampler == "ddim" else {}
    diff = parity(sampler, steps, spacing, "v_prediction", schedule_options=ZERO_SNR,
                  seed=seed, **options)
    print(f"[parity] {sampler} zero SNR vs diffusers, {steps} steps {spacing}: {diff:.2e}")
    assert diff <= STATE_TOL


def test_zero_snr_config_reaches_the_schedule_and_the_diffusers_config():
    from t2v.pipeline.options import load_config
    from weights_convert.diffusers import diffusers_scheduler_config, schedule_config

    cfg = load_config(None, ["model.schedule.rescale_betas_zero_snr=true",
                             "model.schedule.prediction_type=v_prediction"])
    assert noise_schedule(cfg.model.schedule).alphas_cumprod[-1] == 0
    written = diffusers_scheduler_config(cfg.model.schedule)
    assert written["rescale_betas_zero_snr"] is True
    assert schedule_config(written) == cfg.model.schedule
    assert torch.equal(DDIMScheduler.from_config(written).alphas_cumprod,
                       noise_schedule(cfg.model.schedule).alphas_cumprod)


# -- the other checks ----------------------------------------------------------------------

def test_dynamic_threshold_is_diffusers_threshold_per_frame():
    """diffusers thresholds each image of its batch; its video pipeline folds the frames
    into the batch, so t2v thresholds a (B, C, F, H, W) video frame by frame."""
    x = 3 * torch.randn(2, 4, 3, 5, 6, generator=torch.Generator().manual_seed(2))
    reference = DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9,
                              sample_max_value=2.0)
    folded = x.permute(0, 2, 1, 3, 4).reshape(6, 4, 5, 6)
    expected = reference._threshold_sample(folded).reshape(2, 3, 4, 5, 6).permute(0, 2, 1, 3, 4)
    assert torch.equal(dynamic_threshold(x, 0.9, 2.0), expected)
    assert torch.equal(dynamic_threshold(folded, 0.9, 2.0), reference._threshold_sample(folded))
    assert dynamic_threshold(x, 0.9, 2.0).abs().max() <= 1.0


def test_callback_can_replace_the_euler_sample():
    """The pipeline's callback_on_step_end copies returned latents into the sample it was
    given; the sigma-space samplers continue from the replaced sample (as DDIM/DPM do)."""
    schedule = noise_schedule(ScheduleConfig())
    for sampler in ("euler", "euler_a"):
        def zero_after_first(i, t, x, x0):
            if i == 0:
                x.zero_()
        seen = []
        SAMPLERS[sampler](lambda x, t: seen.append(x.clone()) or toy_model(x, t),
                          start_noise(), schedule, 3, callback=zero_after_first,
                          generator=torch.Generator().manual_seed(0))
        assert torch.equal(seen[1], torch.zeros_like(seen[1]))


def test_bad_options_are_refused():
    schedule = noise_schedule(ScheduleConfig())
    with pytest.raises(ConfigError, match="UniPC order must be 1, 2 or 3"):
        unipc(toy_model, start_noise(), schedule, 5, order=4)
    with pytest.raises(ConfigError, match="needs final_sigma='sigma_min'"):
        unipc(toy_model, start_noise(), schedule, 5, lower_order_final=False)
    with pytest.raises(ConfigError, match="thresholding applies to the ddim, .* samplers only "
                                          r"\(sampler is euler\)"):
        sampler_options("euler", thresholding=True)
    with pytest.raises(ConfigError, match="eta applies to the ddim sampler only"):
        sampler_options("unipc", eta=0.5)
    with pytest.raises(ConfigError, match="dynamic_thresholding_ratio must be in"):
        sampler_options("ddim", thresholding=True, dynamic_thresholding_ratio=1.5)
    with pytest.raises(ConfigError, match="sample_max_value must be >= 1"):
        sampler_options("ddim", thresholding=True, sample_max_value=0.5)
    with pytest.raises(ConfigError, match="sample.thresholding applies to"):
        GenerationOptions(sampler="euler_a", thresholding=True)
    assert sampler_options("unipc", solver_order=3, thresholding=True) == {
        "order": 3, "thresholding": True, "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0}
    assert sampler_options("euler", noise_start=True) == {"noise_start": True}


def test_cli_flags_reach_the_sample_config(capsys):
    from t2v.cli.sample import main, parse

    _, cfg = parse(["--sampler", "unipc", "--thresholding", "--dynamic-thresholding-ratio",
                    "0.9", "--sample-max-value", "2.5", "sample.solver_order=3"])
    s = cfg.sample
    assert (s.sampler, s.thresholding, s.dynamic_thresholding_ratio, s.sample_max_value,
            s.solver_order) == ("unipc", True, 0.9, 2.5, 3)
    assert main(["--sampler", "euler", "--thresholding", "--prompt", "a dog"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sample.thresholding applies to" in err[0]


def test_pipeline_refuses_options_the_sampler_has_not():
    """Before any model runs, one line each (ConfigError is a UserError)."""
    from pathlib import Path

    from t2v.pipeline.options import load_config
    from t2v.errors import UserError
    from t2v.pipeline.text_to_video import TextToVideo

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    pipe = TextToVideo.from_config(load_config(tiny).model, seed=0)
    kwargs = dict(num_frames=1, height=32, width=32, steps=2, progress=False)
    with pytest.raises(UserError, match=r"thresholding applies to .* \(sampler is euler_a\)"):
        pipe("a dog", sampler="euler_a", thresholding=True, **kwargs)
    with pytest.raises(UserError, match=r"eta applies to the ddim sampler only"):
        pipe("a dog", sampler="sde-dpmsolver++", eta=0.5, **kwargs)
    with pytest.raises(UserError, match="sample_max_value must be >= 1"):
        pipe("a dog", sampler="unipc", thresholding=True, sample_max_value=0.0, **kwargs)
