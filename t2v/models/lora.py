"""LoRA adapters on the UNet through `peft`: add, save, load, scale, merge.

    add_lora(unet, rank=16, targets=["temporal_attention", "temporal_conv"])  # MotionDirector-like
    save_lora(unet, "motion.safetensors")
    load_lora(unet, "motion.safetensors", scale=0.8)        # adapters added, weights loaded
    merge_lora(unet)         # W += scale * (alpha / r) B A; a plain UNet again

File format (safetensors): peft's adapter keys without the adapter name, on t2v/diffusers
UNet module names, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`
(rank x in) and `...lora_B.weight` (out x rank); Conv3d adapters have conv-shaped A (r, in, 3, 1, 1)
and B (out, r, 1, 1, 1). Metadata: `format` "t2v-lora", `rank`, `alpha`, `targets` (JSON list of
the adapted module names). A consistency-distilled student's file (docs/few-step.md) also holds
its guidance-scale embedding in full, `time_embedding.cond_proj.weight`, with metadata
`guidance_embedding` (its width): loading it gives the UNet that embedding
(`add_guidance_embedding`) unscaled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from peft import (
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from t2v.atomic import atomic_path
from t2v.errors import UserError
from t2v.models.unet import add_guidance_embedding

EMBEDDING_KEY = "time_embedding.cond_proj.weight"  # a distilled student's guidance embedding

LORA_FORMAT = "t2v-lora"
ADAPTER = "default"
TARGET_PRESETS = {
    "attention": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    "temporal_attention": r"(^transformer_in\.|\.temp_attentions\.).*\.attn[12]\."
                          r"(to_q|to_k|to_v|to_out\.0)$",
    "temporal_conv": r"\.temp_convs\.\d+\.conv\d\.\d$",
}
ADAPTABLE = (nn.Linear, nn.Conv2d, nn.Conv3d)


def lora_target_names(unet: nn.Module, targets: list[str] | tuple[str, ...]) -> list[str]:
    """Names of the Linear/Conv modules matched by any preset or regex in `targets`."""
    regexes = [re.compile(TARGET_PRESETS.get(t, t)) for t in targets]
    names = [name for name, module in unet.named_modules()
             if isinstance(module, ADAPTABLE) and any(r.search(name) for r in regexes)]
    if not names:
        raise UserError(f"lora.targets {list(targets)} match no Linear or Conv layer of the UNet")
    return names


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None,
             targets: list[str] | tuple[str, ...] = ("attention", "temporal_conv"),
             dropout: float = 0.0, names: list[str] | None = None) -> list[str]:
    """Wrap the targeted layers with LoRA adapters (B zero: the output is unchanged), freeze
    everything else; returns the adapted module names. `names` overrides `targets`."""
    names = names if names is not None else lora_target_names(unet, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        lora_dropout=dropout, target_modules=list(names))
    inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    unet.lora_meta = {"rank": rank, "alpha": float(config.lora_alpha), "targets": list(names)}
    return list(names)


def lora_state_dict(unet: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The adapters' tensors of `unet` (or of `state_dict`, the UNet's full state: a sharded
    UNet's gathered one)."""
    return get_peft_model_state_dict(unet, state_dict=state_dict, adapter_name=ADAPTER)


