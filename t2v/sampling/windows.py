"""Windowed sampling for videos longer than the model's trained length (16 frames for ms-1.7b,
24 for zeroscope).

The temporal layers of the UNet attend over every frame they are given; far past the trained
length the results degrade (users report noise and "weird geometric shapes"). Windowed
sampling runs the denoiser on overlapping windows of `window` frames and fuses the windows'
predictions frame by frame every step, as Gen-L-Video's temporal co-denoising (Wang et al.
2023, arXiv:2305.18264) and FreeNoise (Qiu et al. 2023, arXiv:2310.15169) do. Fusion weights
peak at a window's centre and fall towards its edges (FreeNoise), so frames near a window
boundary lean on the window in which they are central. FreeNoise's noise rescheduling is also
available: the initial noise of the frames past the first window reuses the first frames' noise
in locally shuffled order, which keeps content consistent across windows.

`loop=True` treats the frame axis as circular: windows wrap around the end, so the last frame
flows into the first (a seamless loop).
"""

from __future__ import annotations

from typing import Callable

import torch

from t2v.sampling.schedule import Denoiser


def window_starts(num_frames: int, window: int, stride: int, loop: bool = False) -> list[int]:
    """First frame of every window; windows cover all frames (the last one is aligned to the
    end, or, when looping, the windows wrap around)."""
    if window >= num_frames:
        return [0]
    if loop:
        return list(range(0, num_frames, stride))
    starts = list(range(0, num_frames - window + 1, stride))
    if starts[-1] != num_frames - window:
        starts.append(num_frames - window)
    return starts


def frame_weights(window: int) -> torch.Tensor:
    """Fusion weight of each position in a window: 1 at the centre c = (window - 1) / 2,
    falling linearly to 1 / (c + 1) at the edges (never 0, so every frame is covered)."""
    centre = (window - 1) / 2
    distance = (torch.arange(window, dtype=torch.float32) - centre).abs()
    return 1 - distance / (centre + 1)


def windowed(model: Callable, window: int, overlap: int, loop: bool = False,
             pass_frames: bool = False) -> Denoiser:
    """Wrap a denoiser over (B, C, F, H, W) so that it only ever sees `window` frames at once.

    With `window >= F` (and no loop) it calls `model` once on everything: exactly the plain
    sampler. With `pass_frames`, `model` is called as `model(x_window, t, frames)`, `frames`
    the window's frame indices (a LongTensor, the window's first frame first; they wrap
    around when looping), so that it can condition each window differently (prompt travel).
    """
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"need window >= 1 and 0 <= overlap < window, got {window}, {overlap}")

    def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
        frames = x.shape[2]
        if frames <= window and not loop:
            return model(x, t, torch.arange(frames, device=x.device)) if pass_frames \
                else model(x, t)
        size = min(window, frames)
        weights = frame_weights(size).to(x.device, torch.float32)
        total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        norm = torch.zeros(frames, dtype=torch.float32, device=x.device)
        for start in window_starts(frames, size, size - min(overlap, size - 1), loop):
            index = torch.arange(start, start + size, device=x.device) % frames
            prediction = (model(x[:, :, index], t, index) if pass_frames
                          else model(x[:, :, index], t)).float()
            total.index_add_(2, index, prediction * weights[None, None, :, None, None])
            norm.index_add_(0, index, weights)
        return (total / norm[None, None, :, None, None]).to(x.dtype)

    return denoise


def reschedule_noise(noise: torch.Tensor, window: int, stride: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """FreeNoise's noise rescheduling on (B, C, F, H, W): frames past the first window take the
    noise of the frames `window` earlier, shuffled within each block of `stride` frames."""
    frames = noise.shape[2]
    out = noise.clone()
    for start in range(window, frames, stride):
        count = min(stride, frames - start)
        sources = torch.arange(start - window, start - window + count)
        order = torch.randperm(count, generator=generator)
        out[:, :, start:start + count] = out[:, :, sources[order]]
    return out
