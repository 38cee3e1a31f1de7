"""Latent consistency distillation (LCD; Luo et al. 2023, arXiv:2310.04378, Algorithm 1), as
diffusers' train_lcm_distill_*.py scripts compute it, for train.objective=consistency.

One step, per clip (x0, prompt context c, empty-prompt context u):

    index ~ U{0 .. N-1} on the DDIM grid t_i = (i + 1) k - 1, k = 1000 // N (N = ddim_steps)
    t = t_index, s = max(t - k, 0)                       the solver skips k training steps
    w ~ U[w_min, w_max]                                  LCM's guidance weight (g = w + 1)
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
    student:  f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(student(x_t, t, c, emb(w)))
    teacher:  x0_w = x0_c + w (x0_c - x0_u), eps_w = eps_c + w (eps_c - eps_u)   (guided, frozen)
              x_s = sqrt(a_s) x0_w + sqrt(1 - a_s) eps_w                          (one DDIM step)
    target:   f-(x_s, s) = c_skip(s) x_s + c_out(s) x0_hat(target(x_s, s, c, emb(w)))  (no grad)
    loss = mean(sqrt((f - f-)^2 + c^2) - c)  (Huber, c = huber_c)  or  mean((f - f-)^2)  (l2)

The target network is an exponential moving average of the student (the Trainer's); the
boundary scalings c_skip, c_out are LCM's (t2v.sampling.lcm.boundary_scalings). emb(w) is the
guidance-scale embedding when the student has one (model.unet.time_cond_proj_dim), else the
student is not told w (LCM-LoRA). After distillation the student samples with the lcm sampler
in a few steps (docs/few-step.md).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from t2v.models.unet import guidance_scale_embedding
from t2v.sampling.lcm import boundary_scalings
from t2v.sampling.schedule import add_noise, eps_to_x0, v_to_eps, v_to_x0


@dataclass(frozen=True)
class DDIMGrid:
    """The solver's grid: N timesteps k apart, and a_prev of each (a at t - k, a_0 first)."""

    timesteps: torch.Tensor  # (N,) long: (1..N) * k - 1
    skip: int  # k

    @classmethod
    def of(cls, num_train: int, ddim_steps: int) -> "DDIMGrid":
        skip = num_train // ddim_steps
        return cls(torch.arange(1, ddim_steps + 1) * skip - 1, skip)

    def previous(self, t: torch.Tensor) -> torch.Tensor:
        """s = max(t - k, 0)."""
        return (t - self.skip).clamp(min=0)


def x0_and_eps(prediction: torch.Tensor, x: torch.Tensor, a: torch.Tensor, kind: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a model output of `kind` ("epsilon" or "v_prediction") at x_t, a_t."""
    if kind == "epsilon":
        return eps_to_x0(x, prediction, a), prediction
    return v_to_x0(x, prediction, a), v_to_eps(x, prediction, a)


def consistency_loss(student, teacher, target, x0: torch.Tensor, context: torch.Tensor,
                     uncond: torch.Tensor, index: torch.Tensor, noise: torch.Tensor,
                     w: torch.Tensor, alphas_cumprod: torch.Tensor, grid: DDIMGrid,
                     prediction_type: str, loss: str = "huber", huber_c: float = 0.001,
                     timestep_scaling: float = 10.0, embedding_dim: int | None = None,
                     guidance_interval: tuple[int, int] | None = None,
                     autocast=nullcontext) -> torch.Tensor:
    """The LCD loss of one micro-batch (the module docstring). x0, noise: (B, C, F, h, w);
    context, uncond: (B, L, D); index: (B,) long into `grid`; w: (B,) float. `student`,
    `teacher`, `target`: UNet3D-like callables (x, t, context[, timestep_cond]); the target
    runs before the student (it may swap weights into the student's module: nothing of the
    student's graph exists yet). `guidance_interval` (low, high): the teacher guides only at
    low <= t <= high (w = 0 elsewhere; the student still sees emb(w))."""
    device = x0.device
    ac = alphas_cumprod.to(device)
    t = grid.timesteps.to(device)[index]
    s = grid.previous(t)
    a_t, a_s = ac[t].view(-1, 1, 1, 1, 1), ac[s].view(-1, 1, 1, 1, 1)
    x_t = add_noise(x0, noise, a_t)
    cond = guidance_scale_embedding(w, embedding_dim).to(device) if embedding_dim else None
    shape = (-1, 1, 1, 1, 1)
    skip_t, out_t = (c.to(device).view(shape) for c in boundary_scalings(t, timestep_scaling))
    skip_s, out_s = (c.to(device).view(shape) for c in boundary_scalings(s, timestep_scaling))

    with torch.no_grad():
        with autocast():
            both = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                           torch.cat([uncond, context]))
        x0_u, eps_u = x0_and_eps(both.float().chunk(2)[0], x_t, a_t, prediction_type)
        x0_c, eps_c = x0_and_eps(both.float().chunk(2)[1], x_t, a_t, prediction_type)
        gw = w.to(device)
        if guidance_interval is not None:
            inside = (t >= guidance_interval[0]) & (t <= guidance_interval[1])
            gw = torch.where(inside, gw, torch.zeros_like(gw))
        gw = gw.view(shape)
        x0_w = x0_c + gw * (x0_c - x0_u)
        eps_w = eps_c + gw * (eps_c - eps_u)
        x_s = a_s.sqrt() * x0_w + (1 - a_s).sqrt() * eps_w
        with autocast():
            later = target(x_s, s, context, timestep_cond=cond) if cond is not None \
                else target(x_s, s, context)
        x0_target, _ = x0_and_eps(later.float(), x_s, a_s, prediction_type)
        goal = skip_s * x_s + out_s * x0_target

    with autocast():
        prediction = student(x_t, t, context, timestep_cond=cond) if cond is not None \
            else student(x_t, t, context)
    x0_student, _ = x0_and_eps(prediction.float(), x_t, a_t, prediction_type)
    online = skip_t * x_t + out_t * x0_student

    if loss == "l2":
        return torch.nn.functional.mse_loss(online.float(), goal.float())
    return (torch.sqrt((online.float() - goal.float()) ** 2 + huber_c ** 2) - huber_c).mean()
