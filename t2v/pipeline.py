"""Text-to-video (and video-to-video): prompt in, frames out.

    pipe = TextToVideo.from_pretrained("ali-vilab/text-to-video-ms-1.7b", dtype=torch.float16)
    result = pipe("an astronaut riding a horse", num_frames=16, seed=42)
    result.frames   # uint8 (B, F, H, W, 3); result.seed is the seed used

The loop, as diffusers' TextToVideoSDPipeline and ModelScope run it:

    context = TextEncoder(tokens(prompt)), uncond = TextEncoder(tokens(negative_prompt or ""))
    x_T ~ N(0, I) of shape (B, 4, F, H/8, W/8), drawn on a CPU generator
    eps(x, t) = u + g (c - u) with [u, c] = UNet([x, x], t, [uncond, context])   (g > 1)
    x_0 = sampler(eps, x_T)                   # DDIM / DPM-Solver (t2v.samplers)
    video = VAE.decode(x_0 / 0.18215), frame by frame, in chunks -> [-1, 1] -> uint8

Video-to-video (SDEdit, Meng et al. 2022, arXiv:2108.01073; diffusers' VideoToVideoSDPipeline):
encode the input video with the VAE (a posterior sample), noise it to the timestep where the
last `int(steps * strength)` steps begin, and run only those steps.
"""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from t2v.config import ModelConfig
from t2v.errors import UserError
from t2v.noise import randn
from t2v.samplers import SAMPLERS, first_timestep
from t2v.schedule import add_noise, noise_schedule
from t2v.text_encoder import TextEncoder
from t2v.tokenizer import Tokenizer
from t2v.unet import UNet3D
from t2v.vae import DEFAULT_CHUNK_FRAMES, AutoencoderKL
from t2v.windows import reschedule_noise, windowed

log = logging.getLogger(__name__)

OUTPUTS = ("uint8", "float", "latents")
# Above this many frames in the UNet's view, its per-frame layers run in chunks of
# AUTO_FRAME_CHUNK frames (t2v.unet.UNet3D.frame_chunk): bounded working memory, same results.
AUTO_FRAME_CHUNK_ABOVE = 24
AUTO_FRAME_CHUNK = 8


class NumericalError(RuntimeError):
    """The latents stopped being finite."""


@dataclass
class Generation:
    """`frames`: uint8 (B, F, H, W, 3), float (B, F, H, W, 3) in [0, 1], or latents
    (B, 4, F, h, w) as requested; `seed`: the seed of the run's generator (initial noise unless
    latents were given, and every later draw); None if the caller passed a generator."""

    frames: torch.Tensor
    seed: int | None


