"""Loading real checkpoints in every layout: t2v's native folder, diffusers folders and the
original ModelScope files, from a local folder or a Hugging Face hub repo id.

    models = load_models("ali-vilab/text-to-video-ms-1.7b", dtype=torch.float16)
    models.unet, models.vae, models.text_encoder, models.config

Layouts (detected from the files, see docs/weights.md):

- native: `model.yaml` (the ModelConfig) + `text_encoder.safetensors`, `unet.safetensors`,
  `vae.safetensors`, each with its section of the config in the safetensors metadata;
- diffusers: `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `scheduler/`, weights as
  `.safetensors` or `.bin`, plain or a variant such as `fp16`, optionally sharded;
- modelscope: `configuration.json`, `text2video_pytorch_model.pth`, `VQGAN_autoencoder.pth`
  (a Lightning checkpoint), `open_clip_pytorch_model.bin`; converted on the fly.

Models are built on the meta device and take the loaded tensors with `assign=True`, so loading
allocates the weights once (memory-mapped where the format allows), never a random copy first.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import yaml

from t2v.config import ModelConfig, ScheduleConfig, UNetConfig, config_from_dict
from t2v.loading.checkpoint_io import (
    WeightsError,
    read_pickle,
    read_sharded,
    read_state_dict,
    safetensors_metadata,
)
from t2v.models.text_encoder import TextEncoder
from t2v.models.unet import UNet3D
from t2v.models.vae import AutoencoderKL
from weights_convert import diffusers as from_diffusers
from weights_convert import modelscope as from_modelscope
from weights_convert import open_clip as from_open_clip

# The native layout's writer lives with the other writers; these names stay importable here.
from weights_convert.native import COMPONENTS, NATIVE_CONFIG, owned, save_native  # noqa: F401
from weights_convert.table import check_shapes

log = logging.getLogger(__name__)

# The demo model trained by t2v on procedural clips (docs/demo.md), shipped in the package.
DEMO_SOURCE = "t2v:demo"
DEMO_FOLDER = Path(__file__).resolve().parents[1] / "demo" / "model"
MODELSCOPE_FILES = {"ckpt_unet": "text2video_pytorch_model.pth",
                    "ckpt_autoencoder": "VQGAN_autoencoder.pth",
                    "ckpt_clip": "open_clip_pytorch_model.bin"}
EXPECTED_LAYOUTS = (
    f"native ({NATIVE_CONFIG}, unet.safetensors, vae.safetensors, text_encoder.safetensors), "
    "diffusers (model_index.json, unet/, vae/, text_encoder/) or ModelScope (configuration.json, "
    + ", ".join(MODELSCOPE_FILES.values()) + ")")


@dataclass
class LoadedModels:
    config: ModelConfig
    text_encoder: TextEncoder
    unet: UNet3D
    vae: AutoencoderKL
    layout: str
    folder: Path


# ---------------------------------------------------------------------------------------------
# Finding the files


def detect_layout(folder: Path) -> str:
    if (folder / NATIVE_CONFIG).is_file():
        return "native"
    if (folder / "model_index.json").is_file() or (folder / "unet" / "config.json").is_file():
        return "diffusers"
    if (folder / "configuration.json").is_file() or \
            (folder / MODELSCOPE_FILES["ckpt_unet"]).is_file():
        return "modelscope"
    raise WeightsError(f"{folder}: no known weights layout; expected {EXPECTED_LAYOUTS}")


def _hub_patterns(variant: str | None) -> list[str]:
    """Files to fetch from a hub repo: configs, the tokenizer, and one precision/format of the
    weights (safetensors preferred; .bin only where a component has no safetensors)."""
    suffix = f".{variant}" if variant else ""
    return ["*.json", "*.yaml", "*.txt",
            NATIVE_CONFIG, "text_encoder.safetensors", "unet.safetensors", "vae.safetensors",
            f"*/diffusion_pytorch_model{suffix}.safetensors*", f"*/model{suffix}.safetensors*",
            *MODELSCOPE_FILES.values()]


def resolve_source(source: str | Path, revision: str | None = None, variant: str | None = None,
                   local_files_only: bool | None = None) -> Path:
    """A local folder as it is; DEMO_SOURCE ("t2v:demo") the demo model shipped in the package;
    anything else is a hub repo id fetched into (or found in) the standard Hugging Face cache.
    HF_HUB_OFFLINE=1 or `local_files_only` never touch the net."""
    if str(source) == DEMO_SOURCE:
        if not (DEMO_FOLDER / NATIVE_CONFIG).is_file():
            raise WeightsError(f"{source}: the demo model is missing from this installation "
                               f"({DEMO_FOLDER}); reinstall t2v")
        return DEMO_FOLDER
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise WeightsError(f"{source}: no such folder, and not a hub repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = local_files_only if local_files_only is not None else \
        os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        folder = Path(snapshot_download(text, revision=revision, local_files_only=offline,
                                        allow_patterns=_hub_patterns(variant)))
        if detect_layout(folder) == "diffusers" and not _has_safetensors(folder, variant):
            # Some repos (zeroscope) ship only pickles: fetch those, still one precision.
            suffix = f".{variant}" if variant else ""
            folder = Path(snapshot_download(
                text, revision=revision, local_files_only=offline,
                allow_patterns=[f"*/diffusion_pytorch_model{suffix}.bin*",
                                f"*/pytorch_model{suffix}.bin*"]))
        return folder
    except LocalEntryNotFoundError:
        why = "downloads are off (HF_HUB_OFFLINE / local_files_only)" if offline else \
            "the hub could not be reached"
        raise WeightsError(f"{source}: no local folder {path.resolve()}, and as a hub repo id "
                           f"not in the local Hugging Face cache and {why}; check the path, "
                           "or download the repo once online") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise WeightsError(f"{source}: no local folder {path.resolve()}, and as a hub repo id: "
                           f"cannot fetch from the hub: {str(exc).splitlines()[0]}") from None


def _has_safetensors(folder: Path, variant: str | None) -> bool:
    suffix = f".{variant}" if variant else ""
    return (folder / "unet" / f"diffusion_pytorch_model{suffix}.safetensors").exists() or \
        (folder / "unet" / f"diffusion_pytorch_model{suffix}.safetensors.index.json").exists()


# ---------------------------------------------------------------------------------------------
# Reading each layout into (ModelConfig, {component: state dict with t2v keys})


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: file not found") from None
    except ValueError as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})") from None


def read_native(folder: Path) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]]]:
    try:
        data = yaml.safe_load((folder / NATIVE_CONFIG).read_text())
    except yaml.YAMLError:
        raise WeightsError(f"{folder / NATIVE_CONFIG}: not valid YAML") from None
    if isinstance(data, dict) and isinstance(data.get("unet"), dict):
        data = {**data, "unet": UNetConfig.drop_removed(data["unet"], str(folder / NATIVE_CONFIG))}
    cfg = config_from_dict(ModelConfig, data, str(folder / NATIVE_CONFIG))
    states = {}
    for name in COMPONENTS:
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            raise WeightsError(f"{path}: file not found (a native folder holds "
                               f"{', '.join(c + '.safetensors' for c in COMPONENTS)})")
        stored = safetensors_metadata(path).get("t2v_config")
        part = getattr(cfg, name)  # compared as configs: keys added later take defaults
        if stored is not None:
            stored = json.loads(stored)
            if name == "unet":  # keys removed later: dropped when off
                stored = UNetConfig.drop_removed(stored, f"{path} metadata")
            if config_from_dict(type(part), stored, f"{path} metadata") != part:
                raise WeightsError(f"{path}: its config metadata disagrees with "
                                   f"{NATIVE_CONFIG}")
        states[name] = read_state_dict(path)
    return cfg, states


def diffusers_component_weights(folder: Path, stems: tuple[str, ...], variant: str | None
                                ) -> dict[str, torch.Tensor]:
    """One component's tensors: safetensors before .bin, the variant if asked (or if it is
    the only one there), shards through their index."""
    variants = [variant] if variant else [None, "fp16"]
    for v in variants:
        suffix = f".{v}" if v else ""
        for stem in stems:  # e.g. ("diffusion_pytorch_model",) or ("model", "pytorch_model")
            for ext in (".safetensors", ".bin"):
                single = folder / f"{stem}{suffix}{ext}"
                if single.is_file():
                    if v and not variant:
                        log.info("%s: using the %s variant (the only weights there)", folder, v)
                    return read_state_dict(single)
                index = folder / f"{stem}{suffix}{ext}.index.json"
                if index.is_file():
                    return read_sharded(index)
    wanted = f" variant {variant!r}" if variant else ""
    raise WeightsError(f"{folder}: no weights{wanted} found (looked for "
                       f"{stems[0]}[.{variant or 'fp16'}].safetensors / .bin)")


def read_diffusers(folder: Path, variant: str | None = None
                   ) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]]]:
    schedule_path = folder / "scheduler" / "scheduler_config.json"
    cfg = ModelConfig(
        text_encoder=from_diffusers.text_encoder_config(
            _read_json(folder / "text_encoder" / "config.json")),
        unet=from_diffusers.unet_config(_read_json(folder / "unet" / "config.json")),
        vae=from_diffusers.vae_config(_read_json(folder / "vae" / "config.json")),
        schedule=from_diffusers.schedule_config(_read_json(schedule_path))
        if schedule_path.is_file() else ScheduleConfig(),
    )
    unet_stems = ("diffusion_pytorch_model",)
    states = {
        "text_encoder": from_diffusers.text_encoder_from_transformers(
            diffusers_component_weights(folder / "text_encoder", ("model", "pytorch_model"),
                                        variant)),
        "unet": diffusers_component_weights(folder / "unet", unet_stems, variant),
        "vae": from_diffusers.vae_from_diffusers(
            diffusers_component_weights(folder / "vae", unet_stems, variant)),
    }
    return cfg, states


def read_modelscope(folder: Path) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]]]:
    config_path = folder / "configuration.json"
    model = _read_json(config_path).get("model", {}) if config_path.is_file() else {}
    files = {**MODELSCOPE_FILES, **{k: v for k, v in model.get("model_args", {}).items()
                                    if k in MODELSCOPE_FILES}}
    unet_cfg = from_modelscope.unet_config_from_modelscope(model["model_cfg"]) \
        if "model_cfg" in model else UNetConfig()
    num_timesteps = int(model.get("model_cfg", {}).get("num_timesteps", 1000))

    unet_state = read_state_dict(folder / files["ckpt_unet"])
    vae_path = folder / files["ckpt_autoencoder"]
    if not vae_path.is_file():
        raise WeightsError(f"{vae_path}: file not found")
    lightning = read_pickle(vae_path, lightning=True)
    vae_state = lightning.get("state_dict", lightning) if isinstance(lightning, dict) else None
    if not isinstance(vae_state, dict):
        raise WeightsError(f"{vae_path}: expected a Lightning checkpoint with a state_dict")
    prefix = from_modelscope.LDM_PREFIX
    bare = {k[len(prefix):]: v for k, v in vae_state.items() if k.startswith(prefix)} \
        if any(k.startswith(prefix) for k in vae_state) else vae_state
    clip_state = read_state_dict(folder / files["ckpt_clip"])

    cfg = ModelConfig(
        text_encoder=from_open_clip.text_encoder_config_from_state(clip_state),
        unet=unet_cfg,
        vae=from_modelscope.vae_config_from_state(bare),
        # ModelScope's GaussianDiffusion: linear_sd betas 0.00085 -> 0.012, eps prediction,
        # DDIM timesteps 1 + k * stride (steps_offset 1), last step to alphas_cumprod[0].
        schedule=ScheduleConfig(num_train_timesteps=num_timesteps),
    )
    states = {
        "text_encoder": from_open_clip.text_encoder_from_open_clip(clip_state, cfg.text_encoder),
        "unet": from_modelscope.unet_from_modelscope(unet_state, cfg.unet),
        "vae": from_modelscope.vae_from_modelscope(bare, cfg.vae),
    }
    return cfg, states


def read_checkpoint(folder: Path, variant: str | None = None, layout: str | None = None
                    ) -> tuple[str, ModelConfig, dict[str, dict[str, torch.Tensor]]]:
    """Read a folder in `layout` (detected when None): (layout, ModelConfig, state dicts with
    t2v keys)."""
    layout = layout or detect_layout(folder)
    if layout == "native":
        return layout, *read_native(folder)
    if layout == "diffusers":
        return layout, *read_diffusers(folder, variant)
    return layout, *read_modelscope(folder)


# ---------------------------------------------------------------------------------------------
# Building the modules


def build(factory: Callable[[], torch.nn.Module], state: Mapping[str, torch.Tensor],
          what: str, dtype: torch.dtype | None = None,
          device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build on the meta device, check keys and shapes strictly, then adopt the tensors."""
    with torch.device("meta"):
        module = factory()
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_shapes(state, expected, what)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(device).eval()


def load_models(source: str | Path, *, revision: str | None = None, variant: str | None = None,
                dtype: torch.dtype | None = None, vae_dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu",
                local_files_only: bool | None = None) -> LoadedModels:
    """Text encoder, UNet and VAE (eval mode) with their config, from any supported layout.

    `dtype` casts floating-point weights while loading (None keeps the stored dtype);
    `vae_dtype` overrides it for the VAE (e.g. float32 next to a float16 UNet).
    """
    folder = resolve_source(source, revision, variant, local_files_only)
    layout, cfg, states = read_checkpoint(folder, variant)
    log.info("loading %s (%s layout)", folder, layout)
    return LoadedModels(
        config=cfg,
        text_encoder=build(lambda: TextEncoder(cfg.text_encoder), states["text_encoder"],
                           f"{folder}: text encoder", dtype, device),
        unet=build(lambda: UNet3D(cfg.unet), states["unet"], f"{folder}: UNet", dtype, device),
        vae=build(lambda: AutoencoderKL(cfg.vae), states["vae"], f"{folder}: VAE",
                  vae_dtype or dtype, device),
        layout=layout, folder=folder)
