"""The one description of a generation: `GenerationOptions` declares, defaults, documents and
validates every generation setting; the config file's `sample:` section, the CLI's flags
(t2v.cli.flags), the web UI's controls, the evaluation and the quality grid all derive from it.

    options = GenerationOptions(num_frames=16, steps=25, sampler="dpmsolver++")
    pipe("a red ball", options)                       # or pipe("a red ball", steps=25, ...)
    dataclasses.replace(options, guidance_scale=7.5)  # validated again

Each field's metadata holds its help text (the CLI's --help, docs/cli.md) and, where the flag
is not the field name, its flag. A new sampling tool adds one field here and reads it in its
own module; nothing else changes.

`Config` is the root of a sampling config file: the model, these options and the weights.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from t2v.config import TIMESTEP_SPACINGS, ModelConfig, read_config
from t2v.errors import ConfigError, UserError
from t2v.sampling import guidance_parallel
from t2v.sampling.deep_cache import DEFAULT_BRANCH
from t2v.sampling.freeinit import METHODS as FREE_INIT_METHODS
from t2v.sampling.lcm import LCM_RULES
from t2v.sampling.prompt_travel import resolve_schedule
from t2v.sampling.samplers import SAMPLERS, sampler_options

DEFAULT_STEPS = 50  # diffusers' TextToVideoSDPipeline default


def setting(default: Any = MISSING, help: str = "", *, flag: str | None = None,
            metavar: str | tuple | None = None, choices: Sequence | None = None,
            default_factory: Any = MISSING) -> Any:
    """A field of the options with its CLI description: `--flag` (default: the field name
    with dashes), help text, metavar and choices."""
    metadata = {"help": help, "flag": flag, "metavar": metavar, "choices": choices}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class FreeInitOptions:
    """FreeInit (t2v.sampling.freeinit): diffusers' enable_free_init names and defaults;
    num_iters 0: off."""

    num_iters: int = setting(0, "FreeInit: N sampling passes (0 = off)", flag="free-init",
                             metavar="N")
    use_fast_sampling: bool = setting(False, "FreeInit's coarse-to-fine passes (fewer steps in "
                                      "early passes)", flag="free-init-fast")
    method: str = setting("butterworth", "FreeInit's low-pass filter", flag="free-init-method",
                          choices=FREE_INIT_METHODS)
    order: int = setting(4, "FreeInit: the Butterworth filter's order",
                         flag="free-init-order")
    spatial_stop_frequency: float = setting(0.25, "FreeInit: the filter's spatial stop "
                                            "frequency (0-1)", flag="free-init-spatial")
    temporal_stop_frequency: float = setting(0.25, "FreeInit: the filter's temporal stop "
                                             "frequency (0-1)", flag="free-init-temporal")

    def __post_init__(self):
        _check(self.num_iters >= 0,
               f"sample.free_init.num_iters must be >= 0, got {self.num_iters}")
        _check(self.method in FREE_INIT_METHODS, f"sample.free_init.method must be one of "
               f"{FREE_INIT_METHODS}, got {self.method!r}")
        for name in ("spatial_stop_frequency", "temporal_stop_frequency"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"sample.free_init.{name} must be "
                   f"between 0 and 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class LCMOptions:
    """The LCM sampler's timestep grid (t2v.sampling.lcm); read with sampler lcm only."""

    original_steps: int = setting(50, "LCM: steps of the distillation grid the sampler's "
                                  "steps are taken from (diffusers' original_inference_steps)",
                                  flag="lcm-original-steps", metavar="N")
    timesteps: str = setting("even", "LCM: how the steps are taken from that grid: even "
                             "(diffusers) or stride (T2V-Turbo; diffusers before 0.24)",
                             flag="lcm-timesteps", choices=LCM_RULES)

    def __post_init__(self):
        _check(1 <= self.original_steps <= 1000, "sample.lcm.original_steps must be between 1 "
               f"and 1000, got {self.original_steps}")
        _check(self.timesteps in LCM_RULES, f"sample.lcm.timesteps must be one of {LCM_RULES}, "
               f"got {self.timesteps!r}")


