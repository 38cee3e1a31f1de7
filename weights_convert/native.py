"""Writing t2v's native layout: `model.yaml` + one safetensors file per component.

    text_encoder.safetensors  unet.safetensors  vae.safetensors   (t2v keys = diffusers' keys)
    model.yaml                                                     (the ModelConfig, written last)

Each safetensors file also carries its component's config as JSON metadata (`t2v_config`).
`t2v.loading.weights` reads the layout; `python -m weights_convert` and the trainer write it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import torch
import yaml
from safetensors.torch import save_file

from t2v import __version__
from t2v.config import ModelConfig, config_to_dict

COMPONENTS = ("text_encoder", "unet", "vae")
NATIVE_CONFIG = "model.yaml"

def owned(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous tensor with storage of its own (safetensors refuses shared storage), cast
    to `dtype` if it is floating point."""
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def save_native(folder: Path, cfg: ModelConfig, states: Mapping[str, Mapping[str, torch.Tensor]],
                dtype: torch.dtype | None = None,
                progress: Callable[[str, int, int], None] | None = None) -> list[Path]:
    """Write one safetensors file per component (config in its metadata), then `model.yaml`
    (last: a folder without it is not taken for a native checkpoint). `states` hold t2v keys;
    returns the files written. The folder must exist; callers write into a temporary folder
    renamed into place (`t2v.atomic.atomic_path`)."""
    written = []
    for name in COMPONENTS:
        path = folder / f"{name}.safetensors"
        tensors = {k: owned(v, dtype) for k, v in states[name].items()}
        metadata = {"format": "pt", "t2v_component": name, "t2v_version": __version__,
                    "t2v_config": json.dumps(config_to_dict(getattr(cfg, name)))}
        save_file(tensors, str(path), metadata=metadata)
        written.append(path)
        if progress is not None:
            progress(name, len(tensors), path.stat().st_size)
    (folder / NATIVE_CONFIG).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return [folder / NATIVE_CONFIG, *written]
