"""python -m t2v.train: fine-tune the UNet (all of it, chosen layers, or LoRA adapters).

    python -m t2v.train --config configs/finetune_temporal.yaml data.path=clips/
    torchrun --nproc_per_node 2 -m t2v.train --config configs/finetune_lora.yaml data.path=c.json

One optimizer step (the loss of the latent diffusion models, Rombach et al. 2022):

    x0 = VAE.encode(clip).sample() * 0.18215       (B, 4, F, h, w); frozen VAE
    c  = TextEncoder(caption, or "" with probability train.text_dropout); frozen
    t ~ U{0..999}, eps ~ N(0, I), x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
    loss = || UNet(x_t, t, c) - target ||^2   (target eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) x0)

averaged over grad_accum micro-batches (and over processes by DDP), then gradient clipping,
AdamW with linear warm-up, optional EMA of the trained weights.

With train.model=vae the VAE trains instead (from scratch, for the demo model), on the frames
of the clips as single images, with the loss of Stable Diffusion's KL autoencoder minus its
perceptual and adversarial terms:

    posterior = VAE.encode(x); x_rec = VAE.decode(posterior.sample())
    loss = sum(|x - x_rec| + (x - x_rec)^2) / N + train.kl_weight * sum KL(posterior || N(0, I)) / N

(sums over pixels and latent elements, N frames). The saved model's vae.scaling_factor is
1 / std of posterior samples of the first clips, so that scaled latents have unit variance.

Outputs in train.output_dir: checkpoints/step-NNNNNN/ (trained weights, EMA, optimizer,
scheduler, step and RNG states; written atomically, resumed exactly with train.resume=latest),
log.jsonl (one line per log step), samples/ (periodic videos) and, at the end, lora.safetensors
(LoRA runs) or model/ (a native weights folder for t2v.cli.sample). Recipes: docs/finetuning.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from t2v.atomic import atomic_path
from t2v.config import config_to_yaml
from t2v.pipeline.options import load_config
from t2v.errors import ConfigError, OneLineParser, UserError
from t2v.loading.weights import save_native
from t2v.models.lora import add_lora, save_lora
from t2v.models.tokenizer import Tokenizer
from t2v.noise import randn
from t2v.pipeline.text_to_video import TextToVideo, load_pipeline
from t2v.pipeline.video_io import write_mp4
from t2v.sampling.schedule import add_noise, noise_schedule, velocity
from t2v.training.config import TrainRunConfig
from t2v.training.data import LatentCache, VideoClips, sample_rng
from t2v.training.fsdp import (
    clip_grad_norm_,
    full_model_state,
    load_sharded,
    local,
    save_sharded,
    shard_unet,
)
from t2v.training.surgery import set_trainable
from t2v.training.synthetic import SyntheticClips, combinations_named

log = logging.getLogger("t2v.training.trainer")

CHECKPOINTS = "checkpoints"


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


@torch.no_grad()
def latent_scaling_factor(vae, clips, count: int = 64) -> float:
    """1 / std of posterior samples over the first `count` clips' frames (how SD's 0.18215 was
    found), to 4 significant digits."""
    samples = []
    device = next(vae.parameters()).device
    g = torch.Generator().manual_seed(0)
    for index in range(min(count, len(clips))):
        video, _ = clips.load(index, None)
        posterior = vae.encode(video.transpose(0, 1).to(device, vae.dtype))
        samples.append(posterior.sample(g).float().cpu())
    return float(f"{1.0 / torch.cat(samples).std().item():.4g}")


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


def global_seed(seed: int, rank: int) -> int:
    """The seed of this process's global torch RNG: distinct per (seed, rank)."""
    return int(np.random.SeedSequence([seed, rank, 0x7E]).generate_state(1, dtype=np.uint64)[0]
               >> 1)


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