@dataclass(frozen=True)
class GenerationOptions:
    """Every setting of a generation. Frozen; `dataclasses.replace` makes a changed copy and
    checks it again. Errors are ConfigErrors naming the key (`sample.<field>`)."""

    # -- what to make --------------------------------------------------------------------------
    prompt: str = setting("", "what the video shows")
    negative_prompt: str = setting("", "what to steer away from (the unconditional branch)")
    num_frames: int = setting(16, "number of frames", flag="frames")
    # Multiples of 8: the KL-f8 VAE of this model family (TextToVideo.check_options checks
    # the loaded VAE's own factor too).
    height: int = setting(256, "pixels, a multiple of 8")
    width: int = setting(256, "pixels, a multiple of 8")
    fps: int = setting(8, "frames per second of the output file")
    seed: int | None = setting(None, "noise seed (prompt i of a file uses seed + i); random if "
                               "unset")
    # -- the sampler ---------------------------------------------------------------------------
    steps: int = setting(DEFAULT_STEPS, "sampling steps (diffusers: num_inference_steps)")
    sampler: str = setting("ddim", "sampler (docs/samplers.md)", choices=tuple(SAMPLERS))
    guidance_scale: float = setting(9.0, "classifier-free guidance scale (1 disables the "
                                    "unconditional pass)", flag="guidance")
    eta: float = setting(0.0, "DDIM noise (0 = deterministic; ddim only)")
    timestep_spacing: str | None = setting(
        None, "the inference timesteps' spacing; unset: the model's scheduler config, else each "
        "sampler's diffusers default", choices=TIMESTEP_SPACINGS)
    solver_order: int = setting(2, "DPM-Solver and UniPC order: 1, 2 or 3")
    thresholding: bool = setting(False, "dynamic thresholding of the x0 predictions, per frame "
                                 "(diffusers' thresholding=True; ddim, dpmsolver++, dpmsolver, "
                                 "sde-dpmsolver++, unipc)")
    dynamic_thresholding_ratio: float = setting(0.995, "thresholding: the quantile of |x0| "
                                                "taken as the threshold s")
    sample_max_value: float = setting(1.0, "thresholding: the largest threshold s (x0 is "
                                      "clamped to [-s, s] / s)")
    lcm: LCMOptions = setting(default_factory=LCMOptions)
    # -- guidance tools (docs/sampling-tools.md) --------------------------------------------
    guidance_rescale: float = setting(0.0, "rescale guided outputs toward the conditional "
                                      "output's std (0 = off, 0.7 = the paper's value)",
                                      metavar="PHI")
    guidance_interval: tuple[float, float] | None = setting(
        None, "guide only at timesteps LOW <= t <= HIGH (0-999), the conditional prediction "
        "alone elsewhere", metavar=("LOW", "HIGH"))
    guidance_parallel: bool = setting(False, "under torchrun --nproc_per_node 2: rank 0 runs the "
                                      "unconditional UNet pass, rank 1 the conditional one "
                                      "(docs/multi-gpu.md)")
    freeu: tuple[float, ...] | None = setting(
        None, "FreeU's b1 b2 s1 s2; without numbers diffusers' values for this model family "
        "(t2v.sampling.freeu.RECOMMENDED)", metavar="B1 B2 S1 S2")
    free_init: FreeInitOptions = setting(default_factory=FreeInitOptions)
    cache_interval: int = setting(1, "DeepCache: a full UNet call every N steps, shallow ones "
                                  "reusing its deep features between (1 = off; an "
                                  "approximation)", metavar="N")
    cache_branch: int = setting(DEFAULT_BRANCH, "DeepCache: the skip branch shallow calls "
                                "recompute, 0 (the shallowest, fastest) to the layers of the "
                                "first block", metavar="B")
    # -- prompt tools -------------------------------------------------------------------------
    prompt_weighting: bool = setting(False, "read prompts in AUTOMATIC1111's syntax: "
                                     "(word:1.3), (word) = x1.1, [word] = /1.1; prompts past 77 "
                                     "tokens in 75-token chunks")
    prompt_schedule: str | None = setting(
        None, "prompt travel in place of --prompt: \"0: a red ball | 32: a blue ball\"; each "
        "window takes the prompt interpolated at its centre frame (needs --window)",
        metavar="SCHEDULE")
    # -- long videos (docs/long-video.md) -------------------------------------------------------
    window: int | None = setting(None, "windowed sampling for long videos: frames the UNet sees "
                                 "at once (e.g. 16 for ms-1.7b, 24 for zeroscope); unset = all "
                                 "frames")
    window_overlap: int = setting(4, "frames shared by neighbouring windows")
    loop: bool = setting(False, "windows wrap around: a seamless loop (needs --window)")
    freenoise: bool = setting(True, "FreeNoise's rescheduling of the initial noise when "
                              "windowed")
    # -- inputs: video-to-video and first frames ------------------------------------------------
    init_video: str | None = setting(None, "video-to-video: the input video (any format FFmpeg "
                                     "reads)")
    strength: float = setting(0.6, "video-to-video: share of the steps that run (0 = the "
                              "reconstruction)")
    init_image: str | None = setting(None, "first-frame conditioning: the image (resized) is "
                                     "kept in the first --init-frames frames, fading",
                                     metavar="IMAGE")
    init_frames: int = setting(4, "frames the init image conditions (weights 1 - f/K)",
                               metavar="K")
    init_weights: tuple[float, ...] | None = setting(
        None, "per-frame weights of the conditioning frames instead (1 = kept)",
        metavar="W,W,..")
    continue_from: str | None = setting(None, "continue a video: its last --continue-frames "
                                        "frames start the clip", metavar="VIDEO")
    continue_frames: int = setting(4, "frames of --continue-from repeated at the start of the "
                                   "new clip", metavar="K")

    def __post_init__(self):
        self._check_size()
        self._check_sampler()
        self._check_guidance()
        self._check_windows()
        self._check_inputs()

    def _check_size(self) -> None:
        _check(self.num_frames >= 1, f"sample.num_frames must be >= 1, got {self.num_frames}")
        for name in ("height", "width"):
            value = getattr(self, name)
            _check(value > 0 and value % 8 == 0,
                   f"sample.{name} must be a positive multiple of 8, got {value}")
        _check(self.fps >= 1, f"sample.fps must be >= 1, got {self.fps}")

    def _check_sampler(self) -> None:
        _check(self.steps >= 1, f"sample.steps must be >= 1, got {self.steps}")
        _check(self.sampler in SAMPLERS,
               f"sample.sampler must be one of {tuple(SAMPLERS)}, got {self.sampler!r}")
        _check(self.eta >= 0, f"sample.eta must be >= 0, got {self.eta}")
        _check(self.solver_order in (1, 2, 3),
               f"sample.solver_order must be 1, 2 or 3, got {self.solver_order}")
        _check(self.timestep_spacing is None or self.timestep_spacing in TIMESTEP_SPACINGS,
               f"sample.timestep_spacing must be null or one of {TIMESTEP_SPACINGS}, "
               f"got {self.timestep_spacing!r}")
        try:  # eta and thresholding only where the sampler has them
            sampler_options(self.sampler, eta=self.eta, thresholding=self.thresholding,
                            dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
                            sample_max_value=self.sample_max_value)
        except ConfigError as exc:
            raise ConfigError(f"sample.{exc}") from None
        if self.sampler == "lcm":
            _check(self.steps <= self.lcm.original_steps, f"sample.steps ({self.steps}) must be "
                   f"at most sample.lcm.original_steps ({self.lcm.original_steps}) for the lcm "
                   "sampler")
            _check(not (self.init_video or self.init_image or self.continue_from),
                   "the lcm sampler does not take sample.init_video, init_image or "
                   "continue_from yet; use another sampler")

    def _check_guidance(self) -> None:
        _check(0.0 <= self.guidance_rescale <= 1.0,
               f"sample.guidance_rescale must be between 0 and 1, got {self.guidance_rescale}")
        _check(self.guidance_interval is None or (
            len(self.guidance_interval) == 2
            and 0 <= self.guidance_interval[0] <= self.guidance_interval[1] <= 999),
               "sample.guidance_interval must be null or two timesteps [low, high] with "
               f"0 <= low <= high <= 999, got {self.guidance_interval}")
        _check(self.guidance_interval is None or not self.guidance_parallel,
               "sample.guidance_interval does not combine with sample.guidance_parallel yet")
        if self.guidance_parallel:
            try:
                guidance_parallel.check_scale(self.guidance_scale)
            except UserError as exc:
                raise ConfigError(f"sample.{exc}") from None
        _check(self.freeu is None or (len(self.freeu) == 4 and min(self.freeu) > 0),
               f"sample.freeu must be null or 4 numbers > 0 [b1, b2, s1, s2], got {self.freeu}")
        _check(self.cache_interval >= 1,
               f"sample.cache_interval must be >= 1 (1: off), got {self.cache_interval}")
        _check(self.cache_branch >= 0,
               f"sample.cache_branch must be >= 0 (0: the shallowest), got {self.cache_branch}")
        _check(self.cache_interval == 1 or (self.window is None and not self.guidance_parallel),
               "sample.cache_interval (DeepCache) does not combine with windowed sampling "
               "(sample.window) or sample.guidance_parallel yet; set it to 1")

    def _check_windows(self) -> None:
        _check(self.window is None or self.window >= 1,
               f"sample.window must be null or >= 1, got {self.window}")
        _check(self.window is None or 0 <= self.window_overlap < self.window,
               f"sample.window_overlap must be between 0 and sample.window - 1, got "
               f"{self.window_overlap} for window {self.window}")
        _check(not self.loop or self.window is not None,
               "sample.loop needs windowed sampling: set sample.window (e.g. --window 16)")
        if self.prompt_schedule is None:
            return
        try:
            resolve_schedule(self.prompt_schedule, self.num_frames)
        except UserError as exc:
            raise ConfigError(str(exc)) from None
        _check(self.window is not None, "sample.prompt_schedule needs windowed sampling: set "
               "sample.window (e.g. --window 16)")
        _check(not self.prompt, "sample.prompt_schedule takes the place of the prompt: "
               "give one of them (it takes the place of sample.prompt)")

    def _check_inputs(self) -> None:
        _check(0.0 <= self.strength <= 1.0,
               f"sample.strength must be between 0 and 1, got {self.strength}")
        _check(not (self.init_image and self.continue_from),
               "sample.init_image and sample.continue_from: give one, not both")
        _check(not ((self.init_image or self.continue_from) and self.init_video),
               "sample.init_image / sample.continue_from start a new clip; they do not combine "
               "with sample.init_video (video-to-video)")
        _check(not (self.free_init.num_iters and self.init_video),
               "sample.free_init applies to text-to-video only, not with sample.init_video")
        for name, used in (("init_frames", self.init_image),
                           ("continue_frames", self.continue_from)):
            # bounded by num_frames only when used: the default 4 must not refuse --frames 2
            value = getattr(self, name)
            _check(value >= 1 and (not used or value <= self.num_frames),
                   f"sample.{name} must be between 1 and sample.num_frames ({self.num_frames}), "
                   f"got {value}")
        _check(self.init_weights is None or all(0 <= w <= 1 for w in self.init_weights),
               f"sample.init_weights must be numbers between 0 and 1, got {self.init_weights}")


