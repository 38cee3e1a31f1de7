"""FreeInit (Wu et al., ECCV 2024, arXiv 2312.07537): sample several times, each pass starting
from the previous result's low spatio-temporal frequencies and fresh high frequencies.

Pass 0 samples from the initial noise z_T as usual. Before pass k >= 1, with x0 the result of
pass k - 1 (latents) and N the number of training timesteps:

    z_t   = sqrt(a_{N-1}) x0 + sqrt(1 - a_{N-1}) z_T          x0 diffused to the last timestep
    z_new = IFFT( FFT(z_t) * L + FFT(z_rand) * (1 - L) ).real  z_rand ~ N(0, I), fresh

FFTs over (frames, height, width), centred. L is a low-pass filter of the normalised
frequency distance d^2 = (d_s / d_t * (2f/F - 1))^2 + (2h/H - 1)^2 + (2w/W - 1)^2 at index
(f, h, w):

    butterworth  1 / (1 + (d^2 / d_s^2)^order)
    gaussian     exp(-d^2 / (2 d_s^2))
    ideal        1 if d^2 <= 2 d_s else 0         (diffusers' comparison, kept)

(all zeros if d_s or d_t is 0). With `use_fast_sampling` (the paper's coarse-to-fine) pass k
runs max(1, int(steps / num_iters * (k + 1))) steps. Names, defaults and numerics are
diffusers' FreeInitMixin (`enable_free_init`), which tests/test_sampling_tools.py checks;
z_rand is drawn from the run's generator in float32 after the previous pass, as there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from t2v.errors import UserError
from t2v.noise import randn
from t2v.sampling.schedule import add_noise

METHODS = ("butterworth", "gaussian", "ideal")


@dataclass(frozen=True)
class FreeInit:
    num_iters: int = 3
    use_fast_sampling: bool = False
    method: str = "butterworth"
    order: int = 4
    spatial_stop_frequency: float = 0.25
    temporal_stop_frequency: float = 0.25

    def __post_init__(self):
        if self.num_iters < 1:
            raise UserError(f"FreeInit num_iters must be >= 1, got {self.num_iters}")
        if self.method not in METHODS:
            raise UserError(f"FreeInit method must be one of {METHODS}, got {self.method!r}")
        for name in ("spatial_stop_frequency", "temporal_stop_frequency"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"FreeInit {name} must be between 0 and 1, got "
                                f"{getattr(self, name)}")

    @classmethod
    def of(cls, value) -> FreeInit | None:
        """None, a FreeInit, a mapping of its fields, or an int (num_iters)."""
        if value is None or isinstance(value, FreeInit):
            return value
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(num_iters=value)
        raise UserError(f"free_init must be a number of passes, a mapping or a FreeInit, got "
                        f"{value!r}")

    def steps_of_pass(self, steps: int, k: int) -> int:
        if not self.use_fast_sampling:
            return steps
        return max(1, int(steps / self.num_iters * (k + 1)))


def low_pass_filter(frames: int, height: int, width: int, free_init: FreeInit) -> torch.Tensor:
    """L (frames, height, width), float32 (computed in float64 as diffusers' Python floats)."""
    d_s, d_t = free_init.spatial_stop_frequency, free_init.temporal_stop_frequency
    if d_s == 0 or d_t == 0:
        return torch.zeros(frames, height, width)

    def axis(n: int) -> torch.Tensor:
        return 2 * torch.arange(n, dtype=torch.float64) / n - 1

    d2 = ((d_s / d_t * axis(frames)) ** 2)[:, None, None] + (axis(height) ** 2)[None, :, None] \
        + (axis(width) ** 2)[None, None, :]
    if free_init.method == "butterworth":
        mask = 1 / (1 + (d2 / d_s ** 2) ** free_init.order)
    elif free_init.method == "gaussian":
        mask = torch.exp(-1 / (2 * d_s ** 2) * d2)
    else:
        mask = (d2 <= d_s * 2).double()
    return mask.float()


def mix_frequencies(low: torch.Tensor, high: torch.Tensor, lpf: torch.Tensor) -> torch.Tensor:
    """IFFT(FFT(low) * lpf + FFT(high) * (1 - lpf)).real over the last three axes, centred."""
    dims = (-3, -2, -1)

    def spectrum(x):
        return torch.fft.fftshift(torch.fft.fftn(x, dim=dims), dim=dims)

    mixed = spectrum(low) * lpf + spectrum(high) * (1 - lpf)
    return torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real


def reinitialize(latents: torch.Tensor, initial_noise: torch.Tensor,
                 alphas_cumprod: torch.Tensor, free_init: FreeInit, generator) -> torch.Tensor:
    """The start of the next pass from the previous result `latents` (B, C, F, h, w)."""
    a = alphas_cumprod[-1].to(latents.device, latents.dtype)
    z_t = add_noise(latents, initial_noise, a).float()
    z_rand = randn(latents.shape, generator, latents.device, torch.float32)
    lpf = low_pass_filter(*latents.shape[-3:], free_init).to(latents.device)
    return mix_frequencies(z_t, z_rand, lpf).to(latents.dtype)
