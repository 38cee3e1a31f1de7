"""diffusers / transformers folder configs -> t2v configs.

A diffusers folder stores the UNet3D, VAE and text encoder with exactly our parameter names
(the text encoder under a `text_model.` prefix), so only the configs need translating.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Mapping

import torch

from t2v.config import ScheduleConfig, TextEncoderConfig, UNetConfig, VAEConfig
from t2v.errors import ConfigError
from t2v.models.tokenizer import END_OF_TEXT, START_OF_TEXT, Tokenizer
from weights_convert.native import owned

log = logging.getLogger(__name__)

TEXT_MODEL_PREFIX = "text_model."


def _require(config: Mapping, key: str, allowed, what: str) -> None:
    value = config.get(key, allowed[0])
    if value not in allowed:
        raise ConfigError(f"{what}: {key}={value!r} is not supported (t2v implements "
                          f"{' or '.join(map(repr, allowed))})")


def text_encoder_config(hf_config: Mapping) -> TextEncoderConfig:
    """transformers `text_encoder/config.json` (CLIPTextModel) -> TextEncoderConfig."""
    what = "text_encoder/config.json"
    _require(hf_config, "hidden_act", ("gelu",), what)
    try:
        return TextEncoderConfig(
            vocab_size=int(hf_config["vocab_size"]),
            context_length=int(hf_config["max_position_embeddings"]),
            width=int(hf_config["hidden_size"]),
            heads=int(hf_config["num_attention_heads"]),
            layers=int(hf_config["num_hidden_layers"]),
            mlp_width=int(hf_config["intermediate_size"]),
            norm_eps=float(hf_config.get("layer_norm_eps", 1e-5)),
        )
    except KeyError as exc:
        raise ConfigError(f"{what}: missing key {exc.args[0]!r}") from None


def text_encoder_from_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the `text_model.` prefix of transformers' saved CLIPTextModel files."""
    out = {}
    for key, tensor in state.items():
        if key == "text_model.embeddings.position_ids":
            continue  # a non-learned buffer older transformers versions saved
        out[key.removeprefix(TEXT_MODEL_PREFIX)] = tensor
    return out


# UNet3DConditionModel config keys that hold no architecture (or that we read elsewhere).
UNET_INERT_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
                   "sample_size"}
# Keys some uploads carry (ms-1.7b's first config, older diffusers) with the only value
# UNet3DConditionModel ever implemented; any other value is a different model.
UNET_FIXED_KEYS = {
    "act_fn": "silu", "downsample_padding": 1, "mid_block_scale_factor": 1,
    "num_attention_heads": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "use_linear_projection": True, "mid_block_type": "UNetMidBlock3DCrossAttn",
    "time_embedding_type": "positional", "class_embed_type": None,
    "dual_cross_attention": False, "only_cross_attention": False,
    "resnet_time_scale_shift": "default",
    # Softmax upcasting only changes reduced-precision rounding; t2v's SDPA path accumulates
    # in float32 either way, so both values load.
    "upcast_attention": (False, True),
}
UNET_KEYS = {"in_channels", "out_channels", "block_out_channels", "down_block_types",
             "up_block_types", "layers_per_block", "attention_head_dim", "cross_attention_dim",
             "norm_num_groups", "norm_eps", "time_cond_proj_dim"}
DOWN_TYPES = {"CrossAttnDownBlock3D": True, "DownBlock3D": False}
UP_TYPES = {"CrossAttnUpBlock3D": True, "UpBlock3D": False}


