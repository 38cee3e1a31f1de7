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
from t2v.errors import NumericalError, UserError  # noqa: F401 (NumericalError: public here too)
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
# diffusers' output_type -> the frames computed ("np", "pt", "pil": float in [0, 1]).
OUTPUT_TYPES = {"np": "float", "pt": "float", "pil": "float", "latent": "latents"}
DEFAULT_STEPS = 50  # diffusers' TextToVideoSDPipeline default
# Above this many frames in the UNet's view, its per-frame layers run in chunks of
# AUTO_FRAME_CHUNK frames (t2v.unet.UNet3D.frame_chunk): bounded working memory, same results.
AUTO_FRAME_CHUNK_ABOVE = 24
AUTO_FRAME_CHUNK = 8
Generators = torch.Generator | list  # one generator, or one per video


def auto_frame_chunk(frames_in_view: int) -> int | None:
    """The frame chunk "auto" means: AUTO_FRAME_CHUNK when the UNet sees more than
    AUTO_FRAME_CHUNK_ABOVE frames at once, else None (all frames together)."""
    return AUTO_FRAME_CHUNK if frames_in_view > AUTO_FRAME_CHUNK_ABOVE else None


def resolve_steps(steps: int | None, num_inference_steps: int | None) -> int:
    """`steps`, or diffusers' `num_inference_steps`; the same number if both are given."""
    if steps is not None and num_inference_steps is not None and steps != num_inference_steps:
        raise UserError(f"steps ({steps}) and num_inference_steps ({num_inference_steps}) "
                        "disagree; give one")
    return steps if steps is not None else (num_inference_steps or DEFAULT_STEPS)