class Distributed:
    """Rank, world size and device; the process group set up when torchrun started several
    processes (or, with `group=True`, a group of one: FSDP needs one even alone)."""

    def __init__(self, device: str, group: bool = False):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and device not in ("auto", "cuda", "cpu"):
            raise UserError(f"train.device={device} with {self.world} processes would put every "
                            "rank on one device; use train.device=cuda (rank i takes GPU "
                            "LOCAL_RANK i) or cpu")
        cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        self.device = torch.device(f"cuda:{local}" if cuda else
                                   ("cpu" if device == "auto" else device))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL and default allocations on this GPU
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                dist.init_process_group(backend, device_id=self.device)
            else:
                dist.init_process_group(backend)
        elif group and not dist.is_initialized():
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def load_components(cfg: TrainRunConfig, device: torch.device):
    """(model config, text encoder, unet, vae): the weights of `weights.source`, or random
    weights from `model` (seeded by train.seed) when it is null."""

    # float32 master weights whatever the files store (e.g. the fp16 demo model).
    pipe, _ = load_pipeline(cfg.weights.source, cfg.model, revision=cfg.weights.revision,
                            variant=cfg.weights.variant, dtype=torch.float32,
                            seed=cfg.train.seed)
    model_cfg, te, unet, vae = pipe.config, pipe.text_encoder, pipe.unet, pipe.vae
    for frozen in (te, vae):
        frozen.requires_grad_(False).eval().to(device)
    return model_cfg, te, unet.to(device), vae


