"""Configuration: frozen dataclasses are the schema; YAML files and `key=value` overrides map
onto them one to one.

    cfg = read_config(ModelConfig, "model.yaml", ["unet.layers_per_block=1"])
    cfg.unet.channels      # (320, 640, 1280, 1280)

The sampling config's root (model, generation options, weights) is t2v.pipeline.options.Config,
read by t2v.pipeline.options.load_config; the training root is t2v.training.config.

OmegaConf does the merging and type checking; nothing of it leaks out of this module: callers
get plain frozen dataclasses. Unknown keys and wrong types are `ConfigError`s that name the key
and where it came from (the file, or the override).
"""

from __future__ import annotations

import dataclasses
import io
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from t2v.errors import ConfigError

BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class TextEncoderConfig:
    """OpenCLIP-style causal text transformer; defaults are ViT-H-14's text tower as used here."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 1024
    heads: int = 16
    # Blocks that run. ViT-H-14 has 24; the video model takes the output of the 23rd
    # ("penultimate") followed by the final LayerNorm, so the 24th is never built.
    layers: int = 23
    mlp_width: int = 4096
    norm_eps: float = 1e-5

    def __post_init__(self):
        _check(self.width % self.heads == 0, f"model.text_encoder.width ({self.width}) must be "
               f"divisible by model.text_encoder.heads ({self.heads})")
        _check(self.layers >= 1, f"model.text_encoder.layers must be >= 1, got {self.layers}")


@dataclass(frozen=True)
class UNetConfig:
    """UNet3D topology; defaults are text-to-video-ms-1.7b."""

    in_channels: int = 4
    out_channels: int = 4
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # per resolution level
    attention: tuple[bool, ...] = (True, True, True, False)  # levels with transformers
    layers_per_block: int = 2
    head_dim: int = 64  # every attention has heads of this width: heads = channels // head_dim
    transformer_in_heads: int = 8  # the temporal transformer after conv_in: 8 x 64 = 512 wide
    context_dim: int = 1024  # width of the text embedding that cross-attention reads
    norm_groups: int = 32
    norm_eps: float = 1e-5
    # Add a sinusoidal frame-position embedding in every temporal transformer (diffusers'
    # BasicTransformerBlock with positional_embeddings="sinusoidal", as AnimateDiff's motion
    # modules use). No ms-1.7b or zeroscope checkpoint has it (False).
    temporal_position_embedding: bool = False
    # An embedding of the guidance scale (LCM, T2V-Turbo: consistency-distilled students, one
    # UNet pass per step without an unconditional branch): a bias-free Linear from this width
    # added to the sinusoidal timestep embedding (diffusers' time_cond_proj_dim,
    # TimestepEmbedding.cond_proj); the pipeline feeds it guidance_scale_embedding(w). None: off.
    time_cond_proj_dim: int | None = None

    # Options removed from t2v, with the value that meant "off" (not fields): stored configs
    # of older native folders may still name them at that value (`drop_removed`).
    REMOVED_OPTIONS = types.MappingProxyType({"frame_embedding": False})

    def __post_init__(self):
        _check(len(self.channels) == len(self.attention),
               f"model.unet.channels has {len(self.channels)} levels but model.unet.attention has "
               f"{len(self.attention)}; give one entry per level in both")
        for c in self.channels:
            _check(c % self.norm_groups == 0, f"model.unet.channels entry {c} is not divisible "
                   f"by model.unet.norm_groups {self.norm_groups}")
            _check(c % self.head_dim == 0, f"model.unet.channels entry {c} is not divisible "
                   f"by model.unet.head_dim {self.head_dim}")
        _check(self.time_cond_proj_dim is None or self.time_cond_proj_dim >= 2,
               "model.unet.time_cond_proj_dim must be null (off) or >= 2, got "
               f"{self.time_cond_proj_dim}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels[0]

    def beyond_reference(self) -> list[str]:
        """The options set here that no diffusers or ModelScope checkpoint of this family
        holds (exporting to those layouts refuses them)."""
        return [name for name in ("temporal_position_embedding",) if getattr(self, name)]

    @classmethod
    def drop_removed(cls, data: dict, source: str) -> dict:
        """A stored unet section without the removed options it names at their "off" value;
        one that is on is a ConfigError: the model needs what t2v no longer has."""
        for name, off in cls.REMOVED_OPTIONS.items():
            if name in data and data[name] != off:
                raise ConfigError(f"{source}: unet.{name} is {data[name]!r}, but t2v removed "
                                  f"that option (only {off!r} still loads); this model needs "
                                  "an older t2v")
        return {k: v for k, v in data.items() if k not in cls.REMOVED_OPTIONS}


@dataclass(frozen=True)
class VAEConfig:
    """SD-family KL-f8 autoencoder; defaults are the one text-to-video-ms-1.7b ships."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (128, 256, 512, 512)  # per resolution level, encoder order
    layers_per_block: int = 2  # the decoder has one more per level, as in the reference
    norm_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215

    def __post_init__(self):
        for c in self.channels:
            _check(c % self.norm_groups == 0, f"model.vae.channels entry {c} is not divisible "
                   f"by model.vae.norm_groups {self.norm_groups}")


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule (diffusers' scheduler_config.json of the model)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    # The spacing a scheduler config file sets explicitly; null (the hub's ms-1.7b config sets
    # none) leaves each sampler its own default. `sample.timestep_spacing` overrides both.
    timestep_spacing: str | None = None
    # Zero terminal SNR (Lin et al. 2023, arXiv:2305.08891; diffusers' rescale_betas_zero_snr):
    # for models trained on the rescaled schedule, usually with v_prediction and "trailing".
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        _check(self.timestep_spacing is None or self.timestep_spacing in TIMESTEP_SPACINGS,
               f"model.schedule.timestep_spacing must be null or one of {TIMESTEP_SPACINGS}, "
               f"got {self.timestep_spacing!r}")
        _check(self.beta_schedule in BETA_SCHEDULES,
               f"model.schedule.beta_schedule must be one of {BETA_SCHEDULES}, "
               f"got {self.beta_schedule!r}")
        _check(self.prediction_type in PREDICTION_TYPES,
               f"model.schedule.prediction_type must be one of {PREDICTION_TYPES}, "
               f"got {self.prediction_type!r}")


@dataclass(frozen=True)
class ModelConfig:
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


T = TypeVar("T")


def _error_text(exc: Exception) -> str:
    """One line from an OmegaConf error: the key and the first line of its message."""
    key = getattr(exc, "full_key", None)
    text = str(getattr(exc, "msg", None) or exc)
    message = text.splitlines()[0] if text else type(exc).__name__
    if "$VALUE" in message:  # OmegaConf leaves its template unfilled for some list elements
        message = "value has the wrong type"
    return f"{key}: {message}" if key else message


def _merge(base: Any, other: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_error_text(exc)}") from None


def _to_object(merged: Any, source: str) -> Any:
    try:
        return OmegaConf.to_object(merged)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ConfigError):
            raise ConfigError(f"{source}: {cause}") from None
        raise ConfigError(f"{source}: {_error_text(exc)}") from None


