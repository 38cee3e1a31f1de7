"""Guidance-parallel sampling: the two UNet passes of classifier-free guidance on two processes.

    rank 0: u = UNet(x, t, uncond)        rank 1: c = UNet(x, t, cond)
    [u, c] = all_gather(own output)        (one latent-sized tensor per rank per call)
    eps = guide(u, c, g, phi)              on both ranks, identically (t2v.sampling.guidance)

xDiT's "CFG parallel" and DistriFusion split guidance this way. Both ranks run the same
sampler code on the same x and draw the same noise (one shared seed), so their latents stay
identical step after step; only the UNet work is divided. Everything that only calls the
denoiser (windows, prompt travel, FreeInit, first-frame conditioning, video-to-video, every
sampler) works unchanged. Each UNet call runs on batch B instead of 2B, and oneDNN's kernels
choose their blocking by batch size, so outputs match one process up to float rounding (the
measured differences: tests/test_guidance_parallel.py), not bit for bit.

Needs the default process group (or `group`) of exactly 2 ranks, e.g. under
`torchrun --nproc_per_node 2`: gloo on the CPU, NCCL on GPUs (`init`).
"""

from __future__ import annotations

import random
from typing import Callable

import torch
import torch.distributed as dist

from t2v.errors import UserError
from t2v.sampling.freeu import FreeU
from t2v.sampling.guidance import guide
from t2v.sampling.unet_call import unet_call

RANKS = 2  # rank 0: the unconditional pass, rank 1: the conditional one


def check_scale(guidance_scale: float) -> None:
    if guidance_scale <= 1.0:
        raise UserError(f"guidance_parallel splits the two passes of guidance, but "
                        f"guidance_scale {guidance_scale:g} <= 1 runs only one; drop "
                        "guidance_parallel or raise the guidance")


def check(guidance_scale: float, group=None) -> None:
    """Refuse (one-line UserError) what guidance-parallel sampling cannot run: guidance off,
    no process group, or one of another size than 2."""
    check_scale(guidance_scale)
    if not (dist.is_available() and dist.is_initialized()):
        raise UserError("guidance_parallel needs a process group of 2 processes: run under "
                        "torchrun --nproc_per_node 2 and init_process_group first (the CLI "
                        "does)")
    world = dist.get_world_size(group)
    if world != RANKS:
        raise UserError(f"guidance_parallel needs exactly {RANKS} processes, got {world}")


def init(device: torch.device) -> None:
    """The default process group from torchrun's environment: NCCL on GPUs, gloo on the CPU."""
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def shared_seed(group=None) -> int:
    """A random seed drawn on rank 0 and sent to every rank (one seed, the same noise)."""
    seed = torch.tensor([random.randrange(2**31) if dist.get_rank(group) == 0 else 0])
    dist.broadcast(seed, group=group, group_src=0)
    return int(seed)


def gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on every rank), in rank order."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return parts


def check_same(x: torch.Tensor, what: str, group=None) -> None:
    """Refuse to start when the ranks disagree on `x` (different seeds, generators or
    latents would make their samplers drift apart)."""
    parts = gather(x, group)
    if not all(torch.equal(parts[0], p) for p in parts[1:]):
        raise UserError(f"guidance_parallel: the ranks have different {what}; give every rank "
                        "the same seed (or generator, latents and inputs)")


def guided_denoiser(unet: torch.nn.Module, context: torch.Tensor, guidance_scale: float,
                    frame_chunk: int | None, guidance_rescale: float = 0.0,
                    group=None, freeu: FreeU | None = None
                    ) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """t2v.pipeline.text_to_video.TextToVideo.guided_denoiser with the passes split over the 2 ranks:
    `context` is [uncond; cond] (2B, L, D); this rank runs its half on batch B and receives
    the other half. Every rank must call the result in the same order with the same x, t.
    `frame_chunk` (None or 0: off) and `freeu` shape the UNet call (t2v.sampling.unet_call)."""
    check(guidance_scale, group)
    part = context.chunk(RANKS)[dist.get_rank(group)]  # rank 0 uncond, rank 1 cond
    call = unet_call(unet, frame_chunk=frame_chunk or None, freeu=freeu)

    def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
        eps = call(x.to(unet.conv_in.weight.dtype), t, part)
        uncond, cond = gather(eps.to(x.dtype), group)
        return guide(uncond, cond, guidance_scale, guidance_rescale)

    return denoise
