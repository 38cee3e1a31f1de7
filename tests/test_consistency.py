"""Latent consistency distillation (train.objective=consistency, t2v.training.consistency):
the loss and its target against a reference written here from diffusers'
train_lcm_distill_sd_wds.py, a tiny distillation that lowers the loss, exact resume, and the
student's LoRA file with its guidance embedding loading into a pipeline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import max_rel_diff, randomize_, run_config, straight_and_resumed
from synthetic import write_squares
from t2v.config import UNetConfig
from t2v.models.unet import UNet3D, add_guidance_embedding
from t2v.sampling.schedule import noise_schedule
from t2v.config import ScheduleConfig
from t2v.training.consistency import DDIMGrid, consistency_loss
from t2v.training.trainer import Trainer

LOSS_TOL = 1e-5  # the same arithmetic in another order (batched teacher passes): fp32 rounding
TINY = UNetConfig(channels=(32, 64), attention=(True, False), layers_per_block=1, head_dim=8,
                  context_dim=16, norm_groups=4)
DISTIL = ["train.objective=consistency", "consistency.guidance_embedding=16",
          "consistency.w_min=1.0", "consistency.w_max=4.0", "consistency.ddim_steps=20",
          "train.gradient_checkpointing=false"]


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> Path:
    return write_squares(tmp_path_factory.mktemp("squares"))


# -- the reference: diffusers' LCM distillation script, step by step ------------------------

def reference_scalings(timestep, sigma_data=0.5, timestep_scaling=10.0):
    """scalings_for_boundary_conditions of the script."""
    scaled = timestep_scaling * timestep
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


def extract(a, t, shape):
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(shape) - 1)))


def predicted_original(output, t, x, kind, alphas, sigmas):
    a, s = extract(alphas, t, x.shape), extract(sigmas, t, x.shape)
    return (x - s * output) / a if kind == "epsilon" else a * x - s * output


def predicted_noise(output, t, x, kind, alphas, sigmas):
    a, s = extract(alphas, t, x.shape), extract(sigmas, t, x.shape)
    return output if kind == "epsilon" else a * output + s * x


class ReferenceDDIMSolver:
    """The script's DDIMSolver."""

    def __init__(self, alpha_cumprods, timesteps=1000, ddim_timesteps=50):
        step_ratio = timesteps // ddim_timesteps
        self.ddim_timesteps = (np.arange(1, ddim_timesteps + 1) * step_ratio).round().astype(
            np.int64) - 1
        self.ddim_alpha_cumprods = alpha_cumprods[self.ddim_timesteps]
        self.ddim_alpha_cumprods_prev = np.asarray(
            [alpha_cumprods[0]] + alpha_cumprods[self.ddim_timesteps[:-1]].tolist())
        self.ddim_timesteps = torch.from_numpy(self.ddim_timesteps).long()
        self.ddim_alpha_cumprods_prev = torch.from_numpy(self.ddim_alpha_cumprods_prev)

    def ddim_step(self, pred_x0, pred_noise, index):
        prev = extract(self.ddim_alpha_cumprods_prev, index, pred_x0.shape)
        return prev.sqrt() * pred_x0 + (1.0 - prev).sqrt() * pred_noise


def reference_embedding(w, dim):
    """guidance_scale_embedding of the script."""
    w = w * 1000.0
    half = dim // 2
    emb = torch.log(torch.tensor(10000.0)) / (half - 1)
    emb = torch.exp(torch.arange(half, dtype=torch.float32) * -emb)
    emb = w.float()[:, None] * emb[None, :]
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)