def option_fields(cls: type = GenerationOptions, prefix: str = ""):
    """(dotted name, dataclass field) of every setting, nested sections flattened
    (free_init.num_iters, ...): what the CLI, the app and the docs enumerate."""
    for f in fields(cls):
        if isinstance(f.default_factory, type) and hasattr(f.default_factory,
                                                            "__dataclass_fields__"):
            yield from option_fields(f.default_factory, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


@dataclass(frozen=True)
class WeightsConfig:
    """Where the weights come from: a hub repo id or a local folder; null means random weights."""

    source: str | None = None
    revision: str | None = None
    variant: str | None = None  # diffusers weight variant, e.g. "fp16" (half the download)
    # LoRA files merged into the UNet after loading, "PATH" or "PATH:scale".
    lora: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    """A sampling config file: `model:`, `sample:` (the generation options) and `weights:`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sample: GenerationOptions = field(default_factory=GenerationOptions)
    weights: WeightsConfig = field(default_factory=WeightsConfig)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                schema: type = Config) -> Any:
    """A YAML config (missing keys take the defaults) with dotted `key=value` overrides, as
    `schema` (default: the sampling `Config`; t2v.training.config.TrainRunConfig for training).
    t2v.config.read_config does the reading."""
    return read_config(schema, path, overrides)
