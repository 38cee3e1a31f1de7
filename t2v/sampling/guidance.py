"""Classifier-free guidance and its rescale (Lin et al., WACV 2024, arXiv 2305.08891, sec. 3.4).

    guided   = u + g (c - u)                          u, c: unconditional, conditional outputs
    rescaled = guided * std(c) / std(guided)          std over all axes but the batch
    out      = phi * rescaled + (1 - phi) * guided    phi = guidance_rescale (0: plain CFG)

Exactly diffusers' `rescale_noise_cfg` (its `guidance_rescale` argument), applied to whatever
the model predicts (eps or v); the paper pairs it with zero-terminal-SNR schedules and
v-prediction, and it tames the over-exposure of high guidance (users run this model up to 17).
"""

from __future__ import annotations

import torch


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float,
          rescale: float = 0.0) -> torch.Tensor:
    guided = uncond + scale * (cond - uncond)
    if rescale == 0.0:
        return guided
    dims = list(range(1, cond.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return rescale * (guided * ratio) + (1 - rescale) * guided
