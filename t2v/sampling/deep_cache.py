"""DeepCache (Ma et al., CVPR 2024, arXiv 2312.00858): reuse the UNet's deep features across
neighbouring denoising steps. Opt-in: `cache_interval=N` (`--cache-interval N`).

The UNet's output at one step changes little from the previous step in its deep,
low-resolution part; its highest-resolution skip branches carry what changes. So every N-th
UNet call is a full call that also keeps `features`, the input of one layer of the last up
block; the N - 1 calls between recompute only the skip branch `branch` (B, `cache_branch`):

    conv_in -> transformer_in -> the first B layers of down block 0
            -> the last B + 1 layers of the last up block, from the kept features -> conv_out

(a layer: ResBlock, temporal conv, spatial and temporal transformer). B = 0, the default,
is the shallowest branch (the only skip recomputed is conv_in's output; the branch the
authors' code defaults to); B = layers per block (2 for ms-1.7b) recomputes all of the first down
block and the last up block, the form t2v had before 2026-12-02.

`deep_cached(unet, cache)` is the UNet call that does this (t2v.sampling.unet_call picks it):
it runs UNet3D's blocks, FreeU's factors applied as `with_freeu` applies them. With N = 1
every call is full and the output is the plain UNet's; a reused call on the same inputs as the
full call before it gives the full output exactly (tests/test_deep_cache.py). It is an approximation otherwise: its cost
in prompt-following accuracy is measured on the demo model (`python -m t2v.demo.quality_grid`), its
speed by `python -m t2v.bench.deep_cache`.

A cache belongs to one sequence of UNet calls on latents of one shape: the pipeline makes one
per run, resets it at each FreeInit pass, and refuses it with windowed sampling (each window
would need its own cache) and with guidance_parallel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from t2v.errors import UserError
from t2v.models.unet import UNet3D
from t2v.sampling.freeu import FreeU, up_layers, up_path

DEFAULT_BRANCH = 0  # the shallowest branch (the authors' default); GenerationOptions uses it


@dataclass
class DeepCache:
    interval: int  # a full UNet call every `interval` calls; 1: always full (no caching)
    # The skip branch the shallow calls recompute: the first `branch` layers of down block 0
    # and the last branch + 1 layers of the last up block (0: the shallowest).
    branch: int = DEFAULT_BRANCH
    calls: int = 0  # UNet calls so far
    full_calls: int = 0
    features: torch.Tensor | None = field(default=None, repr=False)
    key: tuple | None = None  # what the features were computed for (the call's input)

    def __post_init__(self):
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) \
                or self.interval < 1:
            raise UserError(f"cache_interval must be an integer >= 1 (1: off), got "
                            f"{self.interval!r}")
        if isinstance(self.branch, bool) or not isinstance(self.branch, int) or self.branch < 0:
            raise UserError(f"cache_branch must be an integer >= 0, got {self.branch!r}")

    def check_branch(self, layers: int) -> None:
        """The UNet's first block has `layers` layers: branches 0 .. layers."""
        if self.branch > layers:
            raise UserError(f"cache_branch must be between 0 and {layers} (the layers of the "
                            f"UNet's first block), got {self.branch}")

    def reuse(self, key: tuple) -> bool:
        """Whether this call may run shallow: not a refresh call, and features kept for the
        same `key` (shape, frames, dtype, device of the input). Counts the call."""
        due = self.calls % self.interval == 0
        self.calls += 1
        ok = not due and self.features is not None and self.key == key
        self.full_calls += not ok
        return ok

    def keep(self, features: torch.Tensor, key: tuple) -> None:
        self.features, self.key = features, key

    def reset(self) -> None:
        """Start over (a new sampling pass): the next call is full."""
        self.calls, self.features, self.key = 0, None, None


def deep_cached(unet: UNet3D, cache: DeepCache, frame_chunk: int | None = None,
                freeu: FreeU | None = None, timestep_cond: torch.Tensor | None = None
                ) -> Callable[[torch.Tensor, torch.Tensor | int, torch.Tensor], torch.Tensor]:
    """eps(x, t, context): `unet(x, t, context, frame_chunk)` through `cache`. A full call runs
    every block and keeps the input of the last up block's layer n - 1 - branch; a shallow
    call (cache.reuse) runs the first `branch` layers of down block 0, then that up block's
    last branch + 1 layers from the kept features. `freeu`: FreeU's factors in its up blocks,
    on both paths. `timestep_cond`: (1, D), the guidance-scale embedding for every sample."""
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    cache.check_branch(len(first.resnets))
    stage, n = len(unet.up_blocks) - 1, len(last.resnets)
    start = n - 1 - cache.branch  # the last up block's first recomputed layer

    def full(h, emb, context, num_frames):
        """(the input of layer `start` of the last up block, the skips it takes)."""
        h, skips = unet.down_path(h, emb, context, num_frames, frame_chunk)
        h, skips = up_path(unet, freeu, h, skips, emb, context, num_frames, frame_chunk,
                           blocks=stage)
        return up_layers(last, stage, freeu, h, skips, emb, context, num_frames, frame_chunk,
                         range(start)), skips

    def shallow(h, emb, context, num_frames):
        skips = [h]
        for i in range(cache.branch):
            h = first.layer(i, h, emb, context, num_frames, frame_chunk)
            skips.append(h)
        return cache.features, skips

    def call(x: torch.Tensor, t: torch.Tensor | int, context: torch.Tensor) -> torch.Tensor:
        cond = None if timestep_cond is None else timestep_cond.expand(x.shape[0], -1)
        h, emb = unet.prepare(x, t, context, frame_chunk, cond)
        num_frames = x.shape[2]
        key = (tuple(h.shape), num_frames, h.dtype, h.device)
        if cache.reuse(key):
            h, skips = shallow(h, emb, context, num_frames)
        else:
            h, skips = full(h, emb, context, num_frames)
            cache.keep(h, key)
        h = up_layers(last, stage, freeu, h, skips, emb, context, num_frames, frame_chunk,
                      range(start, n))
        return unet.output(last.upsample(h), x.shape[0])

    return call