class TextToVideo:
    """Text encoder + UNet3D + VAE + a sampler. Built from weights (`from_pretrained`) or with
    random weights from a config (`from_config`, for tests and offline smoke runs)."""

    def __init__(self, config: ModelConfig, text_encoder: TextEncoder, unet: UNet3D,
                 vae: AutoencoderKL, tokenizer: Tokenizer | None = None,
                 offload_to: str | torch.device | None = None):
        """`offload_to`: model offload. The modules stay where they are (e.g. the CPU) and each
        moves to `offload_to` (e.g. "cuda") only for its own stage: text encoder, then UNet,
        then VAE, so the accelerator holds one model at a time."""
        self.config = config
        self.text_encoder, self.unet, self.vae = text_encoder, unet, vae
        self.tokenizer = tokenizer or Tokenizer(context_length=config.text_encoder.context_length)
        self.schedule = noise_schedule(config.schedule)
        self.offload_to = torch.device(offload_to) if offload_to is not None else None

    @contextmanager
    def _stage(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """With offload, move `module` to the execution device for the block, then back."""
        if self.offload_to is None:
            yield module
            return
        home = next(module.parameters()).device
        module.to(self.offload_to)
        try:
            yield module
        finally:
            module.to(home)

    @classmethod
    def from_pretrained(cls, source, *, revision: str | None = None, variant: str | None = None,
                        dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", offload: bool = False,
                        local_files_only: bool | None = None) -> TextToVideo:
        """Any layout `t2v.weights.load_models` reads: local folder or hub repo id.
        `offload=True` keeps the models on the CPU and runs each on `device` in turn."""
        from t2v.weights import load_models

        m = load_models(source, revision=revision, variant=variant, dtype=dtype,
                        vae_dtype=vae_dtype, device="cpu" if offload else device,
                        local_files_only=local_files_only)
        return cls(m.config, m.text_encoder, m.unet, m.vae,
                   offload_to=device if offload else None)

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                    vae_dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> TextToVideo:
        """Random weights (PyTorch's default init, seeded): output is noise-like."""
        torch.manual_seed(seed)
        return cls(config,
                   TextEncoder(config.text_encoder).to(device, dtype).eval(),
                   UNet3D(config.unet).to(device, dtype).eval(),
                   AutoencoderKL(config.vae).to(device, vae_dtype or dtype).eval())

    def load_lora(self, path, scale: float = 1.0) -> list[str]:
        """Merge a LoRA file (t2v.lora format, e.g. from `python -m t2v.train`) into the UNet:
        W += scale * (alpha / rank) B A. Several files merge one after the other. Returns the
        adapted layer names."""
        from t2v.lora import load_lora, merge_lora

        names = load_lora(self.unet, path, scale)
        merge_lora(self.unet)
        return names

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side: 8 for the KL-f8 VAE."""
        return 2 ** (len(self.config.vae.channels) - 1)

    @property
    def device(self) -> torch.device:
        """Where the computation runs."""
        return self.offload_to or self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (B, 77, width) text embeddings in the UNet's dtype."""
        with self._stage(self.text_encoder) as text_encoder:
            ids = self.tokenizer(prompts).to(text_encoder.final_layer_norm.weight.device)
            return text_encoder(ids).to(self.device, self.dtype)

    def _check_size(self, height: int, width: int, num_frames: int, steps: int) -> None:
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % factor:
                raise UserError(f"{name} must be a positive multiple of {factor}, got {value}")
        if num_frames < 1:
            raise UserError(f"num_frames must be >= 1, got {num_frames}")
        if not 1 <= steps <= self.schedule.num_train_timesteps:
            raise UserError(f"steps must be between 1 and {self.schedule.num_train_timesteps}, "
                            f"got {steps}")

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] = "", negative_prompt: str | list[str] = "", *,
                 num_frames: int = 16, height: int = 256, width: int = 256, steps: int = 50,
                 guidance_scale: float = 9.0, sampler: str = "ddim", eta: float = 0.0,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 init_video: torch.Tensor | None = None, strength: float = 0.6,
                 timestep_spacing: str | None = None, solver_order: int = 2,
                 window: int | None = None, window_overlap: int = 4, loop: bool = False,
                 freenoise: bool = True,
                 callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
                 output: str = "uint8", progress: bool = True,
                 decode_chunk_frames: int = DEFAULT_CHUNK_FRAMES,
                 frame_chunk: int | str | None = "auto") -> Generation:
        """Generate B videos (B = number of prompts).

        `seed` or `generator` (CPU, for device-independent noise; not both) seeds every draw of
        the run; `latents` (B, 4, F, h, w) replace the initial noise. Without seed or generator
        a random seed is drawn and reported.
        `init_video` (B or 1, 3, F, H, W) in [-1, 1] switches to video-to-video.
        `window` (frames) turns on windowed sampling for long videos (t2v.windows): the UNet
        sees `window` frames at a time, windows overlap by `window_overlap`, `loop` wraps them
        around, and `freenoise` reschedules the initial noise as FreeNoise does.
        `callback(i, t, x, x0)` runs after every step. `frame_chunk`: the UNet's per-frame
        layers run on at most this many frames at a time (None: all; "auto": AUTO_FRAME_CHUNK
        when the UNet sees more than AUTO_FRAME_CHUNK_ABOVE frames).
        """
        if sampler not in SAMPLERS:
            raise UserError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
        if output not in OUTPUTS:
            raise UserError(f"output must be one of {OUTPUTS}, got {output!r}")
        if sampler != "ddim" and eta > 0:
            raise UserError(f"eta applies to the ddim sampler only (sampler is {sampler})")
        if loop and window is None:
            raise UserError("loop needs windowed sampling: give a window (e.g. --window 16)")
        if window is not None and not (window >= 1 and 0 <= window_overlap < window):
            raise UserError(f"window must be >= 1 and window_overlap between 0 and window - 1, "
                            f"got window {window}, window_overlap {window_overlap}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if init_video is not None:
            num_frames, height, width = init_video.shape[2], *init_video.shape[-2:]
        self._check_size(height, width, num_frames, steps)

        # Text: [uncond, cond] batched in one UNet call, as diffusers does.
        context = prompt_embeds if prompt_embeds is not None else self.encode_prompt(prompts)
        batch = context.shape[0]
        guided = guidance_scale > 1.0
        if guided:
            if negative_prompt_embeds is None:
                negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) \
                    else list(negative_prompt)
                if len(negatives) != batch:  # as diffusers: a list must match the prompts
                    raise UserError(f"{len(negatives)} negative prompts for {batch} prompts; "
                                    "give one string, or a list with one per prompt")
                negative_prompt_embeds = self.encode_prompt(negatives)
            if negative_prompt_embeds.shape != context.shape:
                raise UserError(f"negative_prompt_embeds have shape "
                                f"{tuple(negative_prompt_embeds.shape)}, the prompt embeddings "
                                f"{tuple(context.shape)}; they must match")
            context = torch.cat([negative_prompt_embeds.to(context), context])

        # Initial noise: one visible place, on a CPU generator unless one is given.
        used_seed = None
        # Always a generator: it draws the initial noise (unless `latents` are given) and every
        # later draw (DDIM with eta > 0, video-to-video), so a seed reproduces the whole run.
        if seed is not None and generator is not None:
            raise UserError("pass seed or generator, not both (a generator carries its own "
                            "seed)")
        used_seed = None
        if generator is None:
            used_seed = seed if seed is not None else random.randrange(2**31)
            generator = torch.Generator("cpu").manual_seed(used_seed)
        f = self.vae_scale_factor
        shape = (batch, self.config.unet.in_channels, num_frames, height // f, width // f)

        spacing = timestep_spacing or self.config.schedule.timestep_spacing
        options = {"spacing": spacing, "generator": generator}
        if sampler == "ddim":
            options["eta"] = eta
        else:
            options["order"] = solver_order

        start = 0
        if init_video is None:
            if latents is None:
                latents = randn(shape, generator)
                if window is not None and freenoise and num_frames > window:
                    stride = window - window_overlap
                    latents = reschedule_noise(latents, window, stride, generator)
            elif tuple(latents.shape) != shape:
                raise UserError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            x = latents.to(self.device, self.dtype)
        else:
            x, start = self._video_to_video_start(init_video, batch, steps, strength, sampler,
                                                  spacing, generator, decode_chunk_frames)

        def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
            model_input = torch.cat([x, x]) if guided else x
            eps = self.unet(model_input, t, context)
            if not guided:
                return eps
            uncond, cond = eps.chunk(2)
            return uncond + guidance_scale * (cond - uncond)

        if window is not None:
            denoise = windowed(denoise, window, window_overlap, loop)

        bar = tqdm(total=steps - start, desc="sampling", disable=not progress, leave=False)

        def on_step(i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
            bar.update()
            if not torch.isfinite(x).all():
                raise NumericalError(
                    f"the latents became NaN/Inf at step {i + 1} of {steps} (t={t}) in "
                    f"{self.dtype}; try float32 or bfloat16 (--dtype), fewer guidance "
                    "(--guidance) or another sampler")
            if callback is not None:
                callback(i, t, x, x0)

        in_view = min(num_frames, window) if window is not None else num_frames
        if frame_chunk == "auto":
            frame_chunk = AUTO_FRAME_CHUNK if in_view > AUTO_FRAME_CHUNK_ABOVE else None
        previous_chunk, self.unet.frame_chunk = self.unet.frame_chunk, frame_chunk
        try:
            if start < steps:
                with self._stage(self.unet):
                    x = SAMPLERS[sampler](denoise, x, self.schedule, steps, start=start,
                                          callback=on_step, **options)
        finally:
            bar.close()
            self.unet.frame_chunk = previous_chunk
        if output == "latents":
            return Generation(x, used_seed)
        b, f = x.shape[0], x.shape[2]
        out = None
        # Chunk by chunk straight into the output: a uint8 video never exists in float32.
        for row, frames in self.iter_frames(x, output == "uint8", decode_chunk_frames, progress):
            if out is None:
                out = frames.new_empty((b, f) + frames.shape[1:])  # (B, F, H, W, 3)
            out.view(b * f, *frames.shape[1:])[row:row + len(frames)] = frames
        return Generation(out, used_seed)

    @torch.no_grad()
    def iter_frames(self, latents: torch.Tensor, uint8: bool = True,
                    chunk_frames: int = DEFAULT_CHUNK_FRAMES, progress: bool = False
                    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Decode latents (B, 4, F, h, w) chunk by chunk: yields (first row, frames (n, H, W, 3))
        with row = b * F + f, uint8 (rounded, as diffusers' "pil"; ModelScope truncates) or
        float in [0, 1]. Streaming these into a video encoder never holds the whole video."""
        with self._stage(self.vae) as vae:
            for row, frames in vae.iter_decode_video(latents, chunk_frames, progress):
                frames = (frames * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)  # (n, H, W, 3)
                if uint8:
                    frames = (frames * 255).round().to(torch.uint8)
                yield row, frames

    def _video_to_video_start(self, video, batch, steps, strength, sampler, spacing, generator,
                              chunk):
        """Encode, then noise to the first kept step (diffusers' VideoToVideoSDPipeline)."""
        if not 0.0 <= strength <= 1.0:
            raise UserError(f"strength must be between 0 and 1, got {strength}")
        if video.shape[0] not in (1, batch):
            raise UserError(f"init_video has batch {video.shape[0]}, prompts {batch}")
        video = video.to(self.device, self.vae.dtype).expand(batch, *video.shape[1:])
        with self._stage(self.vae) as vae:
            latents = vae.encode_video(video, generator=generator, chunk_frames=chunk)
        start = steps - min(int(steps * strength), steps)
        if start == steps:  # strength 0: nothing to denoise, the reconstruction
            return latents.to(self.dtype), start
        t = first_timestep(sampler, steps, self.schedule, spacing, start)
        b, c, f, h, w = latents.shape
        # Drawn after the posterior noise, folded ((b f), c, h, w), as diffusers draws it.
        noise = randn((b * f, c, h, w), generator, latents.device, latents.dtype)
        noise = noise.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
        x = add_noise(latents, noise, self.schedule.alphas_cumprod[t].to(latents.device))
        return x.to(self.dtype), start


def frames_to_video_tensor(frames: np.ndarray, height: int | None = None,
                           width: int | None = None) -> torch.Tensor:
    """uint8 frames (F, H, W, 3) -> (1, 3, F, H', W') in [-1, 1], resized (bilinear,
    antialiased) to height x width, or to the frame size rounded down to multiples of 8."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    h, w = x.shape[-2:]
    height = height or h - h % 8
    width = width or w - w % 8
    if height < 8 or width < 8:
        raise UserError(f"the input video is {w}x{h}; it needs at least 8x8 pixels")
    if (height, width) != (h, w):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True,
                          align_corners=False).clamp(-1, 1)
    return x.permute(1, 0, 2, 3)[None]
