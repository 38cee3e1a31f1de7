"""Gaussian noise, drawn in one place.

Every draw goes through `randn`: on the generator's device (a CPU generator gives the same
numbers whatever device the model runs on, as diffusers' `randn_tensor` does), then moved to
`device` and cast to `dtype`. Initial latents, the stochastic samplers' step noise, VAE
posterior samples, video-to-video noise and the trainer's noise all use it; `step_noise` draws
the stochastic samplers' noise in diffusers' video pipeline order.
"""

from __future__ import annotations

import torch


def randn(shape, generator: torch.Generator | list[torch.Generator] | None = None,
          device: str | torch.device | None = None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, I) of `shape` from `generator` (the global RNG if None), on `device` (default: where
    it was drawn). A list of generators, one per entry of the first axis, draws each entry
    from its own generator (diffusers' randn_tensor does the same)."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    drawn_on = generator.device if generator is not None else torch.device(device or "cpu")
    noise = torch.randn(tuple(shape), generator=generator, device=drawn_on, dtype=dtype)
    return noise if device is None else noise.to(device)


def step_noise(x: torch.Tensor, generator: torch.Generator | None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Noise for one stochastic sampler step, shaped like `x`, drawn in diffusers' pipeline
    order: the pipeline folds video latents to ((b f), c, h, w) before `scheduler.step`, so a
    5-D (B, C, F, H, W) sample gets randn(B, F, C, H, W) permuted; on the generator's device,
    then moved; in `dtype` (default x's: diffusers draws in the model output's dtype, except
    the SDE DPM-Solver, float32)."""
    dtype = dtype or x.dtype
    if x.ndim == 5:
        b, c, f, h, w = x.shape
        return randn((b, f, c, h, w), generator, x.device, dtype).permute(0, 2, 1, 3, 4)
    return randn(x.shape, generator, x.device, dtype)
