"""Reading tensors from checkpoint files without running code from them.

- `.safetensors`: memory-mapped through `safetensors.safe_open`.
- `.bin` / `.pth` / `.ckpt` (pickles): `torch.load(weights_only=True)`, PyTorch's restricted
  unpickler, memory-mapped when the file is in the zip format. A global outside its allow-list
  (e.g. `os.system` in a malicious `__reduce__`) is refused before anything runs.
- Lightning checkpoints (ModelScope's `VQGAN_autoencoder.pth`) reference
  `pytorch_lightning.*` classes and numpy scalars. Those globals are admitted as inert stubs
  (an object that only stores its pickled state) and numpy's dtype/scalar constructors, and
  nothing else; pytorch_lightning need not be installed.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from t2v.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
LIGHTNING_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")


class WeightsError(UserError):
    """A weights file or folder cannot be used as it is."""


class InertStub:
    """Stands in for a class a checkpoint references but that we neither have nor need."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _numpy_globals() -> list:
    """numpy's dtype and scalar constructors under both numpy 1 and 2 module names."""
    from numpy._core import multiarray  # numpy >= 2

    allowed = [(np.dtype, "numpy.dtype"), (multiarray.scalar, "numpy.core.multiarray.scalar"),
               (multiarray.scalar, "numpy._core.multiarray.scalar")]
    allowed += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return allowed


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, memory-mapped."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc}); re-download or "
                           "re-convert it") from None


def safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None


def _torch_load(path: Path, allowed: list) -> Any:
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy format


def read_pickle(path: Path, lightning: bool = False) -> Any:
    """Unpickle tensors and containers only; `lightning=True` also admits Lightning stubs."""
    allowed: list = []
    try:
        if lightning:
            for name in torch.serialization.get_unsafe_globals_in_checkpoint(path):
                if name.startswith(LIGHTNING_PREFIXES):
                    stub = type(name.rsplit(".", 1)[1], (InertStub,), {})
                    allowed.append((stub, name))
            allowed += _numpy_globals()
        return _torch_load(path, allowed)
    except pickle.UnpicklingError:
        refused = _refused_globals(path, allowed)
        if not refused:  # torch's own message would advise weights_only=False: never that
            raise WeightsError(f"{path}: corrupt or not a PyTorch checkpoint") from None
        raise WeightsError(f"{path}: refused to unpickle: it references {', '.join(refused)}; "
                           "t2v loads only tensors and plain containers from pickles (use a "
                           "safetensors copy)") from None
    except (OSError, RuntimeError, EOFError, ValueError, struct.error) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        detail = "" if "weights_only" in str(exc) else f" ({first})"
        raise WeightsError(f"{path}: corrupt or not a PyTorch checkpoint{detail}") from None


def _refused_globals(path: Path, allowed: list) -> list[str]:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only used to word the error message
        return []
    admitted = {entry[1] for entry in allowed if isinstance(entry, tuple)}
    return [n for n in names if n not in admitted and not n.startswith("numpy.")]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one weights file, by its suffix."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        state = read_pickle(path)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"],
                                                                             dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                                  for v in state.values()):
            raise WeightsError(f"{path}: expected a dict of tensors")
        return dict(state)
    raise WeightsError(f"{path}: unknown weights format (expected .safetensors, .bin or .pth)")


def read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    """A `*.index.json` sharded checkpoint: read every shard its weight_map names."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsError(f"{index_path}: not a valid shard index ({exc})") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(read_state_dict(index_path.parent / shard))
    missing = [k for k in weight_map if k not in state]
    if missing:
        raise WeightsError(f"{index_path}: shards lack {', '.join(missing[:5])}")
    return state
