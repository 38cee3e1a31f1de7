"""What a training step minimises, and how fast: the diffusion loss (UNet), the VAE loss, the
sampling weights of the training timesteps and the learning-rate schedule."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from t2v.errors import UserError
from t2v.sampling.schedule import add_noise, velocity


def vae_loss(vae, frames: torch.Tensor, noise: torch.Tensor, kl_weight: float,
             autocast=nullcontext) -> torch.Tensor:
    """Reconstruction (L1 + L2, summed per frame) + kl_weight x KL to N(0, I), averaged over
    frames (N, 3, H, W); `noise` draws the posterior sample."""
    with autocast():
        reconstruction, posterior = vae(frames, noise=noise)
    n = len(frames)
    error = frames.float() - reconstruction.float()
    rec = (error.abs() + error.pow(2)).sum() / n
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / n
    return rec + kl_weight * kl


def diffusion_loss(unet, x0: torch.Tensor, context: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor, alphas_cumprod: torch.Tensor, target: str,
                   autocast=nullcontext, snr_gamma: float | None = None) -> torch.Tensor:
    """MSE between the UNet's prediction at x_t and the eps (or v) target, in float32.

    snr_gamma: Min-SNR-gamma weighting (Hang et al., arXiv 2303.09556), as diffusers' training
    scripts compute it: each clip's MSE times min(SNR_t, gamma) / SNR_t for an epsilon target,
    min(SNR_t, gamma) / (SNR_t + 1) for v, with SNR_t = a_t / (1 - a_t). None: plain MSE."""
    a = alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1, 1)
    x_t = add_noise(x0, noise, a)
    with autocast():
        prediction = unet(x_t, t, context)
    goal = noise if target == "epsilon" else velocity(x0, noise, a)
    if snr_gamma is None:
        return torch.nn.functional.mse_loss(prediction.float(), goal.float())
    per_clip = (prediction.float() - goal.float()).pow(2).mean(dim=(1, 2, 3, 4))
    snr = (a / (1 - a)).flatten().float()
    weight = snr.clamp(max=snr_gamma) / (snr if target == "epsilon" else snr + 1)
    return (per_clip * weight).mean()


def timestep_weights(tc, num_timesteps: int) -> torch.Tensor | None:
    """The sampling weights of the training timesteps under train.timestep_bias_* (diffusers'
    generate_timestep_weights of train_text_to_image_sdxl.py), normalised; None: uniform."""
    if tc.timestep_bias_strategy == "none":
        return None
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    count = int(tc.timestep_bias_portion * num_timesteps)
    if tc.timestep_bias_strategy == "range":
        if tc.timestep_bias_end > num_timesteps:
            raise UserError(f"train.timestep_bias_end is {tc.timestep_bias_end} but the model "
                            f"has {num_timesteps} training timesteps; set it to at most that")
        biased = slice(tc.timestep_bias_begin, tc.timestep_bias_end)
    else:
        biased = slice(num_timesteps - count, None) if tc.timestep_bias_strategy == "later" \
            else slice(0, count)
    weights[biased] *= tc.timestep_bias_multiplier
    return weights / weights.sum()


def lr_factor(step: int, tc) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of train.lr: linear
    warm-up over warmup_steps, then constant or a cosine down to lr_min_ratio at train.steps."""
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return 1.0
    span = max(tc.steps - tc.warmup_steps, 1)
    progress = min((step - tc.warmup_steps) / span, 1.0)
    return tc.lr_min_ratio + (1 - tc.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
