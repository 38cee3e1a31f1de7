"""Checkpoints of a run: train.output_dir/checkpoints/step-NNNNNN/, written atomically and
resumed exactly (train.resume).

ddp (rank 0 writes): trained.safetensors, ema.safetensors (with EMA), target.safetensors
(consistency distillation's target network), state.pt (step, optimizer,
LR schedule, loss scaler, RNG states), config.yaml. fsdp: every rank's shards (DCP,
t2v.training.fsdp.save_sharded) and rng-rank<i>.pt, with rank 0's state.pt and config.yaml;
they resume on any number of processes.

`save_checkpoint` and `load_checkpoint` take the Trainer (t2v.training.trainer) whose state they
write or restore: its trained parameters, EMA, optimizer, schedule, scaler, step and RNG.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from t2v.atomic import atomic_path
from t2v.config import config_to_yaml
from t2v.errors import UserError
from t2v.training.fsdp import load_sharded, save_sharded

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"step-{step:06d}"


def latest_checkpoint(output: Path) -> Path | None:
    folder = output / CHECKPOINTS
    found = sorted(folder.glob("step-[0-9][0-9][0-9][0-9][0-9][0-9]")) if folder.is_dir() \
        else []
    return found[-1] if found else None


def resume_path(resume: str | None, output: Path) -> Path | None:
    """The checkpoint train.resume names (a folder, or "latest" in `output`), None to start from
    step 0; an error for a fresh run whose output folder already holds checkpoints."""
    if resume is None:
        if latest_checkpoint(output) is not None:
            raise UserError(f"{output} already holds checkpoints; resume with "
                            "train.resume=latest or choose another train.output_dir")
        return None
    path = latest_checkpoint(output) if resume == "latest" else Path(resume)
    if path is None:
        log.info("no checkpoint in %s yet: starting from step 0", output)
        return None
    if not (path / "state.pt").is_file():
        raise UserError(f"train.resume {path}: not a checkpoint folder (no state.pt)")
    return path


def _run_state(trainer) -> dict:
    """state.pt's entries common to both strategies."""
    return {"step": trainer.step, "strategy": trainer.cfg.train.strategy,
            "world": trainer.dist.world, "lr_schedule": trainer.lr_schedule.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler else None,
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _averages(trainer) -> dict[str, dict | None]:
    """The run's averaged weights by file name: the EMA (train.ema_decay) and consistency
    distillation's target network (None where off)."""
    return {"ema": trainer.ema, "target": trainer.consistency_target}


def save_checkpoint(trainer) -> Path:
    """Rank 0 writes the folder atomically (a temporary folder renamed into place); with
    fsdp every rank writes its shards into it (t2v.training.fsdp.save_sharded)."""
    target = checkpoint_dir(trainer.output, trainer.step)
    if trainer.fsdp:
        return _save_sharded_checkpoint(trainer, target)
    if trainer.dist.main:
        with atomic_path(target) as tmp:
            tmp.mkdir()
            save_file({n: p.detach().contiguous().cpu() for n, p in trainer.trained.items()},
                      str(tmp / "trained.safetensors"))
            for name, values in _averages(trainer).items():
                if values is not None:
                    save_file({n: v.contiguous().cpu() for n, v in values.items()},
                              str(tmp / f"{name}.safetensors"))
            state = {**_run_state(trainer), "optimizer": trainer.optimizer.state_dict()}
            torch.save(state, tmp / "state.pt")
            (tmp / "config.yaml").write_text(config_to_yaml(trainer.cfg))
    trainer.dist.barrier()
    return target


def _save_sharded_checkpoint(trainer, target: Path) -> Path:
    """A shared temporary folder next to the target: every rank's shards (DCP) and its RNG
    state, rank 0's state.pt and config; renamed into place once all ranks are done."""
    dist_ = trainer.dist
    tmp = target.with_name(target.name + ".partial")
    if target.exists():
        raise UserError(f"{target} exists: will not overwrite a checkpoint")
    if dist_.main and tmp.exists():
        shutil.rmtree(tmp)  # a run killed while saving
    dist_.barrier()
    save_sharded(tmp, trainer.model, trainer.optimizer, _averages(trainer))
    torch.save({"cpu_rng": torch.get_rng_state()}, tmp / f"rng-rank{dist_.rank}.pt")
    if dist_.main:
        torch.save(_run_state(trainer), tmp / "state.pt")
        (tmp / "config.yaml").write_text(config_to_yaml(trainer.cfg))
    dist_.barrier()
    if dist_.main:
        tmp.rename(target)
    dist_.barrier()
    return target


def load_checkpoint(trainer, path: Path) -> None:
    """Restore the trainer's state from checkpoint folder `path`, written with the same
    train.strategy."""
    # weights_only: tensors, numbers and dicts only, no code execution.
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    written_by = state.get("strategy", "ddp")
    if written_by != trainer.cfg.train.strategy:
        raise UserError(f"train.resume {path}: written with train.strategy={written_by}; "
                        f"resume it with train.strategy={written_by}")
    if trainer.fsdp:
        _load_sharded_checkpoint(trainer, path, state)
        return
    _load_trained(trainer, path)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.lr_schedule.load_state_dict(state["lr_schedule"])
    if trainer.scaler and state["scaler"]:
        trainer.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    trainer.step = state["step"]
    log.info("resumed from %s at step %d", path, trainer.step)


def _load_trained(trainer, path: Path) -> None:
    """The trained parameters (in place) and the EMA of a ddp checkpoint."""
    trained = load_file(str(path / "trained.safetensors"))
    if set(trained) != set(trainer.trained):
        raise UserError(f"{path}: trains other parameters than this config "
                        f"({len(set(trained) ^ set(trainer.trained))} names differ)")
    with torch.no_grad():
        for name, p in trainer.trained.items():
            p.copy_(trained[name])
    for name, values in _averages(trainer).items():
        if values is not None:
            saved = load_file(str(path / f"{name}.safetensors"))  # keys sorted: reorder
            with torch.no_grad():
                for n, v in values.items():
                    v.copy_(saved[n])


def _load_sharded_checkpoint(trainer, path: Path, state: dict) -> None:
    """Shards written by any number of processes (DCP reshards); this rank's RNG state if
    the checkpoint has one for it (same or more processes), else the fresh seed's."""
    load_sharded(path, trainer.model, trainer.optimizer, _averages(trainer))
    trainer.lr_schedule.load_state_dict(state["lr_schedule"])
    rng = path / f"rng-rank{trainer.dist.rank}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, map_location="cpu", weights_only=True)["cpu_rng"])
    trainer.step = state["step"]
    log.info("resumed from %s at step %d (written by %d processes, now %d)", path,
             trainer.step, state["world"], trainer.dist.world)