def _field_type(schema: type, key: str) -> Any:
    """The annotated type of a dotted key in a dataclass schema (None if it is not a field)."""
    hint: Any = schema
    for part in key.split("."):
        if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
            return None
        hint = typing.get_type_hints(hint).get(part)
        if hint is None:
            return None
    return hint


def _is_text(hint: Any) -> bool:
    """str or str | None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                           and args == [str])


def _parse_override(override: str, schema: type | None = None) -> Any:
    """`key=value` -> an OmegaConf tree. The value is YAML, except for text fields of the
    schema, where it is the text as written ("no" stays "no", not YAML's false); "null" still
    means None where the field allows it."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected dotted key=value, e.g. sample.steps=25")
    hint = _field_type(schema, key.strip()) if schema is not None else None
    if hint is not None and _is_text(hint) and not (value in ("null", "~") and hint is not str):
        return OmegaConf.create(_nest(key.strip().split("."), value))
    try:
        return OmegaConf.from_dotlist([override])
    except OmegaConfBaseException as exc:
        raise ConfigError(f"override {override!r}: {_error_text(exc)}") from None


def _nest(parts: list[str], value: Any) -> dict:
    return {parts[0]: _nest(parts[1:], value) if len(parts) > 1 else value}


def read_config(schema: type[T], path: str | Path | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Read a YAML config as the root dataclass `schema` (missing keys take its defaults) and
    apply dotted overrides. The roots: t2v.pipeline.options.Config (sampling; its load_config
    calls this), t2v.training.config.TrainRunConfig (training)."""
    merged = OmegaConf.structured(schema)
    source = "defaults"
    if path is not None:
        source = str(path)
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"{source}: not valid YAML{where}") from None
        if data is not None:
            if not isinstance(data, dict):
                raise ConfigError(f"{source}: expected a mapping at the top level")
            merged = _merge(merged, OmegaConf.create(data), source)
    for override in overrides:
        merged = _merge(merged, _parse_override(override, schema), f"override {override!r}")
    sources = source + (" + overrides" if overrides else "")
    return _to_object(merged, sources)


def apply_overrides(cfg: T, overrides: Sequence[str], source: str = "config") -> T:
    """Dotted `key=value` overrides on top of an existing Config."""
    merged = OmegaConf.structured(cfg)
    for override in overrides:
        merged = _merge(merged, _parse_override(override, type(cfg)), f"override {override!r}")
    return _to_object(merged, source + (" + overrides" if overrides else ""))


def config_from_dict(cls: type[T], data: dict, source: str = "<dict>") -> T:
    """Build any config dataclass (root or section) from a plain dict, strictly."""
    merged = _merge(OmegaConf.structured(cls), OmegaConf.create(data), source)
    return _to_object(merged, source)


def config_to_dict(cfg: Any) -> dict:
    """Plain dict (tuples become lists) suitable for YAML, JSON or safetensors metadata."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Any) -> str:
    stream = io.StringIO()
    yaml.safe_dump(config_to_dict(cfg), stream, sort_keys=False)
    return stream.getvalue()
