"""T2V-Turbo (MS) LoRA files: the 4-step consistency-distilled LoRA for text-to-video-ms-1.7b
(Li et al. 2024, arXiv:2405.18750; `unet_lora.pt` of the hub repo jiachenli-ucsb/T2V-Turbo-MS),
merged as its authors' inference code (app_ms.py of Ji4chenLi/t2v-turbo) merges it.

The file is `torch.save` of a plain list of tensors, [up_0, down_0, up_1, down_1, ...], no names
(cloneofsimo's lora.py `save_lora_weight`). Their loader (`inject_trainable_lora_extended`) walks
the whole `UNet3DConditionModel(time_cond_proj_dim=256)` in module registration order and pairs
the tensors, by position only, with every module whose class is exactly nn.Linear, nn.Conv2d or
nn.Conv3d; `collapse_lora` then merges W += up @ down (convolutions: the flattened product
reshaped to W), with no alpha / rank factor. Rank 32, fewer where a layer is narrower (conv_in,
conv_out: 4): read from the tensors' shapes here.

That order is diffusers': conv_in, time_embedding (linear_1, cond_proj, linear_2),
transformer_in, the down blocks, the UP blocks, then the mid block (registered after them), then
conv_out; inside the blocks t2v's UNet3D registers its layers in diffusers' order
(tests/test_lora_formats.py checks both against diffusers' own module list).

The guidance-scale embedding: their student UNet is built with time_cond_proj_dim=256 and loads
the teacher's weights with strict=False, so cond_proj's own weight is whatever PyTorch's
default initialisation drew (unseeded: it differs from one process to the next) plus the file's
LoRA delta. No file holds that base weight; t2v gives the UNet a zero base (its expected
value), so cond_proj = up @ down (docs/few-step.md, "T2V-Turbo (MS)").
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from t2v.errors import UserError
from t2v.models.unet import add_guidance_embedding

GUIDANCE_EMBEDDING = 256  # T2V-Turbo's time_cond_proj_dim
POSITIONAL = (nn.Linear, nn.Conv2d, nn.Conv3d)  # the classes their loader adapts (exact types)
TOP_ORDER = ("conv_in", "time_embedding", "transformer_in", "down_blocks", "up_blocks",
             "mid_block", "conv_out")
TIME_EMBEDDING_ORDER = ("linear_1", "cond_proj", "linear_2")


def positional_modules(unet: nn.Module, extra: tuple[str, ...] = ()) -> list[str]:
    """The names of `unet`'s layers (and of the `extra` ones it is about to get) in the order
    a T2V-Turbo file lists them (the module docstring): exact Linear / Conv2d / Conv3d modules
    in diffusers' registration order."""
    def order(item):
        position, name = item
        head, _, rest = name.partition(".")
        sub = TIME_EMBEDDING_ORDER.index(rest) if head == "time_embedding" else 0
        return TOP_ORDER.index(head), sub, position

    names = [n for n, m in unet.named_modules() if type(m) in POSITIONAL] + list(extra)
    return [n for _, n in sorted(enumerate(names), key=order)]


def is_positional_list(state) -> bool:
    """A list or tuple of tensors with an even count (pairs of up, down)."""
    return isinstance(state, (list, tuple)) and len(state) > 0 and len(state) % 2 == 0 and \
        all(isinstance(t, torch.Tensor) for t in state)


def merge_t2v_turbo(path: Path, tensors: list[torch.Tensor], unet: nn.Module,
                    scale: float = 1.0) -> list[str]:
    """Merge a T2V-Turbo list into `unet` (giving it the guidance-scale embedding first if it
    has none): W += scale * up @ down for every listed layer. Every pair is checked against its
    layer before any weight changes; returns the changed layer names."""
    dim = unet.cfg.time_cond_proj_dim
    if dim not in (None, GUIDANCE_EMBEDDING):
        raise UserError(f"{path}: T2V-Turbo's guidance embedding is {GUIDANCE_EMBEDDING} wide, "
                        f"the UNet has one of width {dim}")
    embedding = None
    if dim is None:  # checked on a copy of the names: the UNet changes only after the checks
        embedding = nn.Linear(GUIDANCE_EMBEDDING, unet.time_embedding.linear_1.in_features,
                              bias=False, device="meta")
    modules = dict(unet.named_modules())
    if embedding is not None:
        modules["time_embedding.cond_proj"] = embedding
    names = positional_modules(unet, () if embedding is None else ("time_embedding.cond_proj",))
    if len(tensors) != 2 * len(names):
        raise UserError(f"{path}: {len(tensors)} tensors, but a T2V-Turbo file for this UNet "
                        f"holds {2 * len(names)} ({len(names)} layers x (up, down)); is it for "
                        "another model?")
    deltas = []
    for i, name in enumerate(names):
        up, down = tensors[2 * i], tensors[2 * i + 1]
        weight = modules[name].weight
        if up.shape[0] != weight.shape[0] or down.shape[1] != weight.shape[1] or \
                up.shape[1] != down.shape[0] or up[0].numel() != up.shape[1] or \
                down[0, 0].numel() != weight[0, 0].numel():
            raise UserError(f"{path}: pair {i} (up {tuple(up.shape)}, down "
                            f"{tuple(down.shape)}) does not fit layer {name} "
                            f"{tuple(weight.shape)}")
        deltas.append((name, (up.flatten(1).double() @ down.flatten(1).double())
                       .reshape(weight.shape)))
    if embedding is not None:
        add_guidance_embedding(unet, GUIDANCE_EMBEDDING)
        modules = dict(unet.named_modules())
    with torch.no_grad():
        for name, delta in deltas:
            weight = modules[name].weight
            weight.add_((scale * delta).to(weight.dtype))
    return names