def unet_config(diffusers_config: Mapping) -> UNetConfig:
    """diffusers `unet/config.json` (UNet3DConditionModel) -> UNetConfig.

    diffusers' `attention_head_dim` is, despite its name, passed to the blocks as their head
    count argument, whose transformers then use `channels // attention_head_dim` heads of
    width `attention_head_dim`; so it is our `head_dim` (64) either way. `transformer_in` always
    has 8 heads in diffusers.
    """
    what = "unet/config.json"
    c = dict(diffusers_config)
    for key, allowed in UNET_FIXED_KEYS.items():
        if key in c:
            allowed = allowed if isinstance(allowed, tuple) else (allowed,)
            _require(c, key, allowed, what)
    unknown = sorted(set(c) - UNET_KEYS - UNET_INERT_KEYS - set(UNET_FIXED_KEYS))
    if unknown:
        log.warning("%s: ignoring keys t2v does not know: %s", what, ", ".join(unknown))
    if c.get("_class_name", "UNet3DConditionModel") != "UNet3DConditionModel":
        raise ConfigError(f"{what}: _class_name={c['_class_name']!r}; t2v loads "
                          "UNet3DConditionModel configs")
    channels = tuple(int(x) for x in c.get("block_out_channels", (320, 640, 1280, 1280)))
    down = tuple(c.get("down_block_types", ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)))
    up = tuple(c.get("up_block_types", ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3))
    for name, types, table in (("down_block_types", down, DOWN_TYPES),
                               ("up_block_types", up, UP_TYPES)):
        bad = [t for t in types if t not in table]
        if bad:
            raise ConfigError(f"{what}: {name} contains {bad}; t2v supports {sorted(table)}")
    attention = tuple(DOWN_TYPES[t] for t in down)
    if tuple(UP_TYPES[t] for t in reversed(up)) != attention or len(down) != len(channels):
        raise ConfigError(f"{what}: up_block_types must mirror down_block_types and both need "
                          f"one entry per block_out_channels entry")
    head_dim = c.get("attention_head_dim", 64)
    if isinstance(head_dim, (list, tuple)):
        if len(set(head_dim)) != 1:
            raise ConfigError(f"{what}: attention_head_dim={list(head_dim)}; t2v supports one "
                              "value for all levels")
        head_dim = head_dim[0]
    return UNetConfig(
        in_channels=int(c.get("in_channels", 4)),
        out_channels=int(c.get("out_channels", 4)),
        channels=channels,
        attention=attention,
        layers_per_block=int(c.get("layers_per_block", 2)),
        head_dim=int(head_dim),
        transformer_in_heads=8,
        context_dim=int(c.get("cross_attention_dim", 1024)),
        norm_groups=int(c.get("norm_num_groups", 32)),
        norm_eps=float(c.get("norm_eps", 1e-5)),
        time_cond_proj_dim=None if c.get("time_cond_proj_dim") is None
        else int(c["time_cond_proj_dim"]),
    )


def diffusers_unet_kwargs(cfg: UNetConfig) -> dict:
    """The inverse: UNet3DConditionModel constructor arguments for a UNetConfig."""
    if cfg.transformer_in_heads != 8:
        raise ConfigError("diffusers' UNet3DConditionModel fixes transformer_in to 8 heads; "
                          f"model.unet.transformer_in_heads={cfg.transformer_in_heads}")
    if cfg.beyond_reference():
        raise ConfigError("diffusers' UNet3DConditionModel has no equivalent of model.unet."
                          f"{', model.unet.'.join(cfg.beyond_reference())}: set it to false "
                          "to export")
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=cfg.channels,
        down_block_types=tuple("CrossAttnDownBlock3D" if a else "DownBlock3D"
                               for a in cfg.attention),
        up_block_types=tuple("CrossAttnUpBlock3D" if a else "UpBlock3D"
                             for a in reversed(cfg.attention)),
        layers_per_block=cfg.layers_per_block, attention_head_dim=cfg.head_dim,
        cross_attention_dim=cfg.context_dim, norm_num_groups=cfg.norm_groups,
        norm_eps=cfg.norm_eps, time_cond_proj_dim=cfg.time_cond_proj_dim,
    )


VAE_INERT_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
                  "sample_size",
                  "force_upcast"}  # t2v has its own float32-VAE option (see docs/api.md)
VAE_FIXED_KEYS = {
    "act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
VAE_KEYS = {"in_channels", "out_channels", "latent_channels", "block_out_channels",
            "down_block_types", "up_block_types", "layers_per_block", "norm_num_groups",
            "scaling_factor"}
# Mid-block attention names of VAEs converted before diffusers 0.15.
OLD_VAE_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v",
                           "proj_attn": "to_out.0"}