@dataclass
class Generation:
    """`frames`: uint8 (B, F, H, W, 3), float (B, F, H, W, 3) in [0, 1], or latents
    (B, 4, F, h, w) as requested (with diffusers' output_type: a numpy array (B, F, H, W, 3),
    a tensor (B, F, 3, H, W) in [0, 1], lists of PIL images, or latents); `seed`: the seed of
    the run's generator (initial noise unless latents were given, and every later draw); None
    if the caller passed a generator."""

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
                        dtype: torch.dtype | None = None, vae_dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", offload: bool = False,
                        local_files_only: bool | None = None,
                        torch_dtype: torch.dtype | None = None) -> TextToVideo:
        """Any layout `t2v.weights.load_models` reads: local folder or hub repo id.
        `offload=True` keeps the models on the CPU and runs each on `device` in turn.
        `torch_dtype` is diffusers' name for `dtype` (default float32)."""
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise UserError(f"dtype ({dtype}) and torch_dtype ({torch_dtype}) disagree")
        pipe, _ = load_pipeline(source, revision=revision, variant=variant,
                                dtype=dtype or torch_dtype or torch.float32, vae_dtype=vae_dtype,
                                device=device, offload=offload,
                                local_files_only=local_files_only)
        return pipe

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

    # -- diffusers-shaped conveniences --------------------------------------------------------

    def to(self, *args, **kwargs) -> TextToVideo:
        """Move and/or cast every model, like `nn.Module.to` (`pipe.to("cuda")`,
        `pipe.to(torch.float16)`, `pipe.to("cuda", torch.float16)`); returns the pipeline."""
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(*args, **kwargs)
        return self

    def enable_model_cpu_offload(self, device: str | torch.device | None = None) -> None:
        """diffusers' model offload: the models live on the CPU and each moves to `device`
        (default: the first CUDA GPU) only for its stage. Without an accelerator the models
        simply stay on the CPU."""
        if device is None:
            if not torch.cuda.is_available():
                log.warning("enable_model_cpu_offload: no accelerator; the models stay on the "
                            "CPU")
                return
            device = "cuda"
        self.to("cpu")
        self.offload_to = torch.device(device)

    def check_inputs(self, *, sampler: str, eta: float, window: int | None,
                     window_overlap: int, loop: bool, height: int, width: int,
                     num_frames: int, steps: int, num_videos_per_prompt: int) -> None:
        """Everything about the arguments that can be wrong, before any model runs."""
        if sampler not in SAMPLERS:
            raise UserError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
        if sampler != "ddim" and eta > 0:
            raise UserError(f"eta applies to the ddim sampler only (sampler is {sampler})")
        if loop and window is None:
            raise UserError("loop needs windowed sampling: give a window (e.g. --window 16)")
        if window is not None and not (window >= 1 and 0 <= window_overlap < window):
            raise UserError(f"window must be >= 1 and window_overlap between 0 and window - 1, "
                            f"got window {window}, window_overlap {window_overlap}")
        if num_videos_per_prompt < 1:
            raise UserError(f"num_videos_per_prompt must be >= 1, got {num_videos_per_prompt}")
        self._check_size(height, width, num_frames, steps)

    def prompt_context(self, prompts: list[str], negative_prompt: str | list[str],
                       guidance_scale: float, videos_per_prompt: int = 1,
                       prompt_embeds: torch.Tensor | None = None,
                       negative_prompt_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's text context: (B, L, D), or [uncond; cond] (2B, L, D) when guided, as
        diffusers batches them; each prompt repeated `videos_per_prompt` times."""
        context = prompt_embeds if prompt_embeds is not None else self.encode_prompt(prompts)
        context = context.repeat_interleave(videos_per_prompt, dim=0)
        if guidance_scale <= 1.0:
            return context
        if negative_prompt_embeds is None:
            count = len(prompts) if prompt_embeds is None else prompt_embeds.shape[0]
            negatives = [negative_prompt] * count if isinstance(negative_prompt, str) \
                else list(negative_prompt)
            if len(negatives) != count:  # as diffusers: a list must match the prompts
                raise UserError(f"{len(negatives)} negative prompts for {count} prompts; "
                                "give one string, or a list with one per prompt")
            negative_prompt_embeds = self.encode_prompt(negatives)
        negative = negative_prompt_embeds.repeat_interleave(videos_per_prompt, dim=0)
        if negative.shape != context.shape:
            prompts_shape = tuple((prompt_embeds if prompt_embeds is not None else context).shape)
            raise UserError(f"negative_prompt_embeds have shape "
                            f"{tuple(negative_prompt_embeds.shape)}, the prompt embeddings "
                            f"{prompts_shape}; they must match")
        return torch.cat([negative.to(context), context])

    @staticmethod
    def make_generator(seed: int | None, generator: Generators | None, batch: int
                       ) -> tuple[Generators, int | None]:
        """Always a generator (or one per video): it draws the initial noise (unless latents
        are given) and every later draw (DDIM with eta > 0, video-to-video), so a seed
        reproduces the whole run. Returns (generator, the seed used or None)."""
        if seed is not None and generator is not None:
            raise UserError("pass seed or generator, not both (a generator carries its own "
                            "seed)")
        if isinstance(generator, list) and len(generator) != batch:
            raise UserError(f"{len(generator)} generators for {batch} videos; give one, or one "
                            "per video")
        if generator is not None:
            return generator, None
        used_seed = seed if seed is not None else random.randrange(2**31)
        return torch.Generator("cpu").manual_seed(used_seed), used_seed

    def prepare_latents(self, shape: tuple[int, ...], generator: Generators,
                        latents: torch.Tensor | None, window: int | None, window_overlap: int,
                        freenoise: bool) -> torch.Tensor:
        """x_T: the given latents, or N(0, I) from the generator(s) (FreeNoise-rescheduled
        for windowed runs), on the device in the UNet's dtype."""
        if latents is None:
            latents = randn(shape, generator)
            num_frames = shape[2]
            if window is not None and freenoise and num_frames > window:
                stride = window - window_overlap
                generators = generator if isinstance(generator, list) else [generator]
                latents = torch.cat([reschedule_noise(part, window, stride, g) for part, g in
                                     zip(latents.split(len(latents) // len(generators)),
                                         generators)])
        elif tuple(latents.shape) != shape:
            raise UserError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(self.device, self.dtype)

    def guided_denoiser(self, context: torch.Tensor, guidance_scale: float,
                        frame_chunk: int | None) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """eps(x, t) = u + g (c - u) from one UNet call on [x, x] (g > 1), else the UNet."""
        guided = guidance_scale > 1.0

        def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
            model_input = torch.cat([x, x]) if guided else x
            eps = self.unet(model_input, t, context, frame_chunk=frame_chunk or 0)  # 0: none
            if not guided:
                return eps
            uncond, cond = eps.chunk(2)
            return uncond + guidance_scale * (cond - uncond)

        return denoise

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] = "", negative_prompt: str | list[str] = "", *,
                 num_frames: int = 16, height: int = 256, width: int = 256,
                 steps: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float = 9.0, sampler: str = "ddim", eta: float = 0.0,
                 seed: int | None = None, generator: Generators | None = None,
                 latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 num_videos_per_prompt: int = 1,
                 init_video: torch.Tensor | None = None, video=None, strength: float = 0.6,
                 timestep_spacing: str | None = None, solver_order: int = 2,
                 window: int | None = None, window_overlap: int = 4, loop: bool = False,
                 freenoise: bool = True,
                 callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
                 callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] = ("latents",),
                 output: str = "uint8", output_type: str | None = None,
                 return_dict: bool = True, progress: bool = True,
                 decode_chunk_frames: int = DEFAULT_CHUNK_FRAMES,
                 frame_chunk: int | str | None = "auto") -> Generation | tuple:
        """Generate B videos (B = number of prompts x num_videos_per_prompt).

        `seed` or `generator` (CPU, for device-independent noise; not both; or a list of one
        generator per video) seeds every draw of the run; `latents` (B, 4, F, h, w) replace
        the initial noise. Without seed or generator a random seed is drawn and reported.
        `init_video` (B or 1, 3, F, H, W) in [-1, 1], or diffusers' `video` (frames in
        [0, 1] or uint8, t2v.pipeline.video_argument), switches to video-to-video.
        `window` (frames) turns on windowed sampling for long videos (t2v.windows): the UNet
        sees `window` frames at a time, windows overlap by `window_overlap`, `loop` wraps them
        around, and `freenoise` reschedules the initial noise as FreeNoise does.
        `callback(i, t, x, x0)` runs after every step; diffusers'
        `callback_on_step_end(pipe, i, t, {"latents": x})` too, and latents it returns replace
        the sampler's. `frame_chunk`: the UNet's per-frame layers run on at most this many
        frames at a time (None: all; "auto": auto_frame_chunk(frames the UNet sees)).
        `output`: "uint8" (B, F, H, W, 3), "float" (same, in [0, 1]) or "latents"; diffusers'
        `output_type` overrides it: "np", "pt" ((B, F, 3, H, W) in [0, 1]), "pil", "latent".
        `num_inference_steps` is diffusers' name for `steps` (default 50).
        """
        steps = resolve_steps(steps, num_inference_steps)
        kind = OUTPUT_TYPES.get(output_type, output_type) if output_type is not None else output
        if kind not in OUTPUTS:
            raise UserError(f"output must be one of {OUTPUTS} (output_type one of "
                            f"{tuple(OUTPUT_TYPES)}), got {output_type or output!r}")
        if set(callback_on_step_end_tensor_inputs) - {"latents"}:
            raise UserError("callback_on_step_end_tensor_inputs: only 'latents' is available")
        if video is not None:
            if init_video is not None:
                raise UserError("pass init_video or video, not both")
            init_video = video_argument(video)
        if init_video is not None:
            num_frames, height, width = init_video.shape[2], *init_video.shape[-2:]
        self.check_inputs(sampler=sampler, eta=eta, window=window,
                          window_overlap=window_overlap, loop=loop, height=height, width=width,
                          num_frames=num_frames, steps=steps,
                          num_videos_per_prompt=num_videos_per_prompt)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        context = self.prompt_context(prompts, negative_prompt, guidance_scale,
                                      num_videos_per_prompt, prompt_embeds,
                                      negative_prompt_embeds)
        batch = context.shape[0] // (2 if guidance_scale > 1.0 else 1)
        generator, used_seed = self.make_generator(seed, generator, batch)
        if isinstance(generator, list) and init_video is not None:
            raise UserError("video-to-video takes one generator (or a seed), not a list")

        spacing = timestep_spacing or self.config.schedule.timestep_spacing
        options = {"spacing": spacing, "generator": generator}
        if sampler == "ddim":
            options["eta"] = eta
        else:
            options["order"] = solver_order
        f = self.vae_scale_factor
        start = 0
        if init_video is None:
            shape = (batch, self.config.unet.in_channels, num_frames, height // f, width // f)
            x = self.prepare_latents(shape, generator, latents, window, window_overlap,
                                     freenoise)
        else:
            x, start = self._video_to_video_start(init_video, batch, steps, strength, sampler,
                                                  spacing, generator, decode_chunk_frames)

        if frame_chunk == "auto":
            frame_chunk = auto_frame_chunk(min(num_frames, window or num_frames))
        denoise = self.guided_denoiser(context, guidance_scale, frame_chunk)
        if window is not None:
            denoise = windowed(denoise, window, window_overlap, loop)
        x = self.denoising_loop(denoise, x, sampler, steps, start, options, progress, callback,
                                callback_on_step_end)
        result = Generation(self.decode(x, kind, decode_chunk_frames, progress, output_type),
                            used_seed)
        return result if return_dict else (result.frames,)

    def denoising_loop(self, denoise, x: torch.Tensor, sampler: str, steps: int, start: int,
                       options: dict, progress: bool, callback=None, callback_on_step_end=None
                       ) -> torch.Tensor:
        """The sampler over the denoiser, with a progress bar, a NaN stop and the callbacks."""
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
            if callback_on_step_end is not None:
                returned = callback_on_step_end(self, i, t, {"latents": x}) or {}
                if "latents" in returned and returned["latents"] is not x:
                    x.copy_(returned["latents"])  # the sampler continues from these

        try:
            if start < steps:
                with self._stage(self.unet):
                    x = SAMPLERS[sampler](denoise, x, self.schedule, steps, start=start,
                                          callback=on_step, **options)
        finally:
            bar.close()
        return x

    def decode(self, latents: torch.Tensor, kind: str = "uint8",
               chunk_frames: int = DEFAULT_CHUNK_FRAMES, progress: bool = False,
               output_type: str | None = None):
        """Latents -> frames as `kind` ("uint8", "float", "latents") in t2v's layout
        (B, F, H, W, 3), then in diffusers' form if `output_type` is given."""
        if kind == "latents":
            return latents
        b, f = latents.shape[0], latents.shape[2]
        out = None
        # Chunk by chunk straight into the output: a uint8 video never exists in float32.
        for row, frames in self.iter_frames(latents, kind == "uint8", chunk_frames, progress):
            if out is None:
                out = frames.new_empty((b, f) + frames.shape[1:])  # (B, F, H, W, 3)
            out.view(b * f, *frames.shape[1:])[row:row + len(frames)] = frames
        if output_type == "np":
            return out.cpu().numpy()
        if output_type == "pt":
            return out.permute(0, 1, 4, 2, 3)  # (B, F, 3, H, W), diffusers' layout
        if output_type == "pil":
            from PIL import Image

            return [[Image.fromarray(frame) for frame in clip]
                    for clip in (out * 255).round().to(torch.uint8).cpu().numpy()]
        return out

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


def load_pipeline(source: str | None, model: ModelConfig | None = None, *,
                  revision: str | None = None, variant: str | None = None,
                  dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu", offload: bool = False, seed: int = 0,
                  local_files_only: bool | None = None) -> tuple[TextToVideo, str]:
    """The one way t2v builds a pipeline (sample CLI, trainer, from_pretrained): the weights
    of `source` in any layout t2v.weights reads (the config comes with them), or, when
    `source` is None, random weights from `model` seeded by `seed`. `offload` keeps the
    models on the CPU and runs each on `device` in turn. Returns (pipeline, layout), the
    layout "random" for random weights."""
    home = "cpu" if offload else device
    if source is None:
        if model is None:
            raise UserError("no weights source and no model config to build random weights")
        pipe = TextToVideo.from_config(model, seed=seed, dtype=dtype, vae_dtype=vae_dtype,
                                       device=home)
        layout = "random"
    else:
        from t2v.weights import load_models

        m = load_models(source, revision=revision, variant=variant, dtype=dtype,
                        vae_dtype=vae_dtype, device=home, local_files_only=local_files_only)
        pipe, layout = TextToVideo(m.config, m.text_encoder, m.unet, m.vae), m.layout
    if offload:
        pipe.offload_to = torch.device(device)
    return pipe, layout


def video_argument(video) -> torch.Tensor:
    """diffusers' `video=` input -> init_video (B, 3, F, H, W) in [-1, 1]. Accepted: a list of
    PIL images or of (H, W, 3) arrays, an array (F, H, W, 3), a tensor (F, 3, H, W) or
    (B, F, 3, H, W); floats in [0, 1] (or [-1, 1] when any value is negative, as diffusers'
    VideoProcessor reads them) or uint8 (0-255)."""
    if isinstance(video, (list, tuple)):
        video = np.stack([np.asarray(frame) for frame in video])
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise UserError(f"video: expected frames (F, H, W, 3), got shape {video.shape}")
        video = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2)  # F 3 H W
    if not isinstance(video, torch.Tensor):
        raise UserError(f"video: expected a list of frames, an array or a tensor, got "
                        f"{type(video).__name__}")
    if video.ndim == 4:
        video = video[None]
    if video.ndim != 5 or video.shape[2] != 3:
        raise UserError(f"video: expected (F, 3, H, W) or (B, F, 3, H, W), got "
                        f"{tuple(video.shape)}")
    if video.dtype == torch.uint8:
        video = video.float() / 255.0
    elif video.min() < 0:  # as diffusers' VideoProcessor: negative values mean [-1, 1] already
        return video.float().permute(0, 2, 1, 3, 4)
    return (video.float() * 2 - 1).permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W) in [-1, 1]


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
