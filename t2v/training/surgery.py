"""Model surgery on UNet3D: inflating an image UNet, freezing by name, parameter summaries and
activation capture.

Inflation: a Stable Diffusion 2.x image UNet (diffusers `UNet2DConditionModel`, linear
projections, 64-wide heads) has exactly UNet3D's spatial parameters under the same names; the
temporal layers (`transformer_in`, every `temp_convs.*` and `temp_attentions.*`) are new. They
start as the identity: each is a residual block, so zeroing its last projection (`conv4` of a
temporal conv, `proj_out` of a temporal transformer) makes it return its input. The inflated
UNet then equals the image UNet applied to every frame, and fine-tuning the temporal layers
teaches it motion (the recipe of ModelScope's and AnimateDiff's temporal modules).
"""

from __future__ import annotations

import re
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
import torch.nn as nn

from t2v.config import UNetConfig
from t2v.errors import UserError
from t2v.loading.weights import diffusers_component_weights
from t2v.models.unet import UNet3D
from weights_convert.table import check_shapes

TEMPORAL = re.compile(r"(^transformer_in\.|\.temp_convs\.|\.temp_attentions\.)")
GROUPS = ("temporal", "spatial", "text", "vae", "lora")


def is_temporal(name: str) -> bool:
    return TEMPORAL.search(name) is not None


def inflate(image: Mapping[str, torch.Tensor] | str | Path, cfg: UNetConfig) -> UNet3D:
    """A UNet3D from an image UNet (diffusers UNet2DConditionModel keys): its state dict, or
    its diffusers folder (`unet/` of an SD 2.x repo: safetensors or .bin, read safely). The
    temporal layers start as the identity (last layers zero, the rest default init)."""
    if isinstance(image, (str, Path)):
        folder = Path(image)
        if not folder.is_dir():
            raise UserError(f"{folder}: not a folder (give the image UNet's diffusers folder)")
        image = diffusers_component_weights(folder, ("diffusion_pytorch_model",), None)
    image_state = image
    unet = UNet3D(cfg)
    spatial = {k: v.shape for k, v in unet.state_dict().items() if not is_temporal(k)}
    check_shapes(image_state, spatial, "image UNet state dict")
    unet.load_state_dict(dict(image_state), strict=False)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("conv4"):  # TemporalConv's last stage
                module[-1].weight.zero_()
                module[-1].bias.zero_()
            elif is_temporal(name + ".") and name.endswith("proj_out"):
                module.weight.zero_()
                module.bias.zero_()
    return unet.eval()


def set_trainable(module: nn.Module, patterns: list[str], trainable: bool = True) -> list[str]:
    """requires_grad = `trainable` for parameters whose name matches any regex in `patterns`
    (re.search), the opposite for the others; returns the matching names.
    Presets: "temporal" (`TEMPORAL`), "attention" (`attn`), "all" (`.`)."""
    presets = {"temporal": TEMPORAL.pattern, "attention": r"\.attn[12]\.", "all": r"."}
    regexes = [re.compile(presets.get(p, p)) for p in patterns]
    matched = []
    for name, p in module.named_parameters():
        hit = any(r.search(name) for r in regexes)
        p.requires_grad_(trainable if hit else not trainable)
        if hit:
            matched.append(name)
    if not matched:
        raise ValueError(f"no parameter matches {patterns}")
    return matched


def parameter_summary(**modules: nn.Module) -> dict[str, dict[str, int]]:
    """Parameter counts (total, trainable) by group: temporal / spatial UNet layers, text
    encoder, VAE and LoRA (names containing `lora_`). Pass modules by role, e.g.
    `parameter_summary(unet=unet, text_encoder=te, vae=vae)`."""
    summary: dict[str, dict[str, int]] = defaultdict(lambda: {"total": 0, "trainable": 0})
    for role, module in modules.items():
        for name, p in module.named_parameters():
            if "lora_" in name:
                group = "lora"
            elif role == "unet":
                group = "temporal" if is_temporal(name) else "spatial"
            else:
                group = {"text_encoder": "text", "vae": "vae"}.get(role, role)
            summary[group]["total"] += p.numel()
            summary[group]["trainable"] += p.numel() if p.requires_grad else 0
    return dict(summary)


@contextmanager
def capture(module: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of named submodules (the state-dict prefixes, e.g.
    `up_blocks.2.temp_attentions.1`) during the `with` block: for each, its output in the
    last forward call of `module`. A submodule that runs in parts within one call (the
    UNet's frame chunks) has its parts concatenated along the first axis, in call order,
    which is the order of their rows."""
    found = dict(module.named_modules())
    missing = [n for n in names if n not in found]
    if missing:
        raise KeyError(f"no submodule named {', '.join(missing)}")
    captured: dict[str, torch.Tensor] = {}
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def record(name: str, out: torch.Tensor) -> None:
        parts[name].append(out.detach())
        captured[name] = parts[name][0] if len(parts[name]) == 1 else torch.cat(parts[name])

    def new_call(m, args) -> None:
        for name in names:
            parts[name] = []

    hooks = [module.register_forward_pre_hook(new_call)]
    hooks += [found[n].register_forward_hook(lambda m, args, out, n=n: record(n, out))
              for n in names]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()