def vae_config(diffusers_config: Mapping) -> VAEConfig:
    """diffusers `vae/config.json` (AutoencoderKL) -> VAEConfig."""
    what = "vae/config.json"
    c = dict(diffusers_config)
    if c.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConfigError(f"{what}: _class_name={c['_class_name']!r}; t2v loads AutoencoderKL")
    for key, allowed in VAE_FIXED_KEYS.items():
        if key in c:
            _require(c, key, (allowed,), what)
    unknown = sorted(set(c) - VAE_KEYS - VAE_INERT_KEYS - set(VAE_FIXED_KEYS))
    if unknown:
        log.warning("%s: ignoring keys t2v does not know: %s", what, ", ".join(unknown))
    channels = tuple(int(x) for x in c.get("block_out_channels", (64,)))
    for key, block in (("down_block_types", "DownEncoderBlock2D"),
                       ("up_block_types", "UpDecoderBlock2D")):
        types = list(c.get(key, [block] * len(channels)))
        if types != [block] * len(channels):
            raise ConfigError(f"{what}: {key}={types}; t2v supports one {block} per "
                              "block_out_channels entry")
    return VAEConfig(
        in_channels=int(c.get("in_channels", 3)),
        out_channels=int(c.get("out_channels", 3)),
        latent_channels=int(c.get("latent_channels", 4)),
        channels=channels,
        layers_per_block=int(c.get("layers_per_block", 1)),
        norm_groups=int(c.get("norm_num_groups", 32)),
        scaling_factor=float(c.get("scaling_factor", 0.18215)),
    )


def diffusers_vae_kwargs(cfg: VAEConfig) -> dict:
    """The inverse: AutoencoderKL(**kwargs) arguments for a VAEConfig."""
    if cfg.norm_eps != 1e-6:
        raise ConfigError(f"diffusers' AutoencoderKL fixes GroupNorm eps to 1e-6; "
                          f"model.vae.norm_eps={cfg.norm_eps}")
    n = len(cfg.channels)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                latent_channels=cfg.latent_channels, block_out_channels=cfg.channels,
                down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=cfg.layers_per_block,
                norm_num_groups=cfg.norm_groups, scaling_factor=cfg.scaling_factor)


def vae_from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers VAE state dict with either attention naming -> AutoencoderKL keys.

    Older conversions call the mid-block attention `query/key/value/proj_attn`; diffusers
    renames them on load, and so does this. Old 1x1-conv-shaped weights are squeezed.
    """
    out = {}
    for key, tensor in state.items():
        prefix, _, rest = key.partition(".mid_block.attentions.0.")
        if rest:
            module, _, param = rest.rpartition(".")
            if module in OLD_VAE_ATTENTION_NAMES:
                key = f"{prefix}.mid_block.attentions.0.{OLD_VAE_ATTENTION_NAMES[module]}.{param}"
                if tensor.ndim == 4:
                    tensor = tensor[:, :, 0, 0]
        out[key] = tensor
    return out


SCHEDULER_CLASSES = ("DDIMScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler",
                     "EulerDiscreteScheduler", "DDPMScheduler")
# Settings that change the numerics and that t2v does not implement, with the inert value.
# (Dynamic thresholding is a generation setting in t2v: sample.thresholding.)
SCHEDULER_FIXED_KEYS = {"clip_sample": False, "thresholding": False, "trained_betas": None,
                        "timestep_type": "discrete"}


def schedule_config(scheduler_config: Mapping) -> ScheduleConfig:
    """diffusers `scheduler/scheduler_config.json` -> ScheduleConfig (the training schedule;
    the sampler is chosen at generation time). Keys the file does not set keep the
    DDIMScheduler defaults diffusers would apply."""
    what = "scheduler/scheduler_config.json"
    c = dict(scheduler_config)
    name = c.get("_class_name", "DDIMScheduler")
    if name not in SCHEDULER_CLASSES:
        raise ConfigError(f"{what}: _class_name={name!r}; t2v reads the noise schedule of "
                          f"{', '.join(SCHEDULER_CLASSES)}")
    for key, allowed in SCHEDULER_FIXED_KEYS.items():
        if key in c:
            _require(c, key, (allowed,), what)
    return ScheduleConfig(
        num_train_timesteps=int(c.get("num_train_timesteps", 1000)),
        beta_start=float(c.get("beta_start", 0.0001)),
        beta_end=float(c.get("beta_end", 0.02)),
        beta_schedule=str(c.get("beta_schedule", "linear")),
        prediction_type=str(c.get("prediction_type", "epsilon")),
        steps_offset=int(c.get("steps_offset", 0)),
        set_alpha_to_one=bool(c.get("set_alpha_to_one", True)),
        timestep_spacing=c.get("timestep_spacing"),
        rescale_betas_zero_snr=bool(c.get("rescale_betas_zero_snr", False)),
    )


def diffusers_scheduler_config(cfg: ScheduleConfig) -> dict:
    """The inverse: a DDIMScheduler config as the hub ships it."""
    config = {"_class_name": "DDIMScheduler", "beta_start": cfg.beta_start,
              "beta_end": cfg.beta_end, "beta_schedule": cfg.beta_schedule,
              "num_train_timesteps": cfg.num_train_timesteps,
              "prediction_type": cfg.prediction_type,
              "clip_sample": False, "set_alpha_to_one": cfg.set_alpha_to_one,
              "steps_offset": cfg.steps_offset, "thresholding": False}
    if cfg.timestep_spacing is not None:
        config["timestep_spacing"] = cfg.timestep_spacing
    if cfg.rescale_betas_zero_snr:
        config["rescale_betas_zero_snr"] = True
    return config


def diffusers_text_encoder_config(cfg: TextEncoderConfig) -> dict:
    """transformers CLIPTextConfig dict for a TextEncoderConfig (the hub file's fields)."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length,
            "hidden_size": cfg.width, "num_attention_heads": cfg.heads,
            "num_hidden_layers": cfg.layers, "intermediate_size": cfg.mlp_width,
            "hidden_act": "gelu", "layer_norm_eps": cfg.norm_eps, "projection_dim": 512,
            "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0,
            "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
            "torch_dtype": "float32"}