class Trainer:
    """The state of a run: models, optimizer, data and step; `run()` trains to train.steps."""

    def __init__(self, cfg: TrainRunConfig, dist_: Distributed | None = None):
        self.cfg, tc = cfg, cfg.train
        self.fsdp = tc.strategy == "fsdp"
        self.dist = dist_ or Distributed(tc.device, group=self.fsdp)
        device = self.dist.device
        if tc.mixed_precision == "fp16" and device.type != "cuda":
            raise UserError("train.mixed_precision fp16 needs a CUDA device; use bf16 on CPU")
        if cfg.data.path is None and not cfg.data.synthetic.enabled:
            raise UserError("data.path is not set: give a folder of videos with .txt captions "
                            "or a JSON list (data.path=...)")
        if tc.model == "vae" and cfg.lora.rank > 0:
            raise UserError("train.model=vae trains the whole VAE; LoRA (lora.rank) is for the "
                            "UNet: set lora.rank=0")
        self.model_cfg, self.text_encoder, self.unet, self.vae = load_components(cfg, device)
        # The global RNG (dropout) from (train.seed, rank), whatever loading the models drew;
        # a resumed run restores its saved state instead.
        torch.manual_seed(global_seed(tc.seed, self.dist.rank))
        self.schedule = noise_schedule(self.model_cfg.schedule)
        self.timestep_weights = timestep_weights(cfg.train, self.schedule.num_train_timesteps)
        self.tokenizer = Tokenizer(context_length=self.model_cfg.text_encoder.context_length)
        self.target = tc.target or self.model_cfg.schedule.prediction_type

        unet = self.unet
        if tc.model == "vae":
            unet.requires_grad_(False).eval()
            unet = self.vae
            unet.requires_grad_(True)
        elif cfg.lora.rank > 0:

            add_lora(unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.dropout)
        else:
            try:
                set_trainable(unet, list(tc.trainable))
            except ValueError as exc:
                raise UserError(f"train.trainable: {exc}") from None
        unet.to(device).train()
        if tc.model == "unet":
            unet.gradient_checkpointing = tc.gradient_checkpointing
        if not tc.dropout:
            for module in unet.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        if self.fsdp:

            shard_unet(unet, device, tc.fsdp)  # parameters become float32 DTensor shards
        self.trained = {n: p for n, p in unet.named_parameters() if p.requires_grad}
        self.ema = ({n: p.detach().float().clone() for n, p in self.trained.items()}
                    if tc.ema_decay else None)
        self.model = unet
        if self.dist.world > 1 and not self.fsdp:
            self.model = nn.parallel.DistributedDataParallel(
                unet, device_ids=[device.index] if device.type == "cuda" else None)

        # torch's fused AdamW (one kernel over all tensors) where it exists: on CPU the default
        # is a Python loop of per-tensor ops. FSDP's DTensor shards keep the default.
        fused = not self.fsdp and device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(list(self.trained.values()), lr=tc.lr,
                                           betas=tuple(tc.betas), eps=tc.adam_eps,
                                           weight_decay=tc.weight_decay, fused=fused)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, tc))
        self.scaler = torch.amp.GradScaler("cuda") if tc.mixed_precision == "fp16" else None

        d = cfg.data
        if d.synthetic.enabled:

            syn = d.synthetic
            try:
                combinations = combinations_named(tuple(syn.colours), syn.split)
            except ValueError as exc:
                raise UserError(f"data.synthetic: {exc}") from None
            self.clips = SyntheticClips(syn.seed, syn.clips, d.num_frames, d.height,
                                        combinations, start_spread=syn.start_spread)
        else:
            self.clips = VideoClips(d.path, d.num_frames, d.stride, d.height, d.width)
        self.cache = (LatentCache(d.cache_latents, self.clips, self.vae,
                                  tag=str(cfg.weights.source))
                      if d.cache_latents else None)
        self._order = (-1, None)  # (epoch, permutation of the clips)
        self.output = Path(tc.output_dir)
        self.step = 0
        self._resume_or_check()

    # -- data ------------------------------------------------------------------------------

    def _dataset_index(self, position: int) -> int:
        """Sample `position` of the run -> clip index: a fresh permutation every epoch."""
        epoch, offset = divmod(position, len(self.clips))
        if self._order[0] != epoch:
            seed = self.cfg.train.seed + epoch
            self._order = (epoch, torch.randperm(len(self.clips),
                                                 generator=torch.Generator().manual_seed(seed)))
        return int(self._order[1][offset])

    @torch.no_grad()
    def vae_micro_batch(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE mode: this process's clips of micro-batch `micro` as frames (N, 3, H, W), and
        the noise of their posterior samples."""
        tc, device = self.cfg.train, self.dist.device
        global_batch = tc.batch_size * self.dist.world
        frames, noises = [], []
        for slot in range(self.dist.rank * tc.batch_size, (self.dist.rank + 1) * tc.batch_size):
            g = sample_rng(tc.seed, micro, slot)
            video, _ = self.clips.load(self._dataset_index(micro * global_batch + slot), g)
            frames.append(video.transpose(0, 1))  # (F, 3, H, W)
            f, _, h, w = frames[-1].shape
            scale = 2 ** (len(self.model_cfg.vae.channels) - 1)
            noises.append(randn((f, self.model_cfg.vae.latent_channels, h // scale,
                                 w // scale), g))
        return torch.cat(frames).to(device), torch.cat(noises).to(device)

    @torch.no_grad()
    def micro_batch(self, micro: int):
        """This process's share of global micro-batch `micro`: (x0, context, t, noise)."""
        tc, device = self.cfg.train, self.dist.device
        global_batch = tc.batch_size * self.dist.world
        latents, captions, timesteps, noises = [], [], [], []
        for slot in range(self.dist.rank * tc.batch_size, (self.dist.rank + 1) * tc.batch_size):
            g = sample_rng(tc.seed, micro, slot)
            index = self._dataset_index(micro * global_batch + slot)
            if self.cache is not None:
                mean, std = self.cache.posterior(index)  # (C, F, h, w)
                caption = self.clips.clips[index].caption
                # The posterior noise drawn as encode_video draws it: ((b f), c, h, w).
                noise = randn(mean.transpose(0, 1).shape, g).transpose(0, 1)
                x0 = (mean + std * noise) * self.model_cfg.vae.scaling_factor
            else:
                video, caption = self.clips.load(index, g)
                x0 = self.vae.encode_video(video[None].to(device), generator=g)[0]
            latents.append(x0.to(device, torch.float32))
            captions.append("" if float(torch.rand((), generator=g)) < tc.text_dropout
                            else caption)
            if self.timestep_weights is None:
                timesteps.append(int(torch.randint(0, self.schedule.num_train_timesteps, (1,),
                                                   generator=g)))
            else:
                timesteps.append(int(torch.multinomial(self.timestep_weights, 1, generator=g)))
            noises.append(randn(latents[-1].shape, g))
        ids = self.text_encoder_tokens(captions)
        context = self.text_encoder(ids.to(device))
        return (torch.stack(latents), context, torch.tensor(timesteps, device=device),
                torch.stack(noises).to(device))

    def text_encoder_tokens(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions)

    # -- one step --------------------------------------------------------------------------

    def _autocast(self):
        mp = self.cfg.train.mixed_precision
        if mp == "no":
            return nullcontext()
        dtype = torch.bfloat16 if mp == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns loss, grad norm, lr."""
        tc = self.cfg.train
        losses = []
        for k in range(tc.grad_accum):
            micro = self.step * tc.grad_accum + k
            last = k == tc.grad_accum - 1
            if self.fsdp:
                # reduce-scatter the gradients after the last micro-batch only
                self.model.set_requires_gradient_sync(last)
                sync = nullcontext()
            else:
                sync = nullcontext() if last or self.dist.world == 1 else self.model.no_sync()
            with sync:
                if tc.model == "vae":
                    frames, noise = self.vae_micro_batch(micro)
                    loss = vae_loss(self.model, frames, noise, tc.kl_weight, self._autocast)
                else:
                    x0, context, t, noise = self.micro_batch(micro)
                    loss = diffusion_loss(self.model, x0, context, t, noise,
                                          self.schedule.alphas_cumprod, self.target,
                                          self._autocast, tc.snr_gamma)
                scaled = loss / tc.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            losses.append(loss.item())
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = list(self.trained.values())
        max_norm = tc.max_grad_norm if tc.max_grad_norm is not None else math.inf
        if self.fsdp:

            norm = clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        stepped = True
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # The scaler skips the step (inf/NaN gradients) and lowers its scale: then the
            # schedule and the EMA do not advance either.
            stepped = self.scaler.get_scale() >= scale
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.lr_schedule.get_last_lr()[0]
        if stepped:
            self.lr_schedule.step()
        if self.ema is not None and stepped:
            ema, current = list(self.ema.values()), [p.detach().float() for p in params]
            if self.fsdp:  # DTensors: the local shards update in place

                ema, current = [local(v) for v in ema], [local(p) for p in current]
            torch._foreach_lerp_(ema, current, 1.0 - tc.ema_decay)
        self.step += 1
        return {"step": self.step, "loss": self.dist.mean(sum(losses) / len(losses)),
                "grad_norm": float(norm), "lr": lr}

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint_dir(self, step: int) -> Path:
        return self.output / CHECKPOINTS / f"step-{step:06d}"

    def _trainer_state(self) -> dict:
        return {"step": self.step, "strategy": self.cfg.train.strategy, "world": self.dist.world,
                "lr_schedule": self.lr_schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "cpu_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes the folder atomically (a temporary folder renamed into place); with
        fsdp every rank writes its shards into it (t2v.training.fsdp.save_sharded)."""
        target = self.checkpoint_dir(self.step)
        if self.fsdp:
            return self._save_sharded_checkpoint(target)
        if self.dist.main:
            with atomic_path(target) as tmp:
                tmp.mkdir()
                save_file({n: p.detach().contiguous().cpu() for n, p in self.trained.items()},
                          str(tmp / "trained.safetensors"))
                if self.ema is not None:
                    save_file({n: v.contiguous().cpu() for n, v in self.ema.items()},
                              str(tmp / "ema.safetensors"))
                state = {**self._trainer_state(), "optimizer": self.optimizer.state_dict()}
                torch.save(state, tmp / "state.pt")
                (tmp / "config.yaml").write_text(config_to_yaml(self.cfg))
        self.dist.barrier()
        return target

    def _save_sharded_checkpoint(self, target: Path) -> Path:
        """A shared temporary folder next to the target: every rank's shards (DCP) and its RNG
        state, rank 0's state.pt and config; renamed into place once all ranks are done."""
        import shutil


        tmp = target.with_name(target.name + ".partial")
        if target.exists():
            raise UserError(f"{target} exists: will not overwrite a checkpoint")
        if self.dist.main and tmp.exists():
            shutil.rmtree(tmp)  # a run killed while saving
        self.dist.barrier()
        save_sharded(tmp, self.model, self.optimizer, self.ema)
        torch.save({"cpu_rng": torch.get_rng_state()}, tmp / f"rng-rank{self.dist.rank}.pt")
        if self.dist.main:
            torch.save(self._trainer_state(), tmp / "state.pt")
            (tmp / "config.yaml").write_text(config_to_yaml(self.cfg))
        self.dist.barrier()
        if self.dist.main:
            tmp.rename(target)
        self.dist.barrier()
        return target

    def _latest_checkpoint(self) -> Path | None:
        folder = self.output / CHECKPOINTS
        found = sorted(folder.glob("step-[0-9][0-9][0-9][0-9][0-9][0-9]")) if folder.is_dir() \
            else []
        return found[-1] if found else None

    def _resume_or_check(self) -> None:
        resume = self.cfg.train.resume
        if resume is None:
            if self._latest_checkpoint() is not None:
                raise UserError(f"{self.output} already holds checkpoints; resume with "
                                "train.resume=latest or choose another train.output_dir")
            return
        path = self._latest_checkpoint() if resume == "latest" else Path(resume)
        if path is None:
            log.info("no checkpoint in %s yet: starting from step 0", self.output)
            return
        if not (path / "state.pt").is_file():
            raise UserError(f"train.resume {path}: not a checkpoint folder (no state.pt)")
        self.load_checkpoint(path)

    def load_checkpoint(self, path: Path) -> None:
        # weights_only: tensors, numbers and dicts only, no code execution.
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        written_by = state.get("strategy", "ddp")
        if written_by != self.cfg.train.strategy:
            raise UserError(f"train.resume {path}: written with train.strategy={written_by}; "
                            f"resume it with train.strategy={written_by}")
        if self.fsdp:
            self._load_sharded_checkpoint(path, state)
            return
        trained = load_file(str(path / "trained.safetensors"))
        if set(trained) != set(self.trained):
            raise UserError(f"{path}: trains other parameters than this config "
                            f"({len(set(trained) ^ set(self.trained))} names differ)")
        with torch.no_grad():
            for name, p in self.trained.items():
                p.copy_(trained[name])
        if self.ema is not None:
            ema = load_file(str(path / "ema.safetensors"))  # keys sorted: reorder
            self.ema = {n: ema[n].to(self.dist.device) for n in self.trained}
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["cpu_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = state["step"]
        log.info("resumed from %s at step %d", path, self.step)

    def _load_sharded_checkpoint(self, path: Path, state: dict) -> None:
        """Shards written by any number of processes (DCP reshards); this rank's RNG state if
        the checkpoint has one for it (same or more processes), else the fresh seed's."""

        load_sharded(path, self.model, self.optimizer, self.ema)
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        rng = path / f"rng-rank{self.dist.rank}.pt"
        if rng.is_file():
            torch.set_rng_state(torch.load(rng, map_location="cpu", weights_only=True)["cpu_rng"])
        self.step = state["step"]
        log.info("resumed from %s at step %d (written by %d processes, now %d)", path,
                 self.step, state["world"], self.dist.world)

    # -- outputs ---------------------------------------------------------------------------

    @contextmanager
    def _with_ema(self):
        """Inside the block the trained parameters hold the EMA weights (if EMA is on)."""
        if self.ema is None:
            yield
            return
        saved = {n: p.detach().clone() for n, p in self.trained.items()}
        with torch.no_grad():
            for n, p in self.trained.items():
                p.copy_(self.ema[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.trained.items():
                    p.copy_(saved[n])

    def write_samples(self) -> list[Path]:

        s = self.cfg.sample
        pipe = TextToVideo(self.model_cfg, self.text_encoder, self.unet, self.vae)
        written = []
        self.unet.eval()
        try:
            for i, prompt in enumerate(self.cfg.train.sample_prompts):
                frames = pipe(prompt, s.negative_prompt, num_frames=s.num_frames,
                              height=s.height, width=s.width, steps=s.steps,
                              guidance_scale=s.guidance_scale, sampler=s.sampler,
                              seed=s.seed if s.seed is not None else i, progress=False).frames
                path = self.output / "samples" / f"step-{self.step:06d}-{i}.mp4"
                if self.dist.main:  # with fsdp every rank samples (the UNet is sharded)
                    written.append(write_mp4(frames[0].cpu().numpy(), path, s.fps,
                                             overwrite=True))
        finally:
            self.unet.train()
        return written

    def save_final(self) -> Path | None:
        """lora.safetensors (LoRA) or model/ (native folder), with the EMA weights if any.
        With fsdp every rank calls it (the weights are gathered) and rank 0 writes."""
        with self._with_ema():
            unet_state = None
            if self.fsdp:

                unet_state = full_model_state(self.model)
                if not self.dist.main:
                    return None
            if self.cfg.lora.rank > 0:

                return save_lora(self.unet, self.output / "lora.safetensors", overwrite=True,
                                 state_dict=unet_state)
            model_cfg = self.model_cfg
            if self.cfg.train.model == "vae":
                self.vae.eval()
                factor = latent_scaling_factor(self.vae, self.clips)
                model_cfg = dataclasses.replace(model_cfg, vae=dataclasses.replace(
                    model_cfg.vae, scaling_factor=factor))
                log.info("VAE latent scaling factor: %s", factor)
            states = {"text_encoder": self.text_encoder.state_dict(),
                      "unet": self.unet.state_dict() if unet_state is None else unet_state,
                      "vae": self.vae.state_dict()}
            with atomic_path(self.output / "model", overwrite=True) as tmp:
                tmp.mkdir()
                save_native(tmp, model_cfg, states)
            return self.output / "model"

    # -- the loop --------------------------------------------------------------------------

    def run(self, progress: bool = True) -> list[dict]:
        tc = self.cfg.train
        history = []
        if self.dist.main:
            self.output.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=tc.steps, initial=self.step, desc="training",
                   disable=not (progress and self.dist.main))
        start = time.perf_counter()
        while self.step < tc.steps:
            record = self.train_step()
            record["seconds"] = round(time.perf_counter() - start, 3)
            history.append(record)
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if self.dist.main and (self.step % tc.log_every == 0 or self.step == tc.steps):
                with open(self.output / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if self.step % tc.checkpoint_every == 0 or self.step == tc.steps:
                self.save_checkpoint()
            if tc.sample_every and self.step % tc.sample_every == 0 and \
                    (self.dist.main or self.fsdp):
                self.write_samples()
        bar.close()
        if history and (self.dist.main or self.fsdp):
            self.save_final()
        self.dist.barrier()
        return history


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m t2v.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a finetune YAML (configs/finetune_*)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lr=1e-4")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parser.parse_args(argv)
        cfg = load_config(args.config, args.overrides, schema=TrainRunConfig)
        trainer = Trainer(cfg)
        history = trainer.run(progress=not args.quiet)
    except (UserError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if trainer.dist.main and history:
        print(f"trained to step {trainer.step}: loss {history[-1]['loss']:.4f}; "
              f"outputs in {trainer.output}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
