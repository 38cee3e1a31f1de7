"""Gaussian noise, drawn in one place.

Every draw goes through `randn`: on the generator's device (a CPU generator gives the same
numbers whatever device the model runs on, as diffusers' `randn_tensor` does), then moved to
`device` and cast to `dtype`. Initial latents, the stochastic samplers' step noise, VAE
posterior samples, video-to-video noise and the trainer's noise all use it.
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
