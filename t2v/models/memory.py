"""A memory model of a generation run: what it needs at its peak, from the config alone.

    est = estimate_memory(cfg.model, frames=200, height=320, width=576, window=24)
    print(est.summary())   # weights, UNet activations, sampler state, VAE chunk, output

The run has two memory peaks. While sampling: the weights on the device, the UNet's
activations for the frames it sees at once (all frames, or `window` when windowed) and the
sampler's latent-sized tensors. While decoding: the weights, one chunk of the VAE decoder's
activations, the latents and the output video (uint8; zero when the frames are streamed into
the encoder, as the CLI does for MP4).

The activation terms are per frame and per image of the UNet batch (2 with guidance):

- UNet: every skip tensor kept for the up path (sum of C x h x w over the skip stack) plus the
  largest transient of one layer, the GEGLU feed-forward of the first level's transformers,
  ~20 x C0 x h x w values (input, the 8C projection, gelu(gate) 4C, the product 4C, residuals).
  Attention uses PyTorch's fused kernels, so no (tokens x tokens) maps are stored. With the
  UNet's frame chunking the transient covers `frame_chunk` frames instead of the whole batch.
- VAE decoder: 4 x channels[1] values per output pixel (the 256-channel upsampled maps at full
  resolution and the first resnet's intermediates). Measured on the full-size VAE at 256x256:
  4,020 bytes per pixel in fp32 against 4,096 from this formula.

UNET_ACTIVATION_SAFETY covers allocator slack and the layer temporaries the sum leaves out;
`python -m t2v.bench.long_video` prints measured peaks next to the estimates.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from t2v.config import ModelConfig
from t2v.models.unet import UNet3D
from t2v.models.vae import AutoencoderKL

GEGLU_VALUES_PER_CHANNEL = 20  # transient of the feed-forward, in units of C0 x h x w
VAE_VALUES_PER_PIXEL_PER_CHANNEL = 4  # x channels[1]
UNET_ACTIVATION_SAFETY = 1.5
SAMPLER_LATENT_COPIES = 10  # x, x0, eps, the guided input and output (2 + 2), DPM history (2),
# windowed fusion accumulators (2)
GIB = 2 ** 30


def text_encoder_parameters(cfg) -> int:
    """The text encoder's parameter count by formula: embeddings, per block four projections
    with biases, two LayerNorms and the MLP, and the final LayerNorm. (Built on the meta
    device instead, its nn.Embedding costs 0.8 s and 150 MB the first time: torch loads its
    normal_ machinery.)"""
    w, m = cfg.width, cfg.mlp_width
    block = 4 * (w * w + w) + 2 * 2 * w + (w * m + m) + (m * w + w)
    return (cfg.vocab_size + cfg.context_length) * w + cfg.layers * block + 2 * w


@functools.lru_cache(maxsize=8)
def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of each component, from the config: the UNet and VAE built on the meta device
    (no memory, 0.07 s at full size), the text encoder by formula; once per config."""

    with torch.device("meta"):
        models = {"unet": UNet3D(cfg.unet), "vae": AutoencoderKL(cfg.vae)}
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    return {"text_encoder": text_encoder_parameters(cfg.text_encoder), **counts}


def unet_transient_values_per_frame(cfg: ModelConfig, h: int, w: int) -> int:
    """The largest single-layer working set per frame (the first level's feed-forward)."""
    return GEGLU_VALUES_PER_CHANNEL * cfg.unet.channels[0] * h * w


