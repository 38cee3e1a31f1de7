"""Text-to-video (and video-to-video): prompt in, frames out.

    pipe = TextToVideo.from_pretrained("ali-vilab/text-to-video-ms-1.7b", dtype=torch.float16)
    result = pipe("an astronaut riding a horse", num_frames=16, seed=42)
    result.frames   # uint8 (B, F, H, W, 3); result.seed is the seed used

The loop, as diffusers' TextToVideoSDPipeline and ModelScope run it:

    context = TextEncoder(tokens(prompt)), uncond = TextEncoder(tokens(negative_prompt or ""))
    x_T ~ N(0, I) of shape (B, 4, F, H/8, W/8), drawn on a CPU generator
    eps(x, t) = u + g (c - u) with [u, c] = UNet([x, x], t, [uncond, context])   (g > 1)
    x_0 = sampler(eps, x_T)                   # DDIM / DPM-Solver (t2v.sampling.samplers)
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
from t2v.loading.lora_formats import merge_lora_file
from t2v.loading.weights import load_models
from t2v.models.text_encoder import TextEncoder
from t2v.models.tokenizer import Tokenizer
from t2v.models.unet import UNet3D
from t2v.models.vae import DEFAULT_CHUNK_FRAMES, AutoencoderKL
from t2v.noise import randn
from t2v.sampling import guidance_parallel as cfg_parallel
from t2v.sampling.deep_cache import DEFAULT_BRANCH, DeepCache
from t2v.sampling.first_frames import FirstFrames, check_weights, fading_weights
from t2v.sampling.freeinit import FreeInit, reinitialize
from t2v.sampling.freeu import FreeU
from t2v.sampling.guidance import guide
from t2v.sampling.prompt_travel import resolve_schedule, schedule_embedding, window_centre
from t2v.sampling.prompt_weighting import count_chunks, encode_weighted
from t2v.sampling.samplers import SAMPLERS, first_alpha_cumprod, sampler_options
from t2v.sampling.schedule import add_noise, noise_schedule
from t2v.sampling.unet_call import unet_call
from t2v.sampling.windows import reschedule_noise, windowed

log = logging.getLogger(__name__)

OUTPUTS = ("uint8", "float", "latents")
# diffusers' output_type -> the frames computed ("np", "pt", "pil": float in [0, 1]).
OUTPUT_TYPES = {"np": "float", "pt": "float", "pil": "float", "latent": "latents"}
DEFAULT_STEPS = 50  # diffusers' TextToVideoSDPipeline default
# Above this many frames in the UNet's view, its per-frame layers run in chunks of
# AUTO_FRAME_CHUNK frames (UNet3D.forward's frame_chunk): bounded working memory, same results.
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
        # Defaults of the `freeu` / `free_init` call arguments, set as diffusers users do:
        # enable_freeu(...), enable_free_init(...).
        self.freeu: FreeU | None = None
        self.free_init: FreeInit | None = None

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """diffusers' FreeU switch (t2v.sampling.freeu; ms-1.7b: b1=1.2, b2=1.4, s1=0.9, s2=0.2)."""
        self.freeu = FreeU(b1=b1, b2=b2, s1=s1, s2=s2)

    def disable_freeu(self) -> None:
        self.freeu = None

    def enable_free_init(self, num_iters: int = 3, use_fast_sampling: bool = False,
                         method: str = "butterworth", order: int = 4,
                         spatial_stop_frequency: float = 0.25,
                         temporal_stop_frequency: float = 0.25) -> None:
        """diffusers' FreeInit switch, same names and defaults (t2v.sampling.freeinit)."""
        self.free_init = FreeInit(num_iters, use_fast_sampling, method, order,
                                  spatial_stop_frequency, temporal_stop_frequency)

    def disable_free_init(self) -> None:
        self.free_init = None

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
        """Any layout `t2v.loading.weights.load_models` reads: local folder or hub repo id.
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
        """Random weights (PyTorch's default init): output is noise-like. Each component is
        drawn from its own seed (text encoder `seed`, UNet `seed + 1`, VAE `seed + 2`), so
        changing one component's config leaves the others' initial weights as they were."""
        def seeded(offset: int, build):
            torch.manual_seed(seed + offset)
            return build()

        return cls(config,
                   seeded(0, lambda: TextEncoder(config.text_encoder)).to(device, dtype).eval(),
                   seeded(1, lambda: UNet3D(config.unet)).to(device, dtype).eval(),
                   seeded(2, lambda: AutoencoderKL(config.vae)).to(device, vae_dtype or dtype
                                                                   ).eval())

    def load_lora(self, path, scale: float = 1.0) -> list[str]:
        """Merge a LoRA file into the UNet (and text encoder): t2v's own (`python -m t2v.train`),
        diffusers/PEFT, kohya or Text-To-Video-Finetuning's Stable LoRA (t2v.loading.lora_formats):
        W += scale * (alpha / rank) B A. Several files merge one after the other. Returns the
        adapted layer names (text-encoder ones as `text_encoder.NAME`)."""

        return merge_lora_file(path, scale, self.unet, self.text_encoder)

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

    @property
    def latent_dtype(self) -> torch.dtype:
        """The sampler state's dtype: float32 when the UNet runs in float16 or bfloat16 (each
        UNet call gets its input in the UNet's dtype, the update x_t -> x_t-1 and guidance
        happen in float32), else the UNet's."""
        return torch.promote_types(self.dtype, torch.float32)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], weighted: bool = False,
                      min_chunks: int = 1) -> torch.Tensor:
        """Prompts -> (B, 77, width) text embeddings in the UNet's dtype. `weighted`: prompts
        in A1111's weighting syntax and of any length -> (B, 77 n, width), n chunks, at least
        `min_chunks` (t2v.sampling.prompt_weighting.encode_weighted)."""
        with self._stage(self.text_encoder) as text_encoder:
            if weighted:
                return encode_weighted(text_encoder, self.tokenizer, prompts,
                                       min_chunks).to(self.device, self.dtype)
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
                     num_frames: int, steps: int, num_videos_per_prompt: int,
                     thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                     sample_max_value: float = 1.0) -> None:
        """Everything about the arguments that can be wrong, before any model runs."""
        if sampler not in SAMPLERS:
            raise UserError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
        # eta and thresholding only where the sampler has them (ConfigError is a UserError)
        sampler_options(sampler, eta=eta, thresholding=thresholding,
                        dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                        sample_max_value=sample_max_value)
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
                       negative_prompt_embeds: torch.Tensor | None = None,
                       prompt_weighting: bool = False) -> torch.Tensor:
        """The UNet's text context: (B, L, D), or [uncond; cond] (2B, L, D) when guided, as
        diffusers batches them; each prompt repeated `videos_per_prompt` times.
        `prompt_weighting`: prompts (and negative prompts) in A1111's syntax, any length
        (t2v.sampling.prompt_weighting), all padded to the same number of chunks."""
        guided = guidance_scale > 1.0
        negatives = []
        if guided and negative_prompt_embeds is None:
            count = len(prompts) if prompt_embeds is None else prompt_embeds.shape[0]
            negatives = [negative_prompt] * count if isinstance(negative_prompt, str) \
                else list(negative_prompt)
            if len(negatives) != count:  # as diffusers: a list must match the prompts
                raise UserError(f"{len(negatives)} negative prompts for {count} prompts; "
                                "give one string, or a list with one per prompt")
        chunks = 1
        if prompt_weighting:
            chunks = count_chunks(self.tokenizer,
                                  (prompts if prompt_embeds is None else []) + negatives)
        context = prompt_embeds if prompt_embeds is not None else \
            self.encode_prompt(prompts, prompt_weighting, chunks)
        context = context.repeat_interleave(videos_per_prompt, dim=0)
        if not guided:
            return context
        if negative_prompt_embeds is None:
            negative_prompt_embeds = self.encode_prompt(negatives, prompt_weighting, chunks)
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
        for windowed runs), on the device in `latent_dtype`."""
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
        return latents.to(self.device, self.latent_dtype)

    def guided_denoiser(self, context: torch.Tensor, guidance_scale: float,
                        frame_chunk: int | None, guidance_rescale: float = 0.0,
                        deep_cache: DeepCache | None = None,
                        guidance_interval: tuple[float, float] | None = None,
                        freeu: FreeU | None = None
                        ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """eps(x, t) = u + g (c - u) from one UNet call on [x, x] (g > 1), rescaled by
        t2v.sampling.guidance.guide if guidance_rescale > 0; else the UNet. The UNet call is
        t2v.sampling.unet_call's: `frame_chunk` (None or 0: off), `freeu` (FreeU's factors) and
        `deep_cache` (DeepCache's state) shape it. `guidance_interval` (low, high): guided
        only at timesteps low <= t <= high, the conditional output alone elsewhere (one UNet
        pass on x with the prompt's context; with DeepCache both passes still run, so that its
        cached features keep their batch)."""
        guided = guidance_scale > 1.0
        unet = unet_call(self.unet, frame_chunk=frame_chunk or None, freeu=freeu,
                         deep_cache=deep_cache)

        def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
            inside = guidance_interval is None or \
                guidance_interval[0] <= t <= guidance_interval[1]
            if guided and not inside and deep_cache is None:  # the conditional pass alone
                return unet(x.to(self.dtype), t, context.chunk(2)[1]).to(x.dtype)
            model_input = (torch.cat([x, x]) if guided else x).to(self.dtype)
            eps = unet(model_input, t, context).to(x.dtype)
            if not guided:
                return eps
            uncond, cond = eps.chunk(2)
            return guide(uncond, cond, guidance_scale, guidance_rescale) if inside else cond

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
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0,
                 window: int | None = None, window_overlap: int = 4, loop: bool = False,
                 freenoise: bool = True, guidance_rescale: float = 0.0,
                 guidance_interval: tuple[float, float] | list[float] | None = None,
                 guidance_parallel: bool = False,
                 freeu: FreeU | tuple | dict | None = None,
                 free_init: FreeInit | int | dict | None = None,
                 init_image=None, init_frames: int = 4,
                 init_weights: tuple[float, ...] | list[float] | None = None,
                 continue_from=None, continue_frames: int = 4,
                 prompt_weighting: bool = False, prompt_schedule: str | dict | None = None,
                 cache_interval: int = 1, cache_branch: int = DEFAULT_BRANCH,
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
        [0, 1] or uint8, t2v.pipeline.text_to_video.video_argument), switches to video-to-video.
        `window` (frames) turns on windowed sampling for long videos (t2v.sampling.windows): the UNet
        sees `window` frames at a time, windows overlap by `window_overlap`, `loop` wraps them
        around, and `freenoise` reschedules the initial noise as FreeNoise does.
        `callback(i, t, x, x0)` runs after every step; diffusers'
        `callback_on_step_end(pipe, i, t, {"latents": x})` too, and latents it returns replace
        the sampler's. `frame_chunk`: the UNet's per-frame layers run on at most this many
        frames at a time (None: all; "auto": auto_frame_chunk(frames the UNet sees)).
        `output`: "uint8" (B, F, H, W, 3), "float" (same, in [0, 1]) or "latents"; diffusers'
        `output_type` overrides it: "np", "pt" ((B, F, 3, H, W) in [0, 1]), "pil", "latent".
        `num_inference_steps` is diffusers' name for `steps` (default 50).
        `sampler`: a name of t2v.sampling.samplers.SAMPLERS; `thresholding` with
        `dynamic_thresholding_ratio` and `sample_max_value` is diffusers' dynamic thresholding
        of the x0 predictions (t2v.sampling.samplers.THRESHOLDING_SAMPLERS only).
        `prompt_weighting`: prompts in A1111's weighting syntax, (word:1.3) etc., and longer
        than 77 tokens, in chunks (t2v.sampling.prompt_weighting). `prompt_schedule` ("0: a red ball |
        32: a blue ball", or {frame: prompt}) conditions each window on the schedule's prompt
        embedding at the window's centre frame (t2v.sampling.prompt_travel); it needs `window` and
        takes the place of `prompt`.
        `guidance_rescale` (t2v.sampling.guidance), `freeu` (b1, b2, s1, s2; t2v.sampling.freeu) and
        `free_init` (passes or a FreeInit; t2v.sampling.freeinit) default to what
        enable_freeu / enable_free_init set (off).
        `guidance_interval` (low, high): classifier-free guidance only at timesteps
        low <= t <= high (0-999), the conditional prediction alone at the others, one UNet
        pass instead of two (Kynkaenniemi et al. 2024, arXiv 2404.07724; docs/sampling-tools.md).
        `cache_interval` N > 1: DeepCache, a full UNet call every N calls and shallow ones
        reusing its deep features between (t2v.sampling.deep_cache; an approximation, opt-in);
        `cache_branch` the skip branch the shallow calls recompute (0: the shallowest).
        `guidance_parallel`: the unconditional pass on rank 0, the conditional one on rank 1 of
        a 2-process group, combined every step (t2v.sampling.guidance_parallel); every rank calls with
        the same arguments and gets the same result (a seed is shared if none is given).
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
                          num_videos_per_prompt=num_videos_per_prompt,
                          thresholding=thresholding,
                          dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                          sample_max_value=sample_max_value)
        freeu = self.freeu if freeu is None else FreeU.of(freeu or None)  # False: off
        free_init = self.free_init if free_init is None else FreeInit.of(free_init or None)
        if not 0.0 <= guidance_rescale <= 1.0:
            raise UserError(f"guidance_rescale must be between 0 and 1, got {guidance_rescale}")
        guidance_interval = check_guidance_interval(guidance_interval)
        if guidance_parallel:
            cfg_parallel.check(guidance_scale)
            if guidance_interval is not None:
                raise UserError("guidance_interval does not combine with guidance_parallel yet")
            if seed is None and generator is None:  # one seed: the same noise on both ranks
                seed = cfg_parallel.shared_seed()
        if init_video is not None and (init_image is not None or continue_from is not None):
            raise UserError("init_image / continue_from start a new clip; they do not combine "
                            "with init_video (video-to-video)")
        if free_init is not None and init_video is not None:
            raise UserError("free_init applies to text-to-video only, not with init_video")
        deep_cache = DeepCache(cache_interval, cache_branch) if cache_interval != 1 else None
        if deep_cache is not None and (window is not None or guidance_parallel):
            raise UserError("cache_interval (DeepCache) does not combine with windowed sampling "
                            "or guidance_parallel yet; use cache_interval=1 with them")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        schedule = None
        if prompt_schedule is not None:  # one video; its keyframes' prompts encoded together
            schedule = self.check_prompt_schedule(prompt_schedule, prompts, num_frames, window,
                                                  loop, prompt_embeds, negative_prompt_embeds)
            prompts = list(schedule.values())
            negative_prompt = negative_prompt if isinstance(negative_prompt, str) \
                else one_negative_prompt(negative_prompt)
        context = self.prompt_context(prompts, negative_prompt, guidance_scale,
                                      num_videos_per_prompt, prompt_embeds,
                                      negative_prompt_embeds, prompt_weighting)
        batch = context.shape[0] // (2 if guidance_scale > 1.0 else 1)
        if schedule is not None:
            batch //= len(schedule)  # every keyframe's context belongs to the one video
        generator, used_seed = self.make_generator(seed, generator, batch)
        if isinstance(generator, list) and init_video is not None:
            raise UserError("video-to-video takes one generator (or a seed), not a list")

        spacing = timestep_spacing or self.config.schedule.timestep_spacing
        options = {"spacing": spacing, "generator": generator,
                   **sampler_options(sampler, eta=eta, solver_order=solver_order,
                                     thresholding=thresholding,
                                     dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                                     sample_max_value=sample_max_value,
                                     noise_start=init_video is None)}
        f = self.vae_scale_factor
        start = 0
        if init_video is None:
            shape = (batch, self.config.unet.in_channels, num_frames, height // f, width // f)
            x = self.prepare_latents(shape, generator, latents, window, window_overlap,
                                     freenoise)
        else:
            x, start = self._video_to_video_start(init_video, batch, steps, strength, sampler,
                                                  spacing, generator, decode_chunk_frames)

        anchor = self._first_frames(init_image, init_frames, init_weights, continue_from,
                                    continue_frames, x.shape, generator, decode_chunk_frames)
        if frame_chunk == "auto":
            frame_chunk = auto_frame_chunk(min(num_frames, window or num_frames))

        if guidance_parallel:
            cfg_parallel.check_same(x, "initial latents")

        def denoiser_for(context: torch.Tensor) -> Callable[[torch.Tensor, int], torch.Tensor]:
            if guidance_parallel:
                return cfg_parallel.guided_denoiser(self.unet, context, guidance_scale,
                                                    frame_chunk, guidance_rescale, freeu=freeu)
            return self.guided_denoiser(context, guidance_scale, frame_chunk, guidance_rescale,
                                        deep_cache, guidance_interval, freeu)

        if schedule is None:
            denoise = denoiser_for(context)
            if window is not None:
                denoise = windowed(denoise, window, window_overlap, loop)
        else:
            denoise = windowed(self.travel_denoiser(list(schedule), context, guidance_scale > 1,
                                                    num_frames, loop, denoiser_for),
                               window, window_overlap, loop, pass_frames=True)
        initial_noise = x
        for k in range(free_init.num_iters if free_init else 1):
            if k > 0:  # FreeInit: the next pass starts from this result's low frequencies
                x = reinitialize(x, initial_noise, self.schedule.alphas_cumprod, free_init,
                                 generator)
            pass_steps = free_init.steps_of_pass(steps, k) if free_init else steps
            if deep_cache is not None:
                deep_cache.reset()  # each pass starts with a full UNet call
            on_step = callback
            if anchor is not None:
                x, on_step = self._anchored(anchor, x, sampler, pass_steps, spacing,
                                            callback)
            # FreeInit's later passes start from an ordinary x_t, not from N(0, I): no
            # Euler start scaling (t2v.sampling.samplers.sampler_options, noise_start)
            pass_options = options if k == 0 or "noise_start" not in options else \
                {**options, "noise_start": False}
            x = self.denoising_loop(denoise, x, sampler, pass_steps, start, pass_options,
                                    progress, on_step, callback_on_step_end)
        result = Generation(self.decode(x, kind, decode_chunk_frames, progress, output_type),
                            used_seed)
        return result if return_dict else (result.frames,)

    @staticmethod
    def check_prompt_schedule(prompt_schedule: str | dict, prompts: list[str], num_frames: int,
                              window: int | None, loop: bool, prompt_embeds, negative_prompt_embeds
                              ) -> dict[int, str]:
        """The prompt schedule {frame: prompt} sorted by frame, after the checks: parsed and in
        range (t2v.sampling.prompt_travel.resolve_schedule), a window given, no prompt or embeddings
        besides it."""
        schedule = resolve_schedule(prompt_schedule, num_frames)
        if window is None:
            raise UserError("prompt_schedule needs windowed sampling: give a window (e.g. "
                            "--window 16)")
        if any(prompts) or prompt_embeds is not None or negative_prompt_embeds is not None:
            raise UserError("prompt_schedule takes the place of the prompt: give no prompt, "
                            "prompt_embeds or negative_prompt_embeds with it")
        if window >= num_frames and not loop:
            log.warning("prompt_schedule: the window covers all %d frames, so the whole video "
                        "takes the schedule's prompt at its centre frame", num_frames)
        return schedule

    def travel_denoiser(self, keyframes: list[int], context: torch.Tensor, guided: bool,
                        num_frames: int, loop: bool,
                        denoiser_for: Callable[[torch.Tensor], Callable]) -> Callable:
        """Prompt travel, for windowed(..., pass_frames=True): the window of frames
        [s, s + n) runs denoiser_for(its context), the conditional part the schedule's
        embedding at the window's centre (t2v.sampling.prompt_travel), the unconditional part the
        negative prompt's. `context`: prompt_context of the keyframes' prompts ([uncond;
        cond], keyframe by keyframe, each repeated per video)."""
        parts = context.unflatten(0, (2 if guided else 1, len(keyframes), -1))  # (., K, B, L, D)
        denoisers = {}  # (start, size) -> denoiser: the windows are the same every step

        def denoise(x: torch.Tensor, t: int, frames: torch.Tensor) -> torch.Tensor:
            key = (int(frames[0]), len(frames))
            if key not in denoisers:
                cond = schedule_embedding(keyframes, parts[-1], window_centre(*key, num_frames,
                                                                              loop))
                denoisers[key] = denoiser_for(torch.cat([parts[0, 0], cond]) if guided else cond)
            return denoisers[key](x, t)

        return denoise

    def _first_frames(self, init_image, init_frames: int, init_weights, continue_from,
                      continue_frames: int, shape, generator, chunk) -> FirstFrames | None:
        """The conditioning of t2v.sampling.first_frames: (latents, weights, noise) or None."""
        if init_image is not None and continue_from is not None:
            raise UserError("pass init_image or continue_from, not both")
        if init_image is None and continue_from is None:
            return None
        batch, _, num_frames, h, w = shape
        if init_image is not None:
            k, what = init_frames, "init_image"
            weights = (fading_weights(k) if init_weights is None
                       else check_weights(init_weights, k, "init_weights"))
            frames = image_argument(init_image)  # (B, 3, 1, H, W)
        else:
            k, what = continue_frames, "continue_from"
            weights = (1.0,) * k if init_weights is None else check_weights(init_weights, k,
                                                                            "init_weights")
            frames = video_argument(continue_from)
            if frames.shape[2] < k:
                raise UserError(f"continue_from has {frames.shape[2]} frames; continue_frames "
                                f"is {k}")
            frames = frames[:, :, -k:]
        if not 1 <= k <= num_frames:
            raise UserError(f"{what}: between 1 and num_frames ({num_frames}) conditioning "
                            f"frames, got {k}")
        f = self.vae_scale_factor
        if tuple(frames.shape[-2:]) != (h * f, w * f):
            raise UserError(f"{what} is {frames.shape[-1]}x{frames.shape[-2]} pixels, the video "
                            f"{w * f}x{h * f}; resize it (the CLI does)")
        if frames.shape[0] not in (1, batch):
            raise UserError(f"{what} has batch {frames.shape[0]}, the run {batch} videos")
        frames = frames.expand(batch, 3, k, h * f, w * f)  # an image repeats K times
        with self._stage(self.vae) as vae:
            latents = vae.encode_video(frames.to(self.device, self.vae.dtype),
                                       generator=generator, chunk_frames=chunk)
        noise = randn(latents.shape, generator, self.device, torch.float32)
        return FirstFrames(latents.float(), torch.tensor(weights), noise)

    def _anchored(self, anchor: FirstFrames, x: torch.Tensor, sampler: str, steps: int,
                  spacing: str | None, callback):
        """x with the conditioning frames at the first step's noise level, and the step
        callback that re-imposes them at each next level (t2v.sampling.first_frames)."""
        levels = [first_alpha_cumprod(sampler, steps, self.schedule, spacing, i)
                  for i in range(steps)] + [None]
        x = x.clone()
        anchor.replace_(x, levels[0])

        def on_step(i, t, x, x0):
            anchor.replace_(x, levels[i + 1])
            if callback is not None:
                callback(i, t, x, x0)

        return x, on_step

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
            return latents.to(self.latent_dtype), start
        a = first_alpha_cumprod(sampler, steps, self.schedule, spacing, start)
        b, c, f, h, w = latents.shape
        # Drawn after the posterior noise, folded ((b f), c, h, w), as diffusers draws it.
        noise = randn((b * f, c, h, w), generator, latents.device, latents.dtype)
        noise = noise.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
        x = add_noise(latents, noise, a.to(latents.device))
        return x.to(self.latent_dtype), start


def load_pipeline(source: str | None, model: ModelConfig | None = None, *,
                  revision: str | None = None, variant: str | None = None,
                  dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu", offload: bool = False, seed: int = 0,
                  local_files_only: bool | None = None) -> tuple[TextToVideo, str]:
    """The one way t2v builds a pipeline (sample CLI, trainer, from_pretrained): the weights
    of `source` in any layout t2v.loading.weights reads (the config comes with them), or, when
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

        m = load_models(source, revision=revision, variant=variant, dtype=dtype,
                        vae_dtype=vae_dtype, device=home, local_files_only=local_files_only)
        pipe, layout = TextToVideo(m.config, m.text_encoder, m.unet, m.vae), m.layout
    if offload:
        pipe.offload_to = torch.device(device)
    return pipe, layout


def check_guidance_interval(interval) -> tuple[float, float] | None:
    """None, or (low, high) timesteps with 0 <= low <= high <= 999 (UserError otherwise)."""
    if interval is None:
        return None
    try:
        low, high = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise UserError(f"guidance_interval must be two timesteps (low, high), got {interval!r}")
    if not 0 <= low <= high <= 999:
        raise UserError(f"guidance_interval must satisfy 0 <= low <= high <= 999 (timesteps), "
                        f"got ({low:g}, {high:g})")
    return low, high


def one_negative_prompt(negative_prompt: list[str]) -> str:
    """A prompt schedule makes one video: a list of negative prompts must hold one."""
    if len(negative_prompt) != 1:
        raise UserError(f"{len(negative_prompt)} negative prompts for one prompt schedule; "
                        "give one")
    return negative_prompt[0]


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


def image_argument(image) -> torch.Tensor:
    """init_image -> (B, 3, 1, H, W) in [-1, 1]: a PIL image, an (H, W, 3) array (uint8, or
    floats in [0, 1]), or a tensor (3, H, W) / (B, 3, H, W) in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[1] != 3:
            raise UserError(f"init_image: expected a tensor (3, H, W) or (B, 3, H, W), got "
                            f"{tuple(image.shape)}")
        return image.float()[:, :, None]
    return video_argument([np.asarray(image.convert("RGB") if hasattr(image, "convert")
                                      else image)])


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
