"""FreeU (Si et al., CVPR 2024, arXiv 2309.11497): rebalance the UNet's up path at inference.

In the first two up blocks (the two lowest resolutions; `stage` 0 and 1), before each layer
concatenates [x, skip]:

    x[:, :C/2]  *= b          the first half of the backbone channels amplified
    skip         = F^-1( F(skip) * m_s )   the skip's lowest spatial frequencies scaled by s

with F the 2-D FFT of each frame (shifted so the zero frequency is at (H//2, W//2)) and m_s a
mask that is s on the 2 x 2 block [H//2 - 1, H//2 + 1) x [W//2 - 1, W//2 + 1) and 1 elsewhere.
The filter runs in float32 and returns the skip's dtype. Exactly diffusers'
`enable_freeu(s1, s2, b1, b2)` on UNet3DConditionModel (utils.torch_utils.apply_freeu and
fourier_filter); tests/test_sampling_tools.py checks it against the reference.

It is applied by a wrapper, never set on the model: `with_freeu(unet, freeu)` is a function
(x, t, context) -> eps that runs UNet3D's blocks with the factors in the two up blocks
(t2v.sampling.unet_call picks it; DeepCache's calls apply it through `up_layers` alike).

The values diffusers documents for ms-1.7b and zeroscope (from the FreeU authors' video
settings): RECOMMENDED = FreeU(b1=1.2, b2=1.4, s1=0.9, s2=0.2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from t2v.errors import UserError
from t2v.models.unet import UNet3D, UpBlock


@dataclass(frozen=True)
class FreeU:
    b1: float  # backbone scale, stage 1 (the lowest-resolution up block)
    b2: float  # backbone scale, stage 2
    s1: float  # skip low-frequency scale, stage 1
    s2: float  # skip low-frequency scale, stage 2

    def __post_init__(self):
        for name in ("b1", "b2", "s1", "s2"):
            # diffusers silently turns FreeU off when any factor is 0; refuse it instead.
            if not getattr(self, name) > 0:
                raise UserError(f"FreeU {name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def of(cls, value) -> FreeU | None:
        """None, a FreeU, a mapping {b1, b2, s1, s2} or a sequence (b1, b2, s1, s2)."""
        if value is None or isinstance(value, FreeU):
            return value
        if isinstance(value, dict):
            return cls(**value)
        values = tuple(value)
        if len(values) != 4:
            raise UserError(f"FreeU takes 4 numbers (b1, b2, s1, s2), got {len(values)}")
        return cls(*(float(v) for v in values))


RECOMMENDED = FreeU(b1=1.2, b2=1.4, s1=0.9, s2=0.2)


def low_frequency_scale(x: torch.Tensor, scale: float, threshold: int = 1) -> torch.Tensor:
    """x (N, C, H, W) with its centred 2*threshold square of spatial frequencies times scale."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = x.shape[-2:]
    mask = torch.ones((h, w), device=x.device)
    mask[h // 2 - threshold:h // 2 + threshold, w // 2 - threshold:w // 2 + threshold] = scale
    spectrum = torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))
    return torch.fft.ifftn(spectrum, dim=(-2, -1)).real.to(x.dtype)


def acts_on(freeu: FreeU | None, stage: int) -> bool:
    """Whether FreeU changes up block `stage` (0 = the lowest resolution)."""
    return freeu is not None and stage <= 1


def apply(freeu: FreeU | None, stage: int, x: torch.Tensor, skip: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, skip) of up block `stage` (0 = lowest resolution) before they are concatenated."""
    if not acts_on(freeu, stage):
        return x, skip
    b, s = (freeu.b1, freeu.s1) if stage == 0 else (freeu.b2, freeu.s2)
    half = x.shape[1] // 2
    x = torch.cat([x[:, :half] * b, x[:, half:]], dim=1)
    return x, low_frequency_scale(skip, s)


def up_layers(block: UpBlock, stage: int, freeu: FreeU | None, x: torch.Tensor,
              skips: list[torch.Tensor], emb: torch.Tensor, context: torch.Tensor,
              num_frames: int, chunk: int | None, layers: range) -> torch.Tensor:
    """The `layers` of up block `block` (the `stage`-th), FreeU's factors on (x, skip) before
    each: UpBlock.forward's loop without the upsampler. Layer i takes skips[n - 1 - i] (n:
    the block's layers), as in UpBlock.forward."""
    n = len(block.resnets)
    for i in layers:
        x, skip = apply(freeu, stage, x, skips[n - 1 - i])
        x = block.layer_on(i, x, skip, emb, context, num_frames, chunk)
    return x


def up_path(unet: UNet3D, freeu: FreeU | None, h: torch.Tensor, skips: list[torch.Tensor],
            emb: torch.Tensor, context: torch.Tensor, num_frames: int, chunk: int | None,
            blocks: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The first `blocks` up blocks (None: all) from the mid block's output h and the skip
    stack (UNet3D.down_path), FreeU in the blocks it acts on: (h, the skips left)."""
    for stage, block in enumerate(unet.up_blocks[:blocks]):
        block_skips, skips, size = unet.split_skips(skips, block)
        if acts_on(freeu, stage):
            h = up_layers(block, stage, freeu, h, block_skips, emb, context, num_frames, chunk,
                          range(len(block.resnets)))
            h = block.upsample(h, size)
        else:
            h = unet.run_block(block, h, block_skips, emb, context, num_frames, size, chunk)
    return h, skips


def with_freeu(unet: UNet3D, freeu: FreeU, frame_chunk: int | None = None,
               timestep_cond: torch.Tensor | None = None
               ) -> Callable[[torch.Tensor, torch.Tensor | int, torch.Tensor], torch.Tensor]:
    """eps(x, t, context): `unet(x, t, context, frame_chunk, timestep_cond)` with FreeU
    (diffusers' enable_freeu). The two up blocks it acts on run layer by layer, not as
    modules. `timestep_cond`: (1, D), given to every sample."""

    def call(x: torch.Tensor, t: torch.Tensor | int, context: torch.Tensor) -> torch.Tensor:
        cond = None if timestep_cond is None else timestep_cond.expand(x.shape[0], -1)
        h, emb = unet.prepare(x, t, context, frame_chunk, cond)
        h, skips = unet.down_path(h, emb, context, x.shape[2], frame_chunk)
        h, _ = up_path(unet, freeu, h, skips, emb, context, x.shape[2], frame_chunk)
        return unet.output(h, x.shape[0])

    return call