def unet_skip_values_per_frame(cfg: ModelConfig, h: int, w: int) -> int:
    """Values per frame kept for the up path: conv_in's output and every block's outputs."""
    channels, layers = cfg.unet.channels, cfg.unet.layers_per_block
    skips, size = channels[0] * h * w, (h, w)  # conv_in's output
    for level, c in enumerate(channels):
        skips += layers * c * size[0] * size[1]
        if level < len(channels) - 1:
            size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
            skips += c * size[0] * size[1]  # the downsampled tensor
    return skips


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes at each peak of a run; `peak` is the larger of the two."""

    weights_sampling: int
    unet_activations: int
    sampler_state: int
    weights_decoding: int
    vae_chunk: int
    latents: int
    output: int
    baseline: int = 0  # what the process holds before the models load (libraries, runtime)

    @property
    def sampling(self) -> int:
        return self.baseline + self.weights_sampling + self.unet_activations + self.sampler_state

    @property
    def decoding(self) -> int:
        return self.baseline + self.weights_decoding + self.vae_chunk + self.latents + \
            self.output

    @property
    def peak(self) -> int:
        return max(self.sampling, self.decoding)

    def summary(self) -> str:
        def g(n: int) -> str:
            return f"{n / GIB:.2f} GiB"
        return (f"memory estimate: peak {g(self.peak)} (process before loading "
                f"{g(self.baseline)}; sampling {g(self.sampling)}: weights "
                f"{g(self.weights_sampling)}, UNet activations {g(self.unet_activations)}, "
                f"sampler {g(self.sampler_state)}; decoding {g(self.decoding)}: weights "
                f"{g(self.weights_decoding)}, VAE chunk {g(self.vae_chunk)}, output "
                f"{g(self.output)})")


def estimate_memory(cfg: ModelConfig, *, frames: int, height: int, width: int, batch: int = 1,
                    guidance: bool = True, window: int | None = None,
                    dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype = torch.float32,
                    decode_chunk: int = 8, frame_chunk: int | None = None,
                    offload: bool = False, output_in_memory: bool = True,
                    baseline: int = 0) -> MemoryEstimate:
    """The memory model above for one call of the pipeline. `frame_chunk`: the UNet's
    (UNet3D.forward's frame_chunk; the transient then covers that many frames of one sample);
    `offload`: only the running model's weights count (model offload);
    `output_in_memory=False`: frames are streamed; `baseline`: bytes the process already holds
    (`resident_bytes()` before loading; the CLI passes it)."""
    counts = parameter_counts(cfg)
    size = torch.tensor([], dtype=dtype).element_size()
    vae_size = torch.tensor([], dtype=vae_dtype).element_size()
    te, unet, vae = (counts["text_encoder"] * size, counts["unet"] * size,
                     counts["vae"] * vae_size)
    factor = 2 ** (len(cfg.vae.channels) - 1)
    h, w = height // factor, width // factor
    in_view = min(frames, window) if window else frames
    images = batch * (2 if guidance else 1) * in_view
    transient_images = min(frame_chunk, in_view) if frame_chunk else images
    latents = batch * cfg.unet.in_channels * frames * h * w * size
    vae_channels = cfg.vae.channels[1] if len(cfg.vae.channels) > 1 else cfg.vae.channels[0]
    return MemoryEstimate(
        weights_sampling=unet if offload else te + unet + vae,
        unet_activations=int(UNET_ACTIVATION_SAFETY * size * (
            images * unet_skip_values_per_frame(cfg, h, w)
            + transient_images * unet_transient_values_per_frame(cfg, h, w))),
        sampler_state=SAMPLER_LATENT_COPIES * latents,
        weights_decoding=vae if offload else te + unet + vae,
        vae_chunk=min(decode_chunk, batch * frames) * height * width
        * VAE_VALUES_PER_PIXEL_PER_CHANNEL * vae_channels * vae_size,
        latents=latents,
        output=batch * frames * height * width * 3 if output_in_memory else 0,
        baseline=baseline)


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                ("/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1
                 "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory this process can still take: on the CPU the smaller of MemAvailable and the
    cgroup's limit minus its usage; on CUDA the device's free memory; None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in CGROUP_FILES:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            candidates.append(max(limit - usage, 0))
    return min(candidates) if candidates else None


def parse_size(text: str) -> int:
    """'12GB', '12 GiB', '800MB', '1.5G', '2048' (MiB) -> bytes (powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise ValueError(f"not a memory size: {text!r} (e.g. 12GB, 800MB)")
    value, unit = float(match.group(1)), match.group(2) or "m"
    return int(value * 1024 ** "kmgt".index(unit) * 1024)


# -- training: what one rank holds (docs/finetuning.md, "Which strategy for which GPUs") -------

# Activations of one training step (forward kept for backward), measured on the full-size UNet
# in fp32 by python -m t2v.bench.train_step at batch 1, 8 frames, 32x32 latents
# (docs/finetuning.md): 14,140 MiB without and 8,702 MiB with gradient checkpointing, minus the
# 180 MiB of that LoRA run's own gradients and AdamW state. Other sizes scale with the values
# the UNet keeps for its up path (unet_skip_values_per_frame) x frames x batch.
STEP_ACTIVATION_MIB = {False: 14_140 - 180, True: 8_702 - 180}
STEP_ACTIVATION_SHAPE = (8, 32, 32)  # frames, latent height, latent width
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes one rank holds at the peak of a training step."""

    weights: int  # the UNet's float32 weights (a 1/N shard with fsdp)
    gradients: int  # float32 gradients of the trained parameters (sharded with fsdp)
    optimizer: int  # AdamW's two float32 moments (sharded with fsdp)
    ema: int  # float32 EMA of the trained parameters (sharded with fsdp)
    gathered: int  # fsdp: the gathered weights and unsharded gradients of the running blocks
    frozen: int  # text encoder and VAE, whole on every rank
    activations: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f) for f in self.__dataclass_fields__)


def largest_block_parameters(cfg: ModelConfig) -> int:
    """Parameters of the largest unit of sharding (a down, mid or up block) of the UNet."""

    with torch.device("meta"):
        unet = UNet3D(cfg.unet)
    return max(sum(p.numel() for p in block.parameters()) for block in unet.blocks())


def training_memory(cfg: ModelConfig, *, ranks: int = 1, strategy: str = "ddp",
                    trained: int | None = None, ema: bool = False,
                    param_dtype: str = "bfloat16", frozen_dtype: str = "float32",
                    batch: int = 1, frames: int = 16, height: int = 256, width: int = 256,
                    checkpointing: bool = True, compute_dtype: str = "float32"
                    ) -> TrainingMemory:
    """The per-rank memory of a UNet training step. `trained`: parameters that train (None:
    all); `batch`: clips per rank. The activations scale the full-size measurement
    (STEP_ACTIVATION_MIB) by the values kept for the up path and by the compute dtype's size
    (`param_dtype` with fsdp, else `compute_dtype`)."""
    counts = parameter_counts(cfg)
    unet, trained = counts["unet"], counts["unet"] if trained is None else trained
    shard = ranks if strategy == "fsdp" else 1
    factor = 2 ** (len(cfg.vae.channels) - 1)
    f0, h0, w0 = STEP_ACTIVATION_SHAPE
    scale = batch * frames * unet_skip_values_per_frame(cfg, height // factor, width // factor) \
        / (f0 * unet_skip_values_per_frame(ModelConfig(), h0, w0))
    compute = param_dtype if strategy == "fsdp" else compute_dtype
    gathered = 0
    if strategy == "fsdp" and ranks > 1:
        # The running block's weights in param_dtype, the next one's prefetched, and the
        # running block's unsharded gradients before the reduce-scatter.
        gathered = largest_block_parameters(cfg) * (2 * DTYPE_BYTES[param_dtype] + 4)
    return TrainingMemory(
        weights=4 * unet // shard, gradients=4 * trained // shard,
        optimizer=8 * trained // shard, ema=4 * trained // shard if ema else 0,
        gathered=gathered,
        frozen=(counts["text_encoder"] + counts["vae"]) * DTYPE_BYTES[frozen_dtype],
        activations=int(STEP_ACTIVATION_MIB[checkpointing] * 2 ** 20 * scale
                        * DTYPE_BYTES[compute] / 4))