def save_lora(unet: nn.Module, path: str | Path, overwrite: bool = False,
              state_dict: dict | None = None, guidance_embedding: bool = False) -> Path:
    """The adapters as safetensors (format in the module docstring), written atomically;
    `state_dict`: take the tensors from it instead of the module's own.
    `guidance_embedding`: also the UNet's guidance-scale embedding, in full."""
    meta = getattr(unet, "lora_meta", None)
    if meta is None:
        raise ValueError("the UNet has no LoRA adapters (add_lora first)")
    tensors = {k: v.detach().contiguous().cpu()
               for k, v in lora_state_dict(unet, state_dict).items()}
    metadata = {"format": LORA_FORMAT, "rank": str(meta["rank"]), "alpha": str(meta["alpha"]),
                "targets": json.dumps(meta["targets"])}
    if guidance_embedding:
        source = state_dict if state_dict is not None else unet.state_dict()
        tensors[EMBEDDING_KEY] = source[EMBEDDING_KEY].detach().contiguous().cpu()
        metadata["guidance_embedding"] = str(tensors[EMBEDDING_KEY].shape[1])
    with atomic_path(Path(path), overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata (rank, alpha, targets) of a LoRA file, checked."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: LoRA file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    if metadata.get("format") != LORA_FORMAT:
        raise UserError(f"{path}: not a t2v LoRA file (metadata format is "
                        f"{metadata.get('format')!r}, expected {LORA_FORMAT!r}); other tools' "
                        "LoRA files merge with TextToVideo.load_lora or --lora")
    try:
        meta = {"rank": int(metadata["rank"]), "alpha": float(metadata["alpha"]),
                "targets": json.loads(metadata["targets"]),
                "guidance_embedding": int(metadata.get("guidance_embedding") or 0)}
    except KeyError as exc:
        raise UserError(f"{path}: incomplete t2v LoRA metadata (no {exc.args[0]!r}); "
                        "re-save it with t2v.models.lora.save_lora") from None
    except ValueError as exc:
        raise UserError(f"{path}: unreadable t2v LoRA metadata ({exc})") from None
    return tensors, meta


def load_lora(unet: nn.Module, path: str | Path, scale: float = 1.0) -> list[str]:
    """Add the file's adapters to `unet` and load their weights; `scale` multiplies them. A
    file with a guidance-scale embedding gives `unet` that embedding (unscaled)."""
    tensors, meta = read_lora(path)
    dim = meta["guidance_embedding"]
    embedding = tensors.pop(EMBEDDING_KEY, None)
    if (embedding is None) != (dim == 0):
        raise UserError(f"{path}: its metadata and tensors disagree about a guidance embedding")
    if dim and getattr(unet.cfg, "time_cond_proj_dim", None) not in (None, dim):
        raise UserError(f"{path}: a guidance embedding of width {dim}, the UNet has one of "
                        f"width {unet.cfg.time_cond_proj_dim}")
    known = dict(unet.named_modules())
    missing = [n for n in meta["targets"] if n not in known]
    if missing:
        raise UserError(f"{path}: adapts layers this UNet does not have (e.g. {missing[0]}); "
                        "was it trained for another architecture?")
    names = add_lora(unet, meta["rank"], meta["alpha"], names=meta["targets"])
    expected = set(lora_state_dict(unet))
    if set(tensors) != expected:
        raise UserError(f"{path}: {len(set(tensors) ^ expected)} tensors do not match the "
                        "adapters its metadata declares")
    try:
        set_peft_model_state_dict(unet, tensors, adapter_name=ADAPTER)
    except RuntimeError as exc:  # shape mismatches from load_state_dict
        first = str(exc).strip().splitlines()[-1].strip()
        raise UserError(f"{path}: tensor shapes do not fit this UNet ({first})") from None
    set_lora_scale(unet, scale)
    if dim:
        if not unet.cfg.time_cond_proj_dim:
            add_guidance_embedding(unet, dim)
        with torch.no_grad():
            unet.time_embedding.cond_proj.weight.copy_(embedding)
    return names


def set_lora_scale(unet: nn.Module, scale: float) -> None:
    """Output = base + scale * (alpha / r) B A x, for every adapter."""
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(ADAPTER, scale)


def merge_lora(unet: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back, in place: the UNet
    is a plain UNet3D again (state-dict keys as before LoRA)."""
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.merge(adapter_names=[ADAPTER])
    return strip_lora(unet)


def strip_lora(unet: nn.Module) -> nn.Module:
    """Remove every adapter without merging it, in place: the plain layers back with the
    weights they had (e.g. after a file failed to load half-way)."""
    for name, module in list(unet.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, module.get_base_layer())
    for stale in ("lora_meta", "peft_config"):  # peft warns about a second adapter otherwise
        if hasattr(unet, stale):
            delattr(unet, stale)
    return unet


def parse_lora_arg(value: str) -> tuple[str, float]:
    """`PATH[:scale]` -> (path, scale); a Windows drive letter is not a scale."""
    path, sep, scale = value.rpartition(":")
    if sep and path and re.fullmatch(r"[-+]?\d*\.?\d+(e[-+]?\d+)?", scale):
        return path, float(scale)
    return value, 1.0