def reference_loss(student, teacher, target, x0, context, uncond, index, noise, w, schedule,
                   ddim_steps, dim, loss_type, huber_c):
    ac = schedule.alphas_cumprod
    alphas, sigmas = ac.sqrt(), (1 - ac).sqrt()
    kind = schedule.prediction_type
    solver = ReferenceDDIMSolver(ac.numpy().astype(np.float64), 1000, ddim_steps)
    topk = 1000 // ddim_steps
    start_timesteps = solver.ddim_timesteps[index]
    timesteps = start_timesteps - topk
    timesteps = torch.where(timesteps < 0, torch.zeros_like(timesteps), timesteps)
    c_skip_start, c_out_start = (c.view(-1, 1, 1, 1, 1) for c in
                                 reference_scalings(start_timesteps.double()))
    c_skip, c_out = (c.view(-1, 1, 1, 1, 1) for c in reference_scalings(timesteps.double()))
    noisy = extract(alphas, start_timesteps, x0.shape) * x0 + \
        extract(sigmas, start_timesteps, x0.shape) * noise
    w_embedding = reference_embedding(w, dim)
    wv = w.view(-1, 1, 1, 1, 1)
    noise_pred = student(noisy, start_timesteps, context, timestep_cond=w_embedding)
    pred_x0 = predicted_original(noise_pred, start_timesteps, noisy, kind, alphas, sigmas)
    model_pred = c_skip_start * noisy + c_out_start * pred_x0
    with torch.no_grad():
        cond_out = teacher(noisy, start_timesteps, context)
        cond_x0 = predicted_original(cond_out, start_timesteps, noisy, kind, alphas, sigmas)
        cond_noise = predicted_noise(cond_out, start_timesteps, noisy, kind, alphas, sigmas)
        uncond_out = teacher(noisy, start_timesteps, uncond)
        uncond_x0 = predicted_original(uncond_out, start_timesteps, noisy, kind, alphas, sigmas)
        uncond_noise = predicted_noise(uncond_out, start_timesteps, noisy, kind, alphas, sigmas)
        x0_w = cond_x0 + wv * (cond_x0 - uncond_x0)
        noise_w = cond_noise + wv * (cond_noise - uncond_noise)
        x_prev = solver.ddim_step(x0_w, noise_w, index).float()
        target_out = target(x_prev, timesteps, context, timestep_cond=w_embedding)
        target_x0 = predicted_original(target_out, timesteps, x_prev, kind, alphas, sigmas)
        goal = c_skip * x_prev + c_out * target_x0
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(model_pred.float(), goal.float())
    return torch.mean(torch.sqrt((model_pred.float() - goal.float()) ** 2 + huber_c ** 2)
                      - huber_c)


@pytest.mark.parametrize("prediction, zero_snr", [("epsilon", False), ("v_prediction", True)])
@pytest.mark.parametrize("loss_type", ["huber", "l2"])
def test_loss_and_target_match_the_lcm_distillation_script(prediction, zero_snr, loss_type):
    """Every random weight, three different networks (teacher, student with the embedding,
    target): the loss and its gradient equal the reference's."""
    torch.manual_seed(0)
    teacher = randomize_(UNet3D(TINY), 1).eval()
    student = UNet3D(TINY)
    add_guidance_embedding(student, 16)
    student = randomize_(student, 2).eval()
    target = randomize_(UNet3D(dataclasses.replace(TINY, time_cond_proj_dim=16)), 3).eval()
    schedule = noise_schedule(ScheduleConfig(prediction_type=prediction,
                                             rescale_betas_zero_snr=zero_snr))
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, 4, 2, 6, 6, generator=g)
    noise = torch.randn(3, 4, 2, 6, 6, generator=g)
    context = torch.randn(3, 5, 16, generator=g)
    uncond = torch.randn(1, 5, 16, generator=g).expand(3, -1, -1)
    index = torch.tensor([0, 7, 19])  # the first grid point (s clamps to 0), a middle one, 999
    w = torch.tensor([1.0, 3.5, 7.0])
    ours = consistency_loss(student, teacher, target, x0, context, uncond, index, noise, w,
                            schedule.alphas_cumprod, DDIMGrid.of(1000, 20), prediction,
                            loss_type, 0.001, embedding_dim=16)
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    expected = reference_loss(student, teacher, target, x0, context, uncond, index, noise, w,
                              schedule, 20, 16, loss_type, 0.001)
    expected.backward()
    assert abs(ours.item() - expected.item()) <= LOSS_TOL * abs(expected.item())
    worst = max(max_rel_diff(ours_grads[n], p.grad) for n, p in student.named_parameters()
                if p.grad.abs().max() > 0)
    assert worst <= LOSS_TOL
    # The target's network matters (not the student's), and so does the teacher's guidance.
    other = consistency_loss(student, teacher, student, x0, context, uncond, index, noise, w,
                             schedule.alphas_cumprod, DDIMGrid.of(1000, 20), prediction,
                             loss_type, 0.001, embedding_dim=16)
    unguided = consistency_loss(student, teacher, target, x0, context, uncond, index, noise,
                                w * 0, schedule.alphas_cumprod, DDIMGrid.of(1000, 20),
                                prediction, loss_type, 0.001, embedding_dim=16)
    assert abs(other.item() - ours.item()) > 1e-3 * ours.item()
    assert abs(unguided.item() - ours.item()) > 1e-3 * ours.item()


