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

The parts: the losses and LR schedule in t2v.training.losses, the processes in
t2v.training.distributed, checkpoints in t2v.training.checkpoints, sample videos and the final
weights in t2v.training.outputs; this module holds the run's state and its loop.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from t2v.errors import ConfigError, OneLineParser, UserError
from t2v.models.lora import add_lora
from t2v.models.unet import add_guidance_embedding
from t2v.models.tokenizer import Tokenizer
from t2v.noise import randn
from t2v.pipeline.options import load_config
from t2v.pipeline.text_to_video import load_pipeline
from t2v.process_end import end_process
from t2v.sampling.schedule import noise_schedule
from t2v.training.checkpoints import load_checkpoint, resume_path, save_checkpoint
from t2v.training.config import TrainRunConfig
from t2v.training.consistency import DDIMGrid, consistency_loss
from t2v.training.data import LatentCache, VideoClips, sample_rng
from t2v.training.distributed import Distributed, global_seed
from t2v.training.fsdp import clip_grad_norm_, local, shard_unet
from t2v.training.losses import diffusion_loss, lr_factor, timestep_weights, vae_loss
from t2v.training.outputs import append_log, ema_weights, save_final, trim_log, write_samples
from t2v.training.surgery import set_trainable
from t2v.training.synthetic import SyntheticClips, combinations_named


def check_run(cfg: TrainRunConfig, device: torch.device) -> None:
    """The settings that depend on each other or on the device, checked before loading."""
    if cfg.train.mixed_precision == "fp16" and device.type != "cuda":
        raise UserError("train.mixed_precision fp16 needs a CUDA device; use bf16 on CPU")
    if cfg.data.path is None and not cfg.data.synthetic.enabled:
        raise UserError("data.path is not set: give a folder of videos with .txt captions "
                        "or a JSON list (data.path=...)")
    if cfg.train.model == "vae" and cfg.lora.rank > 0:
        raise UserError("train.model=vae trains the whole VAE; LoRA (lora.rank) is for the "
                        "UNet: set lora.rank=0")


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


class MicroBatch(NamedTuple):
    """One process's share of a micro-batch. t: training timesteps (diffusion), or indices
    into the solver's grid (consistency); w: the guidance weights (consistency), else None."""

    x0: torch.Tensor
    context: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    w: torch.Tensor | None = None


def training_clips(cfg: TrainRunConfig):
    """The dataset: procedural clips (data.synthetic.enabled) or the videos of data.path."""
    d = cfg.data
    if not d.synthetic.enabled:
        return VideoClips(d.path, d.num_frames, d.stride, d.height, d.width)
    syn = d.synthetic
    try:
        combinations = combinations_named(tuple(syn.colours), syn.split)
    except ValueError as exc:
        raise UserError(f"data.synthetic: {exc}") from None
    return SyntheticClips(syn.seed, syn.clips, d.num_frames, d.height, combinations,
                          start_spread=syn.start_spread)


