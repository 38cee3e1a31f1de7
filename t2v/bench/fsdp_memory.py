"""Per-rank peak memory of full fine-tuning (every UNet parameter, AdamW) with train.strategy
fsdp on 1, 2, ... CPU processes (gloo), measured next to t2v.models.memory.training_memory.

    python -m t2v.bench.fsdp_memory [--ranks 1 2] [--width 0.5] [--frames 8] [--latent 16]

A mid-size UNet (the full-size architecture with channels x --width) is built with random
weights on every rank, sharded like t2v.training.trainer does (t2v.training.fsdp.shard_unet, bf16 compute), then
runs two steps (forward, backward with gradient checkpointing, AdamW). Each rank measures its
resident memory after the libraries load and its peak (VmHWM, reset once the model is sharded,
so the full copy every rank builds first is not counted); the step peak is the difference.
With --ranks 1 the run is plain (no FSDP), as train.strategy=ddp on one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import torch

from t2v.bench.common import trained_like_
from t2v.bench.memory import MALLOC_ENV, status_kib
from t2v.config import ModelConfig, UNetConfig
from t2v.models.memory import parameter_counts, training_memory
from t2v.models.unet import UNet3D
from t2v.process_end import end_process
from t2v.training.config import FSDPConfig
from t2v.training.fsdp import shard_unet
from t2v.training.losses import diffusion_loss

MIB = 2 ** 20


def mid_config(width: float):
    full = UNetConfig()
    channels = tuple(int(c * width) for c in full.channels)
    return dataclasses.replace(ModelConfig(), unet=dataclasses.replace(full, channels=channels))


def child(width: float, frames: int, latent: int) -> None:
    import gc

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    baseline = status_kib("VmRSS")  # libraries and runtime
    cfg = mid_config(width)
    torch.manual_seed(0)
    unet = trained_like_(UNet3D(cfg.unet), 0)
    if world > 1:
        shard_unet(unet, torch.device("cpu"), FSDPConfig(param_dtype="bfloat16"))
    unet.train().gradient_checkpointing = True
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the full copy built before sharding is gone
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, frames, latent, latent, generator=g)
    context = torch.randn(1, 77, cfg.unet.context_dim, generator=g)
    alphas = torch.linspace(0.999, 0.01, 1000)
    for _ in range(2):
        loss = diffusion_loss(unet, x0, context, torch.tensor([500]), torch.randn_like(x0),
                              alphas, "epsilon",
                              autocast=lambda: torch.autocast("cpu", torch.bfloat16)
                              if world == 1 else torch.autocast("cpu", enabled=False))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = status_kib("VmHWM")
    rank = dist.get_rank() if world > 1 else 0
    print(json.dumps({"rank": rank, "world": world,
                      "step_mib": (peak - baseline) / 1024}), flush=True)
    if world > 1:
        dist.destroy_process_group()


def measure(ranks: int, width: float, frames: int, latent: int) -> list[float]:
    args = ["-m", "t2v.bench.fsdp_memory", "--child", "--width", str(width), "--frames",
            str(frames), "--latent", str(latent)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(ranks), *args] if ranks > 1 else [sys.executable, *args])
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return [r["step_mib"] for r in sorted(rows, key=lambda r: r["rank"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--width", type=float, default=0.5, help="channels x this")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.width, args.frames, args.latent)
        return
    cfg = mid_config(args.width)
    print(f"UNet channels {cfg.unet.channels} ({parameter_counts(cfg)['unet'] / 1e6:.0f}M "
          f"parameters), all trained, AdamW, bf16 compute, gradient checkpointing, batch 1 per "
          f"rank, {args.frames} frames, {args.latent}x{args.latent} latents; MiB per rank")
    print(f"{'ranks':>5} {'measured (per rank)':>22} {'model':>8} {'weights':>8} "
          f"{'grads':>7} {'AdamW':>7} {'gathered':>9} {'activ.':>7}")
    for ranks in args.ranks:
        measured = measure(ranks, args.width, args.frames, args.latent)
        m = training_memory(cfg, ranks=ranks, strategy="fsdp" if ranks > 1 else "ddp",
                            compute_dtype="bfloat16", frames=args.frames,
                            height=args.latent * 8, width=args.latent * 8)
        model = (m.total - m.frozen) / MIB
        print(f"{ranks:>5} {' / '.join(f'{v:,.0f}' for v in measured):>22} {model:>8,.0f} "
              f"{m.weights / MIB:>8,.0f} {m.gradients / MIB:>7,.0f} {m.optimizer / MIB:>7,.0f} "
              f"{m.gathered / MIB:>9,.0f} {m.activations / MIB:>7,.0f}", flush=True)


if __name__ == "__main__":
    end_process(main())
