"""FreeU, guidance rescale and FreeInit against diffusers (t2v/sampling/freeu.py, t2v/sampling/guidance.py,
t2v/sampling/freeinit.py); the pipeline-level FreeU parity is in tests/test_pipeline.py."""

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.pipelines.free_init_utils import FreeInitMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from helpers import TINY, assert_parity, inputs, matched_unets
from layouts import HUB_SCHEDULER
from t2v.errors import UserError
from t2v.sampling.freeinit import FreeInit, low_pass_filter, mix_frequencies, reinitialize
from t2v.sampling.freeu import RECOMMENDED, FreeU, low_frequency_scale, with_freeu
from t2v.sampling.guidance import guide
from t2v.sampling.schedule import noise_schedule
from weights_convert.diffusers import schedule_config

UNET_TOL = 1e-5  # fp32 UNet outputs, as the UNet parity tests (tests/helpers.PARITY_TOL)


@pytest.fixture(scope="module")
def unets():
    return matched_unets(TINY, seed=5)


@pytest.mark.parametrize("size", [(8, 8), (12, 16)])  # 4 levels: down to 1x1 and 2x2
@pytest.mark.parametrize("freeu", [RECOMMENDED, FreeU(b1=1.5, b2=1.6, s1=0.9, s2=0.2)])
def test_freeu_unet_matches_diffusers(unets, size, freeu):
    ours, reference = unets
    x, context = inputs(2, 3, size, seed=1)
    reference.enable_freeu(s1=freeu.s1, s2=freeu.s2, b1=freeu.b1, b2=freeu.b2)
    try:
        with torch.no_grad():
            expected = reference(x, 500, context).sample
            actual = with_freeu(ours, freeu)(x, 500, context)
    finally:
        reference.disable_freeu()
    assert_parity(actual, expected, UNET_TOL, f"FreeU UNet {size}")
    with torch.no_grad():
        without = ours(x, 500, context)
    assert (without - actual).abs().max() > 1e-2 * actual.abs().max()  # FreeU did something


def test_skip_filter_scales_only_the_centre_frequencies():
    """Analytic: a constant image is all zero frequency (scaled by s); a checkerboard is all
    Nyquist frequency (untouched)."""
    ones = torch.ones(1, 2, 8, 8)
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 * 2.0 - 1
    assert torch.allclose(low_frequency_scale(ones, 0.3), 0.3 * ones, atol=1e-6)
    assert torch.allclose(low_frequency_scale(checker.expand(1, 2, 8, 8), 0.3), checker,
                          atol=1e-6)


def test_freeu_values_are_checked():
    with pytest.raises(UserError, match="s2 must be > 0"):
        FreeU(1.2, 1.4, 0.9, 0.0)
    with pytest.raises(UserError, match="4 numbers"):
        FreeU.of([1.2, 1.4])
    assert FreeU.of([1.2, 1.4, 0.9, 0.2]) == RECOMMENDED
    assert FreeU.of({"b1": 1.2, "b2": 1.4, "s1": 0.9, "s2": 0.2}) == RECOMMENDED


@pytest.mark.parametrize("rescale", [0.0, 0.3, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(rescale):
    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 2, 4, 3, 5, 5, generator=g)
    expected = rescale_noise_cfg(uncond + 9.0 * (cond - uncond), cond, guidance_rescale=rescale)
    assert_parity(guide(uncond, cond, 9.0, rescale), expected, 1e-6, f"rescale {rescale}")
    # phi = 1: each video's guided output has exactly the conditional output's std
    if rescale == 1.0:
        out = guide(uncond, cond, 9.0, 1.0)
        assert torch.allclose(out.std(dim=(1, 2, 3, 4)), cond.std(dim=(1, 2, 3, 4)), rtol=1e-5)


class ReferenceFreeInit(FreeInitMixin):
    def __init__(self):
        self.scheduler = DDIMScheduler.from_config(HUB_SCHEDULER)


@pytest.mark.parametrize("method", ["butterworth", "gaussian", "ideal"])
@pytest.mark.parametrize("shape, d_s, d_t", [((4, 8, 8), 0.25, 0.25), ((5, 6, 10), 0.4, 0.1),
                                             ((3, 4, 4), 0.0, 0.25)])
def test_freeinit_filter_matches_diffusers(method, shape, d_s, d_t):
    reference = ReferenceFreeInit()
    expected = reference._get_free_init_freq_filter((1, 4, *shape), "cpu", method, 4, d_s, d_t)
    actual = low_pass_filter(*shape, FreeInit(method=method, spatial_stop_frequency=d_s,
                                              temporal_stop_frequency=d_t))
    assert torch.equal(actual.expand(1, 4, *shape), expected)


def test_freeinit_reinitialisation_matches_diffusers():
    """One re-initialisation (the start of pass 1) from the same latents, initial noise and
    generator state."""
    g = torch.Generator().manual_seed(0)
    initial, result = torch.randn(2, 2, 4, 5, 8, 8, generator=g)
    free_init = FreeInit(num_iters=3, method="butterworth", spatial_stop_frequency=0.3)
    reference = ReferenceFreeInit()
    reference.enable_free_init(num_iters=3, method="butterworth", spatial_stop_frequency=0.3)
    reference._free_init_initial_noise = initial.clone()
    expected, _ = reference._apply_free_init(result.clone(), 1, 10, "cpu", torch.float32,
                                             torch.Generator().manual_seed(7))
    schedule = noise_schedule(schedule_config(HUB_SCHEDULER))
    actual = reinitialize(result, initial, schedule.alphas_cumprod, free_init,
                          torch.Generator().manual_seed(7))
    assert_parity(actual, expected, 1e-6, "FreeInit re-initialisation")
    lpf = low_pass_filter(5, 8, 8, free_init)
    assert_parity(mix_frequencies(initial, result, lpf),
                  reference._apply_freq_filter(initial, result, lpf), 1e-6, "frequency mix")


def test_freeinit_mix_keeps_low_frequencies_of_one_and_high_of_the_other():
    """Analytic: with the ideal filter a constant (zero frequency) passes from `low` and a
    checkerboard-in-time (Nyquist) from `high`; the other inputs' parts vanish."""
    f, h, w = 4, 8, 8
    lpf = low_pass_filter(f, h, w, FreeInit(method="ideal"))
    constant = torch.ones(1, 1, f, h, w)
    nyquist = ((torch.arange(f) % 2) * 2.0 - 1).view(1, 1, f, 1, 1).expand(1, 1, f, h, w)
    assert torch.allclose(mix_frequencies(constant + nyquist, 3 * constant + nyquist, lpf),
                          constant + nyquist, atol=1e-5)


def test_fast_sampling_steps():
    fast = FreeInit(num_iters=3, use_fast_sampling=True)
    assert [fast.steps_of_pass(25, k) for k in range(3)] == [8, 16, 25]
    assert [FreeInit(num_iters=3).steps_of_pass(25, k) for k in range(3)] == [25, 25, 25]
    with pytest.raises(UserError, match="method must be one of"):
        FreeInit(method="box")
