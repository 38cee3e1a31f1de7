"""Fine-tuning configuration: the schema of `python -m t2v.train --config configs/finetune_*.yaml`.

The root `TrainRunConfig` shares `model`, `weights` and `sample` with the sampling `Config`
(so the periodic sample videos use the same settings as `t2v.cli.sample`) and adds `data`, `train`
and `lora`. Loaded with `t2v.config.load_config(path, overrides, schema=TrainRunConfig)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from t2v.config import ModelConfig, _check
from t2v.pipeline.options import GenerationOptions, WeightsConfig

MIXED_PRECISION = ("no", "bf16", "fp16")
TARGETS = ("epsilon", "v_prediction")
TRAINED_MODELS = ("unet", "vae")
OBJECTIVES = ("diffusion", "consistency")
CONSISTENCY_LOSSES = ("huber", "l2")
LR_SCHEDULES = ("constant", "cosine")
SYNTHETIC_SPLITS = ("trained", "heldout", "all")
STRATEGIES = ("ddp", "fsdp")
TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later", "range")
FSDP_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class SyntheticDataConfig:
    """Procedural clips from t2v.training.synthetic instead of files (the demo model's data)."""

    enabled: bool = False
    seed: int = 0
    clips: int = 10_000  # the dataset size: clips cycle over the split's combinations
    split: str = "trained"  # trained / heldout / all (t2v.training.synthetic.HELDOUT)
    colours: tuple[str, ...] = ()  # instead of the split: every combination of these colours
    # Share of the start range used, from the edge the object comes from: 1 anywhere in
    # view; smaller starts it near that edge (t2v.training.synthetic.render, docs/demo.md).
    start_spread: float = 1.0

    def __post_init__(self):
        _check(self.clips >= 1, f"data.synthetic.clips must be >= 1, got {self.clips}")
        _check(0.0 < self.start_spread <= 1.0, f"data.synthetic.start_spread must be in "
               f"(0, 1], got {self.start_spread}")
        _check(self.split in SYNTHETIC_SPLITS, f"data.synthetic.split must be one of "
               f"{SYNTHETIC_SPLITS}, got {self.split!r}")


@dataclass(frozen=True)
class DataConfig:
    """Training clips: a folder of videos with same-named `.txt` captions, or a JSON file listing
    {"video": path, "caption": text} (paths relative to the JSON file)."""

    path: str | None = None
    num_frames: int = 16  # frames per clip
    stride: int = 1  # take every stride-th frame (lowered for clips too short for it)
    height: int = 256  # clips are resized (shorter side) and centre-cropped to height x width
    width: int = 256
    # A folder for VAE posteriors (mean, std) of every clip, computed once; a fresh latent is
    # still sampled from them each step. Fixes each clip's frames to the first window.
    cache_latents: str | None = None
    # enabled: render clips (num_frames x height x width, square) instead of reading data.path.
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)

    def __post_init__(self):
        _check(not (self.synthetic.enabled and self.cache_latents),
               "data.cache_latents caches video files' latents; procedural clips "
               "(data.synthetic.enabled) are rendered each step: set data.cache_latents=null")
        _check(not self.synthetic.enabled or self.height == self.width,
               f"data.synthetic renders square clips: data.height ({self.height}) must equal "
               f"data.width ({self.width})")
        _check(self.num_frames >= 1, f"data.num_frames must be >= 1, got {self.num_frames}")
        _check(self.stride >= 1, f"data.stride must be >= 1, got {self.stride}")
        for name in ("height", "width"):
            value = getattr(self, name)
            _check(value > 0 and value % 8 == 0,
                   f"data.{name} must be a positive multiple of 8, got {value}")


@dataclass(frozen=True)
class FSDPConfig:
    """train.strategy=fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) per UNet block and on the
    root; t2v/training/fsdp.py. The sharded parameters and AdamW state stay float32 (master weights)."""

    # The gathered weights and the compute of forward/backward; auto: bfloat16 on GPUs, float32
    # on the CPU (bf16 backward passes on the CPU were unreliable: t2v/training/fsdp.py).
    param_dtype: str = "auto"
    reduce_dtype: str = "float32"  # the gradients' reduce-scatter between ranks
    reshard_after_forward: bool = True  # False: keep the gathered weights for backward (ZeRO-2)

    def __post_init__(self):
        _check(self.param_dtype in FSDP_DTYPES, f"train.fsdp.param_dtype must be one of "
               f"{FSDP_DTYPES}, got {self.param_dtype!r}")
        _check(self.reduce_dtype in FSDP_DTYPES[1:], f"train.fsdp.reduce_dtype must be one of "
               f"{FSDP_DTYPES[1:]}, got {self.reduce_dtype!r}")