def text_encoder_to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TextEncoder keys -> the `text_model.`-prefixed keys transformers' files carry."""
    return {TEXT_MODEL_PREFIX + k: v for k, v in state.items()}


MODEL_INDEX = {
    "_class_name": "TextToVideoSDPipeline",
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet3DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def tokenizer_files() -> dict[str, str]:
    """transformers CLIPTokenizer files equivalent to open_clip's tokenizer: the same BPE
    vocabulary under HF's special-token names, and pad "!" (id 0) as SD 2's tokenizer has it."""

    tok = Tokenizer()
    hf_names = {START_OF_TEXT: "<|startoftext|>", END_OF_TEXT: "<|endoftext|>"}
    vocab = {hf_names.get(token, token): i for token, i in tok.encoder.items()}
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
               "unk_token": "<|endoftext|>"}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in tok.merges) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2),
        "tokenizer_config.json": json.dumps({**special, "model_max_length": tok.context_length,
                                             "do_lower_case": True, "errors": "replace",
                                             "tokenizer_class": "CLIPTokenizer"}, indent=2),
    }


# The diffusers version whose folder format save_diffusers writes (and the tests load).
DIFFUSERS_FORMAT_VERSION = "0.42.1"


def save_diffusers(folder: Path, cfg, states: Mapping[str, Mapping[str, torch.Tensor]],
                   dtype: torch.dtype | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> list[Path]:
    """Write a diffusers TextToVideoSDPipeline folder from a ModelConfig and t2v state dicts,
    so fine-tuned weights can go back to the diffusers ecosystem. The folder must exist."""
    from safetensors.torch import save_file

    def write_json(path: Path, data: dict) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    version = {"_diffusers_version": DIFFUSERS_FORMAT_VERSION}
    written = [
        write_json(folder / "model_index.json", {**MODEL_INDEX, **version}),
        write_json(folder / "scheduler" / "scheduler_config.json",
                   {**diffusers_scheduler_config(cfg.schedule), **version}),
        write_json(folder / "unet" / "config.json",
                   {"_class_name": "UNet3DConditionModel", **version, "sample_size": 32,
                    **diffusers_unet_kwargs(cfg.unet)}),
        write_json(folder / "vae" / "config.json",
                   {"_class_name": "AutoencoderKL", **version, "sample_size": 256,
                    "act_fn": "silu", **diffusers_vae_kwargs(cfg.vae)}),
        write_json(folder / "text_encoder" / "config.json",
                   diffusers_text_encoder_config(cfg.text_encoder)),
    ]
    for name, text in tokenizer_files().items():
        path = folder / "tokenizer" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    files = {"unet": (folder / "unet" / "diffusion_pytorch_model.safetensors", states["unet"]),
             "vae": (folder / "vae" / "diffusion_pytorch_model.safetensors", states["vae"]),
             "text_encoder": (folder / "text_encoder" / "model.safetensors",
                              text_encoder_to_transformers(states["text_encoder"]))}
    for name, (path, state) in files.items():
        tensors = {k: owned(v, dtype) for k, v in state.items()}
        save_file(tensors, str(path), metadata={"format": "pt"})
        written.append(path)
        if progress is not None:
            progress(name, len(tensors), path.stat().st_size)
    return written
