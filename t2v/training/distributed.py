"""The processes of a run: rank, world size, device and the process group (torchrun), and the
seed of each process's global RNG."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from t2v.errors import UserError


def global_seed(seed: int, rank: int) -> int:
    """The seed of this process's global torch RNG: distinct per (seed, rank)."""
    return int(np.random.SeedSequence([seed, rank, 0x7E]).generate_state(1, dtype=np.uint64)[0]
               >> 1)


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
