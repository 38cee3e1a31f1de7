"""The original ModelScope classes, loaded from the installed `modelscope` package by file path.

Importing `modelscope.models...` runs the package's __init__, which needs the heavy
`framework` extra; the three leaf files need only torch, einops and numpy
(docs/architecture.md, "Reference facts").
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path


@lru_cache()
def modelscope_module(name: str):
    """`unet_sd`, `autoencoder` or `diffusion` from modelscope's video_synthesis folder."""
    spec = importlib.util.find_spec("modelscope")
    folder = Path(spec.submodule_search_locations[0]) / "models/multi_modal/video_synthesis"
    module_name = f"_modelscope_reference_{name}"
    file_spec = importlib.util.spec_from_file_location(module_name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[module_name] = module
    file_spec.loader.exec_module(module)
    return module
