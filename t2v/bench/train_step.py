"""Time and peak memory of one training step of the full-size UNet: LoRA (rank 16, attention
projections and temporal convolutions) or the temporal layers, with and without gradient
checkpointing, each case in its own process (random weights; the frozen text encoder and VAE
are not part of the step).

    python -m t2v.bench.train_step [--frames 8] [--latent 32] [--rank 16] [--repeat 2]

A step: forward at a random timestep, MSE to the noise, backward, AdamW update.
"""

from __future__ import annotations

import argparse
import time

import torch

from t2v.bench.common import trained_like_
from t2v.bench.memory import measure_in_subprocess, report, status_kib
from t2v.config import UNetConfig
from t2v.models.lora import add_lora
from t2v.models.unet import UNet3D
from t2v.training.surgery import set_trainable
from t2v.training.losses import diffusion_loss


def child(mode: str, checkpointing: bool, frames: int, latent: int, rank: int,
          repeat: int) -> None:
    torch.manual_seed(0)
    unet = trained_like_(UNet3D(UNetConfig()), 0)
    if mode == "lora":
        add_lora(unet, rank)
    else:
        set_trainable(unet, [mode])
    unet.train().gradient_checkpointing = checkpointing
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    alphas = torch.linspace(0.999, 0.01, 1000)
    x0 = torch.randn(1, 4, frames, latent, latent)
    context = torch.randn(1, 77, 1024)
    baseline = status_kib("VmRSS")
    times = []
    for _ in range(repeat + 1):  # the first step allocates the optimizer state: not timed
        start = time.perf_counter()
        loss = diffusion_loss(unet, x0, context, torch.tensor([500]), torch.randn_like(x0),
                              alphas, "epsilon")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    report(baseline, mode=mode, checkpointing=checkpointing, seconds=min(times[1:]),
           trained=sum(p.numel() for p in params))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["lora"], choices=["lora", "temporal"])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "CHECKPOINTING"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1] == "1", args.frames, args.latent, args.rank,
              args.repeat)
        return
    print(f"training step, full-size UNet, batch 1, {args.frames} frames, "
          f"{args.latent}x{args.latent} latents, fp32; MiB above the built model")
    print(f"{'mode':>9} {'ckpt':>5} {'trained':>12} {'seconds':>8} {'step MiB':>9} {'peak MiB':>9}")
    for mode in args.modes:
        for ckpt in ("0", "1"):
            r = measure_in_subprocess("t2v.bench.train_step", [
                mode, ckpt, "--frames", str(args.frames), "--latent", str(args.latent),
                "--rank", str(args.rank), "--repeat", str(args.repeat)])
            print(f"{mode:>9} {ckpt:>5} {r['trained']:>12,} {r['seconds']:>8.1f} "
                  f"{r['step_mib']:>9.0f} {r['peak_mib']:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
