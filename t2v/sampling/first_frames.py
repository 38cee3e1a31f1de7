"""First-frame conditioning: keep the first K frames of a generated clip close to given frames
by latent replacement (the img2vid of sd-webui-text2video), and continuation of a video.

Given K conditioning frames encoded to latents z (B, C, K, h, w) and per-frame weights
w_0..w_{K-1} in [0, 1] (1: the frame is the conditioning frame, 0: free), one noise draw
e ~ N(0, I) of z's shape from the run's generator, and for every sampler step i the noise level
a_i the sampler's model call i sees (t2v.sampling.samplers.first_alpha_cumprod):

    before step 0:        x[:, :, f] = (1 - w_f) x[:, :, f] + w_f q_0(z_f)
                          q_i(z) = sqrt(a_i) z + sqrt(1 - a_i) e
    after step i < n - 1: the same with a_{i+1}, the level the next model call sees
    after the last step:  x[:, :, f] = (1 - w_f) x[:, :, f] + w_f z_f         (clean)

for f < K; later frames are never touched, the model carries the conditioning into them
through its temporal layers. The replacement happens in the step callback, so every sampler
and windowed sampling work unchanged.

- `--init-image IMG`: the image repeated K = `init_frames` times (default 4) with the weights
  of sd-webui-text2video's default schedule, w_f = 1 - f / K (frame 0 is the image, then the
  image fades over K frames), or `init_weights` given explicitly.
- `--continue-from VIDEO`: its last K = `continue_frames` frames (default 4), each weight 1:
  the new clip's first K frames repeat them and the rest continues the motion; the new clip
  minus its first K frames appended to VIDEO makes the long video (docs/sampling-tools.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from t2v.errors import UserError


def fading_weights(frames: int) -> tuple[float, ...]:
    """sd-webui-text2video's default inpainting schedule: w_f = 1 - f / K."""
    return tuple(1 - f / frames for f in range(frames))


def check_weights(weights: Sequence[float], frames: int, what: str) -> tuple[float, ...]:
    weights = tuple(float(w) for w in weights)
    if len(weights) != frames:
        raise UserError(f"{what}: {len(weights)} weights for {frames} conditioning frames; give "
                        "one per frame")
    if any(not 0.0 <= w <= 1.0 for w in weights):
        raise UserError(f"{what}: weights must be between 0 and 1, got {list(weights)}")
    return weights


@dataclass
class FirstFrames:
    """Conditioning latents z (B, C, K, h, w), their weights (K,) and the fixed noise e."""

    latents: torch.Tensor
    weights: torch.Tensor
    noise: torch.Tensor

    def replace_(self, x: torch.Tensor, alpha_cumprod: torch.Tensor | None) -> None:
        """In place on x (B, C, F, h, w); alpha_cumprod None: the clean latents."""
        k = self.latents.shape[2]
        target = self.latents
        if alpha_cumprod is not None:
            a = alpha_cumprod.to(target.device, torch.float32)
            target = a ** 0.5 * target + (1 - a) ** 0.5 * self.noise
        w = self.weights.to(x.device, torch.float32).view(1, 1, k, 1, 1)
        head = x[:, :, :k].float()
        x[:, :, :k] = ((1 - w) * head + w * target.to(x.device)).to(x.dtype)
