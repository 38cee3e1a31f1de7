"""What a run writes besides checkpoints: sample videos during training and, at the end,
lora.safetensors (LoRA runs) or model/ (a native weights folder for t2v.cli.sample), with the
EMA weights if any. A VAE run's model/ gets the latent scaling factor measured on its clips.

`write_samples` and `save_final` take the Trainer (t2v.training.trainer) of the run.
log.jsonl (one line per log step) is appended by `append_log` and cut back to the resumed step
by `trim_log`, so a resumed run's log has each step once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from t2v.atomic import atomic_path
from t2v.loading.weights import save_native
from t2v.models.lora import save_lora
from t2v.pipeline.text_to_video import TextToVideo
from t2v.pipeline.video_io import write_mp4
from t2v.training.fsdp import full_model_state

log = logging.getLogger(__name__)


LOG = "log.jsonl"


def append_log(output: Path, record: dict) -> None:
    """One line of output_dir/log.jsonl."""
    with open(output / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def _logged_step(line: str) -> int | None:
    """The step of a log line; None for a line that is not a whole record (a kill while
    appending)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def trim_log(output: Path, step: int) -> int:
    """Drop output_dir/log.jsonl's lines of steps after `step` (and partial lines): a run
    resumed from the checkpoint of `step` logs the later steps again. Rewritten atomically
    (t2v.atomic), and only when there is something to drop; returns the lines dropped."""
    path = output / LOG
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines
            if line.endswith("\n") and (n := _logged_step(line)) is not None and n <= step]
    if len(kept) < len(lines):
        with atomic_path(path, overwrite=True) as tmp:
            tmp.write_text("".join(kept))
        log.info("%s: %d lines after step %d dropped (logged again)", path,
                 len(lines) - len(kept), step)
    return len(lines) - len(kept)


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


@contextmanager
def ema_weights(trained: dict, ema: dict | None):
    """Inside the block the trained parameters hold the EMA weights (if EMA is on)."""
    if ema is None:
        yield
        return
    saved = {n: p.detach().clone() for n, p in trained.items()}
    with torch.no_grad():
        for n, p in trained.items():
            p.copy_(ema[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in trained.items():
                p.copy_(saved[n])


def write_samples(trainer) -> list[Path]:
    """One video per train.sample_prompts with the `sample` settings, in output_dir/samples/.
    With fsdp every rank samples (the UNet is sharded) and rank 0 writes."""
    s = trainer.cfg.sample
    pipe = TextToVideo(trainer.model_cfg, trainer.text_encoder, trainer.unet, trainer.vae)
    written = []
    trainer.unet.eval()
    try:
        for i, prompt in enumerate(trainer.cfg.train.sample_prompts):
            frames = pipe(prompt, s.negative_prompt, num_frames=s.num_frames,
                          height=s.height, width=s.width, steps=s.steps,
                          guidance_scale=s.guidance_scale, sampler=s.sampler,
                          seed=s.seed if s.seed is not None else i, progress=False).frames
            path = trainer.output / "samples" / f"step-{trainer.step:06d}-{i}.mp4"
            if trainer.dist.main:
                written.append(write_mp4(frames[0].cpu().numpy(), path, s.fps, overwrite=True))
    finally:
        trainer.unet.train()
    return written


def save_final(trainer) -> Path | None:
    """lora.safetensors (LoRA) or model/ (native folder), with the EMA weights if any.
    With fsdp every rank calls it (the weights are gathered) and rank 0 writes."""
    with ema_weights(trainer.trained, trainer.ema):
        unet_state = None
        if trainer.fsdp:
            unet_state = full_model_state(trainer.model)
            if not trainer.dist.main:
                return None
        if trainer.cfg.lora.rank > 0:  # with a distilled student's guidance embedding
            return save_lora(trainer.unet, trainer.output / "lora.safetensors", overwrite=True,
                             state_dict=unet_state,
                             guidance_embedding=trainer.unet.time_embedding.cond_proj
                             is not None)
        return _save_model(trainer, unet_state)


def _save_model(trainer, unet_state: dict | None) -> Path:
    """output_dir/model/: the three models (the gathered UNet state under fsdp)."""
    model_cfg = trainer.model_cfg
    if trainer.cfg.train.model == "vae":
        trainer.vae.eval()
        factor = latent_scaling_factor(trainer.vae, trainer.clips)
        model_cfg = dataclasses.replace(model_cfg, vae=dataclasses.replace(
            model_cfg.vae, scaling_factor=factor))
        log.info("VAE latent scaling factor: %s", factor)
    states = {"text_encoder": trainer.text_encoder.state_dict(),
              "unet": trainer.unet.state_dict() if unet_state is None else unet_state,
              "vae": trainer.vae.state_dict()}
    with atomic_path(trainer.output / "model", overwrite=True) as tmp:
        tmp.mkdir()
        save_native(tmp, model_cfg, states)
    return trainer.output / "model"
