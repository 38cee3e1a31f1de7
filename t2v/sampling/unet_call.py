"""The one place a sampler's UNet call is put together from the inference tools that change it.

    eps = unet_call(unet, frame_chunk=8, freeu=RECOMMENDED, deep_cache=DeepCache(3))(x, t, c)

Without FreeU and DeepCache it is the plain `unet(x, t, context, frame_chunk)`; with them, the
wrappers of t2v.sampling.freeu (`with_freeu`) and t2v.sampling.deep_cache (`deep_cached`), which
run UNet3D's blocks themselves. The model stays the reference architecture: nothing is set on
it, so concurrent or nested calls with different tools cannot leak into each other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from t2v.models.unet import UNet3D
from t2v.sampling.deep_cache import DeepCache, deep_cached
from t2v.sampling.freeu import FreeU, with_freeu

UNetCall = Callable[[torch.Tensor, torch.Tensor | int, torch.Tensor], torch.Tensor]


def unet_call(unet: UNet3D, *, frame_chunk: int | None = None, freeu: FreeU | None = None,
              deep_cache: DeepCache | None = None,
              timestep_cond: torch.Tensor | None = None) -> UNetCall:
    """eps(x, t, context) for `unet` with these tools. `frame_chunk`: None, all frames at once;
    n, the UNet's per-frame layers on at most n frames at a time (same results). `freeu`:
    diffusers' FreeU factors. `deep_cache`: DeepCache's state, shared by the calls of one
    sampling pass (it combines with FreeU as the full UNet would: FreeU acts in both paths).
    `timestep_cond`: (1, time_cond_proj_dim), the guidance-scale embedding of a model that
    has one, given to every sample of each call."""
    if deep_cache is not None:
        return deep_cached(unet, deep_cache, frame_chunk, freeu, timestep_cond)
    if freeu is not None:
        return with_freeu(unet, freeu, frame_chunk, timestep_cond)
    if timestep_cond is None:
        return lambda x, t, c: unet(x, t, c, frame_chunk)
    return lambda x, t, c: unet(x, t, c, frame_chunk, expand_cond(timestep_cond, x))


def expand_cond(timestep_cond: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The (1, D) condition for every sample of x."""
    return None if timestep_cond is None else timestep_cond.expand(x.shape[0], -1)