def test_teacher_guidance_interval_guides_only_inside():
    """consistency.teacher_guidance_interval: outside it the teacher's conditional prediction
    alone (w = 0), inside the guided one."""
    teacher = randomize_(UNet3D(TINY), 1).eval()
    student = randomize_(UNet3D(TINY), 2).eval()
    schedule = noise_schedule(ScheduleConfig())
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(2, 4, 2, 6, 6, generator=g), torch.randn(2, 4, 2, 6, 6, generator=g)
    context, uncond = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    index, w = torch.tensor([2, 19]), torch.tensor([3.0, 3.0])  # t = 149 and 999
    grid = DDIMGrid.of(1000, 20)

    def run(weights, interval):
        return [consistency_loss(student, teacher, student, x0[i:i + 1], context[i:i + 1],
                                 uncond[i:i + 1], index[i:i + 1], noise[i:i + 1],
                                 weights[i:i + 1], schedule.alphas_cumprod, grid, "epsilon",
                                 guidance_interval=interval).item() for i in range(2)]

    with torch.no_grad():
        limited = run(w, (600, 999))
        assert limited[0] == run(w * 0, None)[0]  # t = 149: unguided
        assert limited[1] == run(w, None)[1]  # t = 999: guided
        assert limited[0] != run(w, None)[0]


# -- the trainer ---------------------------------------------------------------------------

def test_tiny_distillation_lowers_the_loss(squares, tmp_path):
    cfg = run_config(squares, tmp_path / "run", *DISTIL, "train.trainable=[all]",
                     "train.batch_size=2", "train.steps=40", "train.lr=1e-3")
    trainer = Trainer(cfg)
    assert trainer.unet.cfg.time_cond_proj_dim == 16
    assert trainer.teacher.cfg.time_cond_proj_dim is None
    assert "time_embedding.cond_proj.weight" in trainer.trained
    history = trainer.run(progress=False)
    losses = [r["loss"] for r in history]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"[train] consistency distillation loss, first 10 {first:.5f}, last 10 {last:.5f}")
    assert last < 0.7 * first
    from t2v.loading.weights import read_checkpoint

    _, saved_cfg, states = read_checkpoint(tmp_path / "run" / "model", layout="native")
    assert saved_cfg.unet.time_cond_proj_dim == 16
    assert "time_embedding.cond_proj.weight" in states["unet"]


def test_distillation_resume_is_exact(squares, tmp_path):
    """The target network is part of the state: 4 steps equal 2 + resume + 2, bit for bit."""
    extra = [*DISTIL, "train.trainable=[temporal]", "train.lr=1e-3", "train.checkpoint_every=2",
             "train.ema_decay=0.9"]
    straight, resumed = straight_and_resumed(squares, tmp_path, *extra)
    for name, p in straight.trained.items():
        assert torch.equal(p, resumed.trained[name]), name
        assert torch.equal(straight.consistency_target[name],
                           resumed.consistency_target[name]), name
    assert (tmp_path / "b" / "checkpoints" / "step-000002" / "target.safetensors").is_file()


def test_lora_student_file_carries_its_guidance_embedding(squares, tmp_path):
    """A LoRA distillation writes lora.safetensors with the embedding in full; loading it
    into the base pipeline gives the UNet the embedding and the pipeline runs one UNet pass
    per lcm step, equal to the trained student's own output."""
    from t2v.pipeline.text_to_video import TextToVideo

    cfg = run_config(squares, tmp_path / "run", *DISTIL, "lora.rank=4", "train.steps=3",
                     "train.lr=1e-2", "train.batch_size=2")
    trainer = Trainer(cfg)
    trainer.run(progress=False)
    lora = tmp_path / "run" / "lora.safetensors"
    assert lora.is_file()
    base_config = dataclasses.replace(trainer.model_cfg, unet=trainer.teacher.cfg)
    pipe = TextToVideo(base_config, trainer.text_encoder, UNet3D(trainer.teacher.cfg).eval(),
                       trainer.vae)
    pipe.unet.load_state_dict(trainer.teacher.state_dict())
    pipe.load_lora(lora)
    assert pipe.config.unet.time_cond_proj_dim == 16
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    out = pipe("a square", num_frames=4, height=32, width=32, steps=2, sampler="lcm",
               guidance_scale=3.0, seed=0, output="latents", progress=False).frames
    handle.remove()
    assert calls == [1, 1]
    trainer.unet.eval()
    student = TextToVideo(trainer.model_cfg, trainer.text_encoder, trainer.unet, trainer.vae)
    expected = student("a square", num_frames=4, height=32, width=32, steps=2, sampler="lcm",
                       guidance_scale=3.0, seed=0, output="latents", progress=False).frames
    assert max_rel_diff(out, expected) <= LOSS_TOL
