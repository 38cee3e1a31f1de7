"""Configuration: frozen dataclasses are the schema; YAML files and `key=value` overrides map
onto them one to one.

    cfg = load_config("configs/ms17b.yaml", ["sample.steps=25", "sample.sampler=dpmsolver++"])
    cfg.model.unet.channels      # (320, 640, 1280, 1280)

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

from t2v.errors import ConfigError, UserError

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


@dataclass(frozen=True)
class FreeInitConfig:
    """FreeInit's settings, diffusers' enable_free_init names and defaults; num_iters 0: off."""

    num_iters: int = 0
    use_fast_sampling: bool = False
    method: str = "butterworth"  # butterworth / gaussian / ideal
    order: int = 4
    spatial_stop_frequency: float = 0.25
    temporal_stop_frequency: float = 0.25

    def __post_init__(self):
        _check(self.num_iters >= 0,
               f"sample.free_init.num_iters must be >= 0, got {self.num_iters}")
        _check(self.method in ("butterworth", "gaussian", "ideal"),
               "sample.free_init.method must be one of ('butterworth', 'gaussian', 'ideal'), "
               f"got {self.method!r}")
        for name in ("spatial_stop_frequency", "temporal_stop_frequency"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"sample.free_init.{name} must be "
                   f"between 0 and 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class SampleConfig:
    """Generation settings; the CLI flags override these."""

    prompt: str = ""
    negative_prompt: str = ""
    num_frames: int = 16
    height: int = 256
    width: int = 256
    steps: int = 50
    sampler: str = "ddim"
    guidance_scale: float = 9.0
    eta: float = 0.0
    seed: int | None = None
    fps: int = 8
    # None: the spacing the model's scheduler config sets, else each sampler's diffusers
    # default ("leading" for DDIM, "linspace" for DPM-Solver built from the DDIM config).
    timestep_spacing: str | None = None
    solver_order: int = 2  # DPM-Solver and UniPC samplers: 1, 2 or 3
    # Dynamic thresholding of the x0 predictions (diffusers' thresholding=True; samplers
    # t2v.sampling.samplers.THRESHOLDING_SAMPLERS): per frame s = clamp(quantile(|x0|, ratio), 1, max).
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    init_video: str | None = None  # video-to-video input (SDEdit)
    # First-frame conditioning (t2v/sampling/first_frames.py): an image kept in the first init_frames
    # frames (weights 1 - f/K unless init_weights), or the last continue_frames frames of a
    # video continued.
    init_image: str | None = None
    init_frames: int = 4
    init_weights: tuple[float, ...] | None = None
    continue_from: str | None = None
    continue_frames: int = 4
    strength: float = 0.6  # video-to-video: share of the steps that run (diffusers' default)
    # Windowed sampling for long videos (t2v/sampling/windows.py): null = the UNet sees all frames.
    window: int | None = None
    window_overlap: int = 4
    loop: bool = False  # windows wrap around the frame axis: a seamless loop
    freenoise: bool = True  # FreeNoise's noise rescheduling when windowed
    # Prompt tools (docs/sampling-tools.md): A1111's weighting syntax, (word:1.3), and prompts
    # past 77 tokens (t2v/sampling/prompt_weighting.py); a per-frame prompt schedule for windowed runs,
    # "0: a red ball | 32: a blue ball", in place of the prompt (t2v/sampling/prompt_travel.py).
    prompt_weighting: bool = False
    prompt_schedule: str | None = None
    # Guidance rescale (t2v/sampling/guidance.py; 0: off), FreeU's [b1, b2, s1, s2] (t2v/sampling/freeu.py;
    # null: off; ms-1.7b and zeroscope: [1.2, 1.4, 0.9, 0.2]) and FreeInit (t2v/sampling/freeinit.py).
    guidance_rescale: float = 0.0
    # Guidance only at timesteps low <= t <= high ([low, high], 0-999; null: every step), the
    # conditional prediction alone at the others (t2v/pipeline/text_to_video.py; docs/sampling-tools.md).
    guidance_interval: tuple[float, float] | None = None
    # Guidance-parallel sampling (t2v/sampling/guidance_parallel.py): under torchrun with 2 processes,
    # the unconditional pass on rank 0 and the conditional one on rank 1, every step.
    guidance_parallel: bool = False
    freeu: tuple[float, ...] | None = None
    # DeepCache (t2v/sampling/deep_cache.py): a full UNet call every N calls, shallow ones reusing its
    # deep features between; 1: off. An approximation (docs/sampling-tools.md).
    cache_interval: int = 1
    # The skip branch DeepCache's shallow calls recompute: the first `cache_branch` layers of
    # the first down block and the last cache_branch + 1 of the last up block (0: shallowest).
    cache_branch: int = 0
    free_init: FreeInitConfig = field(default_factory=lambda: FreeInitConfig())

    def __post_init__(self):
        _check(self.num_frames >= 1, f"sample.num_frames must be >= 1, got {self.num_frames}")
        _check(not (self.init_image and self.continue_from),
               "sample.init_image and sample.continue_from: give one, not both")
        _check(not ((self.init_image or self.continue_from) and self.init_video),
               "sample.init_image / sample.continue_from do not combine with sample.init_video")
        for name, used in (("init_frames", self.init_image),
                           ("continue_frames", self.continue_from)):
            # bounded by num_frames only when used: the default 4 must not refuse --frames 2
            value = getattr(self, name)
            _check(value >= 1 and (not used or value <= self.num_frames),
                   f"sample.{name} must be between 1 and sample.num_frames ({self.num_frames}), "
                   f"got {value}")
        _check(self.init_weights is None or all(0 <= w <= 1 for w in self.init_weights),
               f"sample.init_weights must be numbers between 0 and 1, got {self.init_weights}")
        _check(0.0 <= self.guidance_rescale <= 1.0,
               f"sample.guidance_rescale must be between 0 and 1, got {self.guidance_rescale}")
        _check(self.guidance_interval is None or (
            len(self.guidance_interval) == 2
            and 0 <= self.guidance_interval[0] <= self.guidance_interval[1] <= 999),
               "sample.guidance_interval must be null or [low, high] timesteps with "
               f"0 <= low <= high <= 999, got {self.guidance_interval}")
        _check(self.guidance_interval is None or not self.guidance_parallel,
               "sample.guidance_interval does not combine with sample.guidance_parallel yet")
        _check(self.freeu is None or (len(self.freeu) == 4 and min(self.freeu) > 0),
               f"sample.freeu must be null or 4 numbers > 0 [b1, b2, s1, s2], got {self.freeu}")
        _check(self.steps >= 1, f"sample.steps must be >= 1, got {self.steps}")
        _check(self.cache_interval >= 1,
               f"sample.cache_interval must be >= 1 (1: off), got {self.cache_interval}")
        _check(self.cache_branch >= 0,
               f"sample.cache_branch must be >= 0 (0: the shallowest), got {self.cache_branch}")
        _check(self.cache_interval == 1 or (self.window is None and not self.guidance_parallel),
               "sample.cache_interval (DeepCache) does not combine with sample.window or "
               "sample.guidance_parallel yet; set it to 1")
        # the one list of names and option rules (samplers import config)
        from t2v.sampling.samplers import SAMPLERS, sampler_options

        _check(self.sampler in SAMPLERS,
               f"sample.sampler must be one of {tuple(SAMPLERS)}, got {self.sampler!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            _check(value > 0 and value % 8 == 0,
                   f"sample.{name} must be a positive multiple of 8, got {value}")
        _check(self.fps >= 1, f"sample.fps must be >= 1, got {self.fps}")
        _check(self.eta >= 0, f"sample.eta must be >= 0, got {self.eta}")
        _check(self.solver_order in (1, 2, 3),
               f"sample.solver_order must be 1, 2 or 3, got {self.solver_order}")
        try:
            sampler_options(self.sampler, thresholding=self.thresholding,
                            dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
                            sample_max_value=self.sample_max_value)
        except ConfigError as exc:
            raise ConfigError(f"sample.{exc}") from None
        _check(0.0 <= self.strength <= 1.0,
               f"sample.strength must be between 0 and 1, got {self.strength}")
        _check(self.window is None or 0 <= self.window_overlap < self.window,
               f"sample.window_overlap must be between 0 and sample.window - 1, got "
               f"{self.window_overlap} for window {self.window}")
        _check(self.timestep_spacing is None or self.timestep_spacing in TIMESTEP_SPACINGS,
               f"sample.timestep_spacing must be null or one of {TIMESTEP_SPACINGS}, "
               f"got {self.timestep_spacing!r}")
        if self.prompt_schedule is not None:
            self._check_prompt_schedule()

    def _check_prompt_schedule(self) -> None:
        from t2v.sampling.prompt_travel import resolve_schedule

        try:
            resolve_schedule(self.prompt_schedule, self.num_frames)
        except UserError as exc:
            raise ConfigError(str(exc)) from None
        _check(self.window is not None, "sample.prompt_schedule needs windowed sampling: set "
               "sample.window (e.g. --window 16)")
        _check(not self.prompt, "sample.prompt_schedule takes the place of sample.prompt: "
               "give one of them")


@dataclass(frozen=True)
class WeightsConfig:
    """Where the weights come from: a hub repo id or a local folder; null means random weights."""

    source: str | None = None
    revision: str | None = None
    variant: str | None = None  # diffusers weight variant, e.g. "fp16" (half the download)
    # LoRA files (t2v.models.lora format) merged into the UNet after loading, "PATH" or "PATH:scale".
    lora: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)


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


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                schema: type[T] = Config) -> T:
    """Read a YAML config (missing keys take the dataclass defaults) and apply overrides.
    `schema` is the root dataclass: `Config` for sampling, `t2v.training.config.TrainRunConfig`
    for fine-tuning."""
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