@dataclass(frozen=True)
class OptimConfig:
    """The training loop. Effective batch = batch_size x grad_accum x processes."""

    output_dir: str = "runs/finetune"
    # What trains: the UNet (the diffusion loss), or the VAE alone (reconstruction + KL on
    # single frames; the saved model's vae.scaling_factor is set to 1 / std of its latents).
    model: str = "unet"
    # diffusion: the denoising loss; consistency: latent consistency distillation of the
    # loaded model into a few-step student (the `consistency` section, docs/few-step.md)
    objective: str = "diffusion"
    kl_weight: float = 1e-6  # VAE mode: weight of the KL term against the per-pixel loss
    steps: int = 1000  # optimizer steps
    batch_size: int = 1  # clips per process per micro-step
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up from 0 to lr, then lr_schedule
    # constant, or cosine: from lr after the warm-up down to lr_min_ratio x lr at train.steps
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.1
    max_grad_norm: float | None = 1.0  # null: no clipping
    # What trains when lora.rank is 0: regexes over UNet parameter names, or the presets
    # "temporal", "attention", "all" (t2v.training.surgery.set_trainable). With LoRA only LoRA trains.
    trainable: tuple[str, ...] = ("temporal",)
    text_dropout: float = 0.1  # probability of training a clip with the empty caption
    target: str | None = None  # epsilon / v_prediction; null: model.schedule.prediction_type
    # Min-SNR-gamma loss weighting (diffusers' --snr_gamma; 5.0 is the paper's choice); null: off
    snr_gamma: float | None = None
    # Timestep sampling bias, as diffusers' --timestep_bias_*: the training timesteps of the
    # biased part are drawn timestep_bias_multiplier times as often as the others. earlier /
    # later: the first / last timestep_bias_portion of the timesteps; range: timesteps
    # timestep_bias_begin <= t < timestep_bias_end; none: t uniform over all timesteps.
    timestep_bias_strategy: str = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000
    ema_decay: float | None = None  # null: no EMA; e.g. 0.9999
    gradient_checkpointing: bool = True
    mixed_precision: str = "no"  # bf16 (CPU or GPU) or fp16 (CUDA, with loss scaling)
    # The UNet's temporal-conv dropout (p=0.1 in both references) is active in training; off
    # makes a step a deterministic function of the batch (used by the DDP equivalence test).
    dropout: bool = True
    seed: int = 0
    device: str = "auto"  # auto: CUDA (this rank's GPU) if available, else CPU
    checkpoint_every: int = 500  # optimizer steps; the last step always checkpoints
    sample_every: int = 0  # 0: no sample videos during training
    sample_prompts: tuple[str, ...] = ()
    log_every: int = 10
    resume: str | None = None  # a checkpoint folder, or "latest" in output_dir
    # ddp: every process holds the whole model (DistributedDataParallel with several); fsdp:
    # parameters, gradients and optimizer state sharded over the processes (docs/finetuning.md)
    strategy: str = "ddp"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)

    def __post_init__(self):
        _check(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _check(self.model in TRAINED_MODELS,
               f"train.model must be one of {TRAINED_MODELS}, got {self.model!r}")
        _check(self.objective in OBJECTIVES,
               f"train.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        _check(self.objective == "diffusion" or self.model == "unet",
               "train.objective=consistency distils the UNet: set train.model=unet")
        _check(self.kl_weight >= 0, f"train.kl_weight must be >= 0, got {self.kl_weight}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(self.lr_schedule in LR_SCHEDULES, f"train.lr_schedule must be one of "
               f"{LR_SCHEDULES}, got {self.lr_schedule!r}")
        _check(0.0 <= self.lr_min_ratio <= 1.0,
               f"train.lr_min_ratio must be between 0 and 1, got {self.lr_min_ratio}")
        _check(0.0 <= self.text_dropout <= 1.0,
               f"train.text_dropout must be between 0 and 1, got {self.text_dropout}")
        _check(self.target is None or self.target in TARGETS,
               f"train.target must be null or one of {TARGETS}, got {self.target!r}")
        _check(self.snr_gamma is None or self.snr_gamma > 0,
               f"train.snr_gamma must be null or > 0, got {self.snr_gamma}")
        _check(self.timestep_bias_strategy in TIMESTEP_BIAS_STRATEGIES,
               f"train.timestep_bias_strategy must be one of {TIMESTEP_BIAS_STRATEGIES}, "
               f"got {self.timestep_bias_strategy!r}")
        _check(self.timestep_bias_multiplier > 0, f"train.timestep_bias_multiplier must be "
               f"> 0, got {self.timestep_bias_multiplier}")
        _check(0.0 < self.timestep_bias_portion <= 1.0, f"train.timestep_bias_portion must be "
               f"in (0, 1], got {self.timestep_bias_portion}")
        _check(0 <= self.timestep_bias_begin < self.timestep_bias_end,
               f"train.timestep_bias_begin and _end must satisfy 0 <= begin < end, got "
               f"{self.timestep_bias_begin} and {self.timestep_bias_end}")
        _check(self.mixed_precision in MIXED_PRECISION,
               f"train.mixed_precision must be one of {MIXED_PRECISION}, "
               f"got {self.mixed_precision!r}")
        _check(self.ema_decay is None or 0.0 < self.ema_decay < 1.0,
               f"train.ema_decay must be null or between 0 and 1, got {self.ema_decay}")
        _check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _check(self.checkpoint_every >= 1,
               f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        _check(not self.sample_every or self.sample_prompts,
               "train.sample_every needs train.sample_prompts (a list of prompts)")
        _check(self.strategy in STRATEGIES,
               f"train.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        _check(self.strategy != "fsdp" or self.model == "unet",
               "train.strategy=fsdp shards the UNet; train.model=vae trains with ddp")
        _check(self.strategy != "fsdp" or self.mixed_precision == "no",
               "with train.strategy=fsdp the precision is train.fsdp.param_dtype (bf16 compute "
               "by default): set train.mixed_precision=no")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters (peft) on the UNet; rank 0 trains the `train.trainable` weights instead."""

    rank: int = 0
    alpha: float | None = None  # null: alpha = rank (scale 1)
    dropout: float = 0.0
    # Regexes over module names (re.search), or presets: "attention" (q/k/v/out projections of
    # every attention), "temporal_attention", "temporal_conv" (the Conv3d layers).
    targets: tuple[str, ...] = ("attention", "temporal_conv")

    def __post_init__(self):
        _check(self.rank >= 0, f"lora.rank must be >= 0, got {self.rank}")
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class ConsistencyConfig:
    """train.objective=consistency (t2v.training.consistency); defaults are diffusers'
    train_lcm_distill_sd_wds.py's."""

    w_min: float = 5.0  # LCM's guidance weight w ~ U[w_min, w_max]; t2v's guidance = w + 1
    w_max: float = 15.0
    ddim_steps: int = 50  # the solver's grid: the teacher steps 1000 // ddim_steps at a time
    timestep_scaling: float = 10.0  # the boundary scalings' (t2v.sampling.lcm)
    loss: str = "huber"  # huber or l2
    huber_c: float = 0.001
    target_ema_decay: float = 0.95  # the target network: an EMA of the student
    # The student's guidance-scale embedding width (model.unet.time_cond_proj_dim; new,
    # zero-initialised, trained in full also under LoRA); null: the student is not told w.
    guidance_embedding: int | None = 256
    # The teacher guides only at these timesteps (conditional prediction elsewhere: w = 0
    # there), as sample.guidance_interval; null: at every timestep.
    teacher_guidance_interval: tuple[int, int] | None = None

    def __post_init__(self):
        _check(0.0 <= self.w_min <= self.w_max,
               f"consistency.w_min and w_max must satisfy 0 <= w_min <= w_max, got "
               f"{self.w_min} and {self.w_max}")
        _check(1 <= self.ddim_steps <= 1000,
               f"consistency.ddim_steps must be between 1 and 1000, got {self.ddim_steps}")
        _check(self.loss in CONSISTENCY_LOSSES,
               f"consistency.loss must be one of {CONSISTENCY_LOSSES}, got {self.loss!r}")
        _check(self.huber_c > 0, f"consistency.huber_c must be > 0, got {self.huber_c}")
        _check(0.0 <= self.target_ema_decay < 1.0, "consistency.target_ema_decay must be in "
               f"[0, 1), got {self.target_ema_decay}")
        _check(self.guidance_embedding is None or self.guidance_embedding >= 2,
               "consistency.guidance_embedding must be null or >= 2, got "
               f"{self.guidance_embedding}")
        interval = self.teacher_guidance_interval
        _check(interval is None or (len(interval) == 2 and 0 <= interval[0] <= interval[1]),
               "consistency.teacher_guidance_interval must be null or [low, high], got "
               f"{interval}")


@dataclass(frozen=True)
class TrainRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    sample: GenerationOptions = field(default_factory=GenerationOptions)  # for the periodic samples
