"""DeepCache (Ma et al., CVPR 2024, arXiv 2312.00858): reuse the UNet's deep features across
neighbouring denoising steps. Opt-in: `cache_interval=N` (`--cache-interval N`).

The UNet's output at one step changes little from the previous step in its deep,
low-resolution part; its highest-resolution skip branch carries what changes. So every N-th
UNet call is a full call that also keeps `features`, the input of the last up block (the
highest resolution, after the deeper blocks and the upsample); the N - 1 calls between run only

    conv_in -> transformer_in -> the layers of down block 0 (not its downsampler)
            -> the last up block on [kept features, the fresh skips] -> conv_out

t2v.unet.UNet3D.forward does this when given a DeepCache. With N = 1 every call is full and the
output is the plain UNet's; a reused call on the same inputs as the full call before it gives
the full output exactly (tests/test_deep_cache.py). It is an approximation otherwise: its cost
in prompt-following accuracy is measured on the demo model (`python -m t2v.quality_grid`), its
speed by `python -m t2v.bench.deep_cache`.

A cache belongs to one sequence of UNet calls on latents of one shape: the pipeline makes one
per run, resets it at each FreeInit pass, and refuses it with windowed sampling (each window
would need its own cache) and with guidance_parallel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from t2v.errors import UserError


@dataclass
class DeepCache:
    interval: int  # a full UNet call every `interval` calls; 1: always full (no caching)
    calls: int = 0  # UNet calls so far
    full_calls: int = 0
    features: torch.Tensor | None = field(default=None, repr=False)
    key: tuple | None = None  # what the features were computed for (UNet3D.forward's input)

    def __post_init__(self):
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) \
                or self.interval < 1:
            raise UserError(f"cache_interval must be an integer >= 1 (1: off), got "
                            f"{self.interval!r}")

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