class Trainer:
    """The state of a run: models, optimizer, data and step; `run()` trains to train.steps."""

    def __init__(self, cfg: TrainRunConfig, dist_: Distributed | None = None):
        self.cfg, tc = cfg, cfg.train
        self.fsdp = tc.strategy == "fsdp"
        self.dist = dist_ or Distributed(tc.device, group=self.fsdp)
        check_run(cfg, self.dist.device)
        self.model_cfg, self.text_encoder, self.unet, self.vae = load_components(
            cfg, self.dist.device)
        # The global RNG (dropout) from (train.seed, rank), whatever loading the models drew;
        # a resumed run restores its saved state instead.
        torch.manual_seed(global_seed(tc.seed, self.dist.rank))
        self.schedule = noise_schedule(self.model_cfg.schedule)
        self.timestep_weights = timestep_weights(tc, self.schedule.num_train_timesteps)
        self.tokenizer = Tokenizer(context_length=self.model_cfg.text_encoder.context_length)
        self.target = tc.target or self.model_cfg.schedule.prediction_type
        self.distilling = tc.objective == "consistency"
        self.teacher = self._consistency_student() if self.distilling else None

        trained_module = self._mark_trainable()
        self._prepare_for_training(trained_module)
        self.trained = {n: p for n, p in trained_module.named_parameters() if p.requires_grad}
        self.ema = ({n: p.detach().float().clone() for n, p in self.trained.items()}
                    if tc.ema_decay else None)
        # Consistency distillation's target network: an EMA of the student's trained weights,
        # swapped into the student for the target's forward pass (`target_weights`).
        self.consistency_target = ({n: p.detach().clone() for n, p in self.trained.items()}
                                   if self.distilling else None)
        self.model = self._parallel(trained_module)
        self.optimizer, self.lr_schedule, self.scaler = self._optimizer()

        self.clips = training_clips(cfg)
        self.cache = (LatentCache(cfg.data.cache_latents, self.clips, self.vae,
                                  tag=str(cfg.weights.source))
                      if cfg.data.cache_latents else None)
        self._order = (-1, None)  # (epoch, permutation of the clips)
        self.output = Path(tc.output_dir)
        self.step = 0
        path = resume_path(tc.resume, self.output)
        if path is not None:
            self.load_checkpoint(path)

    # -- set-up ----------------------------------------------------------------------------

    def _consistency_student(self) -> nn.Module:
        """train.objective=consistency: a frozen copy of the loaded UNet becomes the teacher
        (returned); the UNet, the student, gets the guidance-scale embedding (if
        consistency.guidance_embedding), and the saved model's config says so."""
        teacher = copy.deepcopy(self.unet).requires_grad_(False).eval()
        dim = self.cfg.consistency.guidance_embedding
        if dim:
            try:
                unet_cfg = add_guidance_embedding(self.unet, dim)
            except ValueError as exc:
                raise UserError(str(exc)) from None
            self.model_cfg = dataclasses.replace(self.model_cfg, unet=unet_cfg)
        return teacher

    def _mark_trainable(self) -> nn.Module:
        """The module that trains, with requires_grad on what trains in it: the VAE
        (train.model=vae), the UNet's LoRA adapters (lora.rank > 0), or the UNet's
        train.trainable parameters."""
        cfg = self.cfg
        if cfg.train.model == "vae":
            self.unet.requires_grad_(False).eval()
            self.vae.requires_grad_(True)
            return self.vae
        if cfg.lora.rank > 0:
            add_lora(self.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets,
                     cfg.lora.dropout)
        else:
            try:
                set_trainable(self.unet, list(cfg.train.trainable))
            except ValueError as exc:
                raise UserError(f"train.trainable: {exc}") from None
        if self.distilling and self.unet.time_embedding.cond_proj is not None:
            self.unet.time_embedding.cond_proj.requires_grad_(True)  # new: trains in full
        return self.unet

    def _prepare_for_training(self, module: nn.Module) -> None:
        """On the device in train mode; gradient checkpointing (UNet) and dropout as set; with
        fsdp, its parameters become float32 DTensor shards."""
        tc = self.cfg.train
        module.to(self.dist.device).train()
        if tc.model == "unet":
            module.gradient_checkpointing = tc.gradient_checkpointing
        if not tc.dropout:
            for sub in module.modules():
                if isinstance(sub, nn.Dropout):
                    sub.p = 0.0
        if self.fsdp:
            shard_unet(module, self.dist.device, tc.fsdp)

    def _parallel(self, module: nn.Module) -> nn.Module:
        """What the step calls: DistributedDataParallel over several ddp processes, else the
        module itself (FSDP shards in place)."""
        if self.dist.world == 1 or self.fsdp:
            return module
        device = self.dist.device
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)

    def _optimizer(self):
        """(AdamW over the trained parameters, its LR schedule, the fp16 loss scaler or None)."""
        tc = self.cfg.train
        # torch's fused AdamW (one kernel over all tensors) where it exists: on CPU the default
        # is a Python loop of per-tensor ops. FSDP's DTensor shards keep the default.
        fused = not self.fsdp and self.dist.device.type in ("cpu", "cuda")
        optimizer = torch.optim.AdamW(list(self.trained.values()), lr=tc.lr,
                                      betas=tuple(tc.betas), eps=tc.adam_eps,
                                      weight_decay=tc.weight_decay, fused=fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, tc))
        scaler = torch.amp.GradScaler("cuda") if tc.mixed_precision == "fp16" else None
        return optimizer, schedule, scaler

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
    def micro_batch(self, micro: int) -> MicroBatch:
        """This process's share of global micro-batch `micro`."""
        tc, device = self.cfg.train, self.dist.device
        global_batch = tc.batch_size * self.dist.world
        latents, captions, timesteps, noises, weights = [], [], [], [], []
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
            if self.distilling:  # an index into the solver's grid
                timesteps.append(int(torch.randint(0, self.cfg.consistency.ddim_steps, (1,),
                                                   generator=g)))
            elif self.timestep_weights is None:
                timesteps.append(int(torch.randint(0, self.schedule.num_train_timesteps, (1,),
                                                   generator=g)))
            else:
                timesteps.append(int(torch.multinomial(self.timestep_weights, 1, generator=g)))
            noises.append(randn(latents[-1].shape, g))
            if self.distilling:
                c = self.cfg.consistency
                weights.append(c.w_min + (c.w_max - c.w_min) * float(torch.rand((), generator=g)))
        ids = self.text_encoder_tokens(captions)
        context = self.text_encoder(ids.to(device))
        return MicroBatch(torch.stack(latents), context, torch.tensor(timesteps, device=device),
                          torch.stack(noises).to(device),
                          torch.tensor(weights, device=device) if self.distilling else None)

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
        losses = [self._backward(k) for k in range(self.cfg.train.grad_accum)]
        params = list(self.trained.values())
        norm = self._clip_gradients(params)
        stepped = self._optimizer_step()
        lr = self.lr_schedule.get_last_lr()[0]
        if stepped:
            self.lr_schedule.step()
            if self.ema is not None:
                self._move_average(self.ema, params, self.cfg.train.ema_decay)
            if self.consistency_target is not None:
                self._move_average(self.consistency_target, params,
                                   self.cfg.consistency.target_ema_decay)
        self.step += 1
        return {"step": self.step, "loss": self.dist.mean(sum(losses) / len(losses)),
                "grad_norm": float(norm), "lr": lr}

    def _backward(self, k: int) -> float:
        """Forward and backward of micro-batch k of this step (the gradients accumulate;
        processes synchronise them after the last one); returns its loss."""
        tc = self.cfg.train
        micro = self.step * tc.grad_accum + k
        last = k == tc.grad_accum - 1
        if self.fsdp:
            # reduce-scatter the gradients after the last micro-batch only
            self.model.set_requires_gradient_sync(last)
            sync = nullcontext()
        else:
            sync = nullcontext() if last or self.dist.world == 1 else self.model.no_sync()
        with sync:
            loss = self._loss(micro)
            scaled = loss / tc.grad_accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.item()

    def _loss(self, micro: int) -> torch.Tensor:
        tc = self.cfg.train
        if tc.model == "vae":
            frames, noise = self.vae_micro_batch(micro)
            return vae_loss(self.model, frames, noise, tc.kl_weight, self._autocast)
        batch = self.micro_batch(micro)
        if self.distilling:
            return self._consistency_loss(batch)
        return diffusion_loss(self.model, batch.x0, batch.context, batch.t, batch.noise,
                              self.schedule.alphas_cumprod, self.target, self._autocast,
                              tc.snr_gamma)

    def _consistency_loss(self, batch: MicroBatch) -> torch.Tensor:
        c = self.cfg.consistency
        uncond = self.text_encoder(self.text_encoder_tokens([""]).to(self.dist.device))
        grid = DDIMGrid.of(self.schedule.num_train_timesteps, c.ddim_steps)

        def target(x, t, context, **kwargs):
            with self.target_weights():
                return self.unet(x, t, context, **kwargs)

        return consistency_loss(
            self.model, self.teacher, target, batch.x0, batch.context,
            uncond.expand_as(batch.context), batch.t, batch.noise, batch.w,
            self.schedule.alphas_cumprod, grid, self.target, c.loss, c.huber_c,
            c.timestep_scaling, self.unet.cfg.time_cond_proj_dim if c.guidance_embedding
            else None, c.teacher_guidance_interval, self._autocast)

    @contextmanager
    def target_weights(self):
        """Inside: the student's module holds the consistency target's weights, in eval mode
        (no dropout: a deterministic target); with fsdp, the target's weights in the student's
        shards."""
        training = self.unet.training
        self.unet.eval()
        try:
            with ema_weights(self.trained, self.consistency_target):
                yield
        finally:
            self.unet.train(training)

    def _clip_gradients(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Unscaled (fp16) and clipped to train.max_grad_norm; returns the total norm."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        tc = self.cfg.train
        max_norm = tc.max_grad_norm if tc.max_grad_norm is not None else math.inf
        if self.fsdp:
            return clip_grad_norm_(params, max_norm)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def _optimizer_step(self) -> bool:
        """AdamW's step and zeroed gradients; False when the fp16 scaler skipped the step."""
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
        return stepped

    def _move_average(self, averages: dict, params: list[torch.Tensor], decay: float) -> None:
        """averages <- decay * averages + (1 - decay) * params, in place: the EMA weights and
        consistency distillation's target network. With fsdp, DTensors: the local shards."""
        values = list(averages.values())
        if self.fsdp:
            values, params = [local(v) for v in values], [local(p) for p in params]
        torch._foreach_lerp_(values, [p.detach().to(v.dtype) for p, v in zip(params, values)],
                             1.0 - decay)

    # -- checkpoints and outputs (t2v.training.checkpoints, t2v.training.outputs) ----------

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self)

    def load_checkpoint(self, path: Path) -> None:
        load_checkpoint(self, path)

    # -- the loop --------------------------------------------------------------------------

    def run(self, progress: bool = True) -> list[dict]:
        tc = self.cfg.train
        history = []
        if self.dist.main:
            self.output.mkdir(parents=True, exist_ok=True)
            trim_log(self.output, self.step)  # lines after the resumed step come again
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
                append_log(self.output, record)
            if self.step % tc.checkpoint_every == 0 or self.step == tc.steps:
                self.save_checkpoint()
            if tc.sample_every and self.step % tc.sample_every == 0 and \
                    (self.dist.main or self.fsdp):
                write_samples(self)
        bar.close()
        # Also when nothing trained (resumed at the last step): a kill during the final save
        # left no (or an earlier run's) model/ or lora.safetensors.
        if self.dist.main or self.fsdp:
            save_final(self)
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
    elif trainer.dist.main:
        print(f"already at step {trainer.step} (train.steps={trainer.cfg.train.steps}): "
              f"final weights written in {trainer.output}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    end_process(main())
