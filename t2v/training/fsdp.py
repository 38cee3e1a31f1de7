"""train.strategy=fsdp: the UNet sharded over the processes with FSDP2, and its checkpoints.

PyTorch's engine does the work: `torch.distributed.fsdp.fully_shard` on every UNet block
(down blocks, mid block, up blocks) and then on the root (time embedding, conv_in,
transformer_in, the output layers), on a one-dimensional `DeviceMesh` of all processes. Each
rank keeps 1/N of every parameter as a float32 `DTensor` shard, its gradient shard and AdamW
state; a block's full weights exist only while it runs (gathered in `param_dtype`: bf16 on GPUs,
float32 on the CPU by default), and gradients are reduce-scattered in `reduce_dtype` (float32 by
default) and averaged.

    gather block weights (all-gather, param_dtype) -> forward -> free        per block
    gather again -> backward -> reduce-scatter gradients (mean, reduce_dtype) -> free
    AdamW on the local float32 shards

Checkpoints go through `torch.distributed.checkpoint` (DCP): every rank writes its shards of the
model, the optimizer state and the EMA, and a later run loads them onto any number of processes
(DCP reshards). The final model is gathered to rank 0 for the native folder or LoRA file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from t2v.errors import UserError

log = logging.getLogger("t2v.training.fsdp")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fsdp_param_dtype(name: str, device: torch.device) -> str:
    """train.fsdp.param_dtype "auto": bfloat16 on GPUs, float32 on the CPU.

    On the CPU (torch 2.14) a backward pass of this UNet with bf16 weights and activations gave
    non-finite gradient norms in some runs and not in others, with and without FSDP; float32
    is right every time (tests/test_fsdp.py), so CPU runs compute in float32 unless asked."""
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if device.type == "cpu" and name != "float32":
        log.warning("train.fsdp.param_dtype=%s on the CPU: bf16 backward passes gave "
                    "non-finite gradients in some runs with torch 2.14 (docs/finetuning.md)",
                    name)
    return name


def shard_unet(unet: torch.nn.Module, device: torch.device, fsdp_cfg) -> None:
    """fully_shard every block, then the root, over all processes of the default group
    (in place: parameters become float32 DTensor shards)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    param_dtype = fsdp_param_dtype(fsdp_cfg.param_dtype, device)
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype],
                                  reduce_dtype=DTYPES[fsdp_cfg.reduce_dtype])
    reshard = fsdp_cfg.reshard_after_forward
    if dist.get_world_size() > 1:
        # Rank 0's weights everywhere first, as DDP does at construction: each rank shards its
        # own copy, and weights drawn after the per-rank reseed (LoRA's A) differ per rank.
        with torch.no_grad():
            for tensor in [*unet.parameters(), *unet.buffers()]:
                dist.broadcast(tensor.data, src=0)
    for block in unet.blocks():  # one all-gather each
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    # The root's weights are needed again at once by backward: kept after forward.
    fully_shard(unet, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the same storage), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for sharded parameters, on the local shards: the total
    2-norm from the squared norms of every rank's gradient shards (one all-reduce), then every
    shard times min(1, max_norm / (norm + 1e-6)), torch's coefficient. Returns the norm.

    torch's own function runs foreach ops on the DTensors, whose sharding propagation is
    quadratic in the number of tensors: 8.4 s per step for the tiny UNet of tests/test_fsdp.py
    on the CPU (torch 2.14), against milliseconds here."""
    grads = [local(p.grad).detach() for p in params if p.grad is not None]
    squares = torch.nn.utils.get_total_norm(grads).float() ** 2  # this rank's shards
    dist.all_reduce(squares)
    norm = squares.sqrt()
    if grads:
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coefficient.to(grads[0].dtype))
    return norm


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value on every rank (a collective), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on rank 0 (on the CPU, one tensor at a time), {} elsewhere.
    A collective: every rank calls it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def _state(model, optimizer, averages: dict[str, dict | None]) -> dict:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    state.update({name: values for name, values in averages.items() if values is not None})
    return state


def save_sharded(folder: Path, model, optimizer, averages: dict[str, dict | None]) -> None:
    """Every rank writes its shards of the model, AdamW state and the averaged weights
    (`averages`: {"ema": ..., "target": ...}, None entries left out) into `folder` (DCP)."""
    dcp.save(_state(model, optimizer, averages), checkpoint_id=str(folder))


def load_sharded(folder: Path, model, optimizer, averages: dict[str, dict | None]) -> None:
    """The shards of `folder` into this run's model, optimizer and averaged weights (in
    place), whatever number of processes wrote them."""
    state = _state(model, optimizer, averages)
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except Exception as exc:  # DCP reports a missing key as a CheckpointException per rank
        first = str(exc).strip().splitlines()
        raise UserError(f"train.resume {folder}: the sharded checkpoint does not fit this run's "
                        f"model or trained parameters ({first[-1] if first else exc})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
