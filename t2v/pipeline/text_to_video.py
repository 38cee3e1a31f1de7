"""Text-to-video (and video-to-video): prompt in, frames out.

    pipe = TextToVideo.from_pretrained("ali-vilab/text-to-video-ms-1.7b", dtype=torch.float16)
    result = pipe("an astronaut riding a horse", GenerationOptions(steps=25), seed=42)
    result.frames   # uint8 (B, F, H, W, 3); result.seed is the seed used

The loop, as diffusers' TextToVideoSDPipeline and ModelScope run it:

    context = TextEncoder(tokens(prompt)), uncond = TextEncoder(tokens(negative_prompt or ""))
    x_T ~ N(0, I) of shape (B, 4, F, H/8, W/8), drawn on a CPU generator
    eps(x, t) = u + g (c - u) with [u, c] = UNet([x, x], t, [uncond, context])   (g > 1)
    x_0 = sampler(eps, x_T)                   # DDIM / DPM-Solver / ... (t2v.sampling.samplers)
    video = VAE.decode(x_0 / 0.18215), frame by frame, in chunks -> [-1, 1] -> uint8

Every setting is a field of t2v.pipeline.options.GenerationOptions; the call's keywords
(diffusers' names included) go through t2v.pipeline.arguments. The sampling tools live in
t2v.sampling and wrap the denoiser or the UNet call; where the run starts (noise, video-to-video,
first frames) is t2v.pipeline.latents.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from t2v.config import ModelConfig
from t2v.errors import NumericalError, UserError
from t2v.loading.lora_formats import merge_lora_file
from t2v.loading.weights import load_models
from t2v.models.text_encoder import TextEncoder
from t2v.models.tokenizer import Tokenizer
from t2v.models.unet import UNet3D, guidance_scale_embedding
from t2v.models.vae import DEFAULT_CHUNK_FRAMES, AutoencoderKL
from t2v.pipeline import latents as start_of
from t2v.pipeline.arguments import CallInputs, call_arguments
from t2v.pipeline.inputs import read_image_file, read_video_file
from t2v.pipeline.options import GenerationOptions
from t2v.sampling import guidance_parallel as cfg_parallel
from t2v.sampling.deep_cache import DeepCache
from t2v.sampling.freeinit import FreeInit, reinitialize
from t2v.sampling.freeu import FreeU
from t2v.sampling.guidance import guide
from t2v.sampling.prompt_travel import resolve_schedule, schedule_embedding, window_centre
from t2v.sampling.prompt_weighting import count_chunks, encode_weighted
from t2v.sampling.samplers import SAMPLERS, sampler_options
from t2v.sampling.schedule import noise_schedule
from t2v.sampling.unet_call import unet_call
from t2v.sampling.windows import windowed

log = logging.getLogger(__name__)

# Above this many frames in the UNet's view, its per-frame layers run in chunks of
# AUTO_FRAME_CHUNK frames (UNet3D.forward's frame_chunk): bounded working memory, same results.
AUTO_FRAME_CHUNK_ABOVE = 24
AUTO_FRAME_CHUNK = 8


def auto_frame_chunk(frames_in_view: int) -> int | None:
    """The frame chunk "auto" means: AUTO_FRAME_CHUNK when the UNet sees more than
    AUTO_FRAME_CHUNK_ABOVE frames at once, else None (all frames together)."""
    return AUTO_FRAME_CHUNK if frames_in_view > AUTO_FRAME_CHUNK_ABOVE else None


@dataclass
class Generation:
    """`frames`: uint8 (B, F, H, W, 3), float (B, F, H, W, 3) in [0, 1], or latents
    (B, 4, F, h, w) as requested (with diffusers' output_type: a numpy array (B, F, H, W, 3),
    a tensor (B, F, 3, H, W) in [0, 1], lists of PIL images, or latents); `seed`: the seed of
    the run's generator (initial noise unless latents were given, and every later draw); None
    if the caller passed a generator."""

    frames: torch.Tensor
    seed: int | None


@dataclass
class TextContext:
    """The UNet's text context of a run: (B, L, D), or [uncond; cond] (2B, L, D) when guided;
    `batch` videos; `schedule` {frame: prompt} for prompt travel (context per keyframe)."""

    context: torch.Tensor
    batch: int
    schedule: dict[int, str] | None


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
        adapted layer names (text-encoder ones as `text_encoder.NAME`). A consistency-distilled
        student's file also gives the UNet its guidance-scale embedding (docs/few-step.md)."""

        names = merge_lora_file(path, scale, self.unet, self.text_encoder)
        if self.unet.cfg != self.config.unet:  # a distilled student's guidance embedding
            self.config = dataclasses.replace(self.config, unet=self.unet.cfg)
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

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] = "", options: GenerationOptions | None = None,
                 **keywords) -> Generation | tuple:
        """Generate B videos (B = prompts x num_videos_per_prompt) with `options` (default
        GenerationOptions(); a string or list there is the negative prompt, t2v's earlier
        signature); keywords replace option fields (diffusers' names too, e.g.
        num_inference_steps) or give the call's inputs: generator, latents, prompt_embeds,
        negative_prompt_embeds, num_videos_per_prompt, init_video / video / init_image /
        continue_from as tensors, callback(i, t, x, x0), callback_on_step_end, output /
        output_type, return_dict, progress, decode_chunk_frames, frame_chunk (docs/api.md)."""
        o, call = call_arguments(prompt, options, keywords, self.defaults())
        self.check_options(o)
        if o.guidance_parallel:
            cfg_parallel.check(o.guidance_scale)
            if o.seed is None and call.generator is None:  # one seed: the same noise
                o = dataclasses.replace(o, seed=cfg_parallel.shared_seed())
        text = self.text_context(o, call)
        generator, used_seed = start_of.make_generator(o.seed, call.generator, text.batch)
        x, start, anchor = self.start(o, call, text.batch, generator)
        if o.guidance_parallel:
            cfg_parallel.check_same(x, "initial latents")
        denoise, deep_cache = self.denoiser(o, call, text)
        x = self.sample(denoise, x, start, anchor, o, call, generator, deep_cache)
        frames = self.decode(x, call.kind, call.decode_chunk_frames, call.progress,
                             call.output_type)
        result = Generation(frames, used_seed)
        return result if call.return_dict else (result.frames,)

    def defaults(self) -> dict:
        """The option values set on the pipeline (enable_freeu / enable_free_init)."""
        return {name: value for name, value in (("freeu", self.freeu),
                                                ("free_init", self.free_init))
                if value is not None}

    def check_options(self, o: GenerationOptions) -> None:
        """What the options cannot know: this model's pixels per latent and training steps."""
        factor = self.vae_scale_factor
        for name in ("height", "width"):
            if getattr(o, name) % factor:
                raise UserError(f"{name} must be a positive multiple of {factor}, got "
                                f"{getattr(o, name)}")
        if not o.steps <= self.schedule.num_train_timesteps:
            raise UserError(f"steps must be between 1 and {self.schedule.num_train_timesteps}, "
                            f"got {o.steps}")
        if self.config.unet.time_cond_proj_dim:
            unused = [name for name, value in (
                ("negative_prompt", o.negative_prompt), ("guidance_rescale", o.guidance_rescale),
                ("guidance_interval", o.guidance_interval),
                ("guidance_parallel", o.guidance_parallel)) if value]
            if unused:
                raise UserError(f"{', '.join(unused)}: this model embeds the guidance scale "
                                "(model.unet.time_cond_proj_dim) and runs no unconditional "
                                "pass; leave them unset")

    def cfg_scale(self, o: GenerationOptions) -> float:
        """The classifier-free guidance scale of a run: 1 (no unconditional pass) for a model
        that embeds the guidance scale instead (model.unet.time_cond_proj_dim)."""
        return 1.0 if self.config.unet.time_cond_proj_dim else o.guidance_scale

    def guidance_condition(self, o: GenerationOptions) -> torch.Tensor | None:
        """(1, time_cond_proj_dim): the embedding of w = guidance_scale - 1 for a model that
        embeds the guidance scale (LCM's convention: its teacher's eps_c + w (eps_c - eps_u) is
        diffusers' and t2v's guidance_scale w + 1), else None."""
        dim = self.config.unet.time_cond_proj_dim
        if not dim:
            return None
        w = torch.tensor([o.guidance_scale - 1.0])
        return guidance_scale_embedding(w, dim).to(self.device, self.dtype)

    def spacing(self, o: GenerationOptions) -> str | None:
        """The timestep spacing of a run: the options', else the model scheduler config's."""
        return o.timestep_spacing or self.config.schedule.timestep_spacing

    def text_context(self, o: GenerationOptions, call: CallInputs) -> TextContext:
        """Encode the prompts (or a prompt schedule's keyframe prompts) and negative prompts."""
        prompts, negative = call.prompts, call.negative_prompts or o.negative_prompt
        schedule = None
        if call.prompt_schedule is not None or o.prompt_schedule is not None:
            schedule = self.check_prompt_schedule(call.prompt_schedule or o.prompt_schedule,
                                                  call, o)
            prompts = list(schedule.values())
            if isinstance(negative, list):
                if len(negative) != 1:
                    raise UserError(f"{len(negative)} negative prompts for one prompt "
                                    "schedule; give one")
                negative = negative[0]
        context = self.prompt_context(prompts, negative, self.cfg_scale(o),
                                      call.num_videos_per_prompt, call.prompt_embeds,
                                      call.negative_prompt_embeds, o.prompt_weighting)
        batch = context.shape[0] // (2 if self.cfg_scale(o) > 1.0 else 1)
        if schedule is not None:
            batch //= len(schedule)  # every keyframe's context belongs to the one video
        return TextContext(context, batch, schedule)

    def check_prompt_schedule(self, prompt_schedule: str | dict, call: CallInputs,
                              o: GenerationOptions) -> dict[int, str]:
        """The prompt schedule {frame: prompt} sorted by frame, after the checks: parsed and in
        range (t2v.sampling.prompt_travel.resolve_schedule), a window given, no prompt or
        embeddings besides it."""
        schedule = resolve_schedule(prompt_schedule, o.num_frames)
        if o.window is None:
            raise UserError("prompt_schedule needs windowed sampling: give a window (e.g. "
                            "--window 16)")
        if any(call.prompts) or call.prompt_embeds is not None or \
                call.negative_prompt_embeds is not None:
            raise UserError("prompt_schedule takes the place of the prompt: give no prompt, "
                            "prompt_embeds or negative_prompt_embeds with it")
        if o.window >= o.num_frames and not o.loop:
            log.warning("prompt_schedule: the window covers all %d frames, so the whole video "
                        "takes the schedule's prompt at its centre frame", o.num_frames)
        return schedule

    def start(self, o: GenerationOptions, call: CallInputs, batch: int, generator):
        """(x, index of the first step, first-frame anchor or None): noise for text-to-video,
        the noised input video for video-to-video (t2v.pipeline.latents)."""
        chunk = call.decode_chunk_frames
        video = call.init_video
        if video is None and o.init_video is not None:
            video = read_video_file(o.init_video, o.num_frames, o.height, o.width)
        if video is not None:
            if o.free_init.num_iters:
                raise UserError("free_init applies to text-to-video only, not with init_video")
            x, start = start_of.video_to_video_start(self, video, batch, o, generator, chunk)
        else:
            f = self.vae_scale_factor
            shape = (batch, self.config.unet.in_channels, o.num_frames, o.height // f,
                     o.width // f)
            x = start_of.initial_noise(shape, generator, call.latents, o)
            x, start = x.to(self.device, self.latent_dtype), 0
        image, previous = call.init_image, call.continue_from
        if image is None and o.init_image is not None:
            image = read_image_file(o.init_image, o.height, o.width)
        if previous is None and o.continue_from is not None:  # in diffusers' (1, F, 3, H, W)
            previous = (read_video_file(o.continue_from, None, o.height, o.width) + 1) / 2
            previous = previous.permute(0, 2, 1, 3, 4)
        anchor = start_of.first_frames(self, image, previous, o, x.shape, generator, chunk)
        return x, start, anchor

    def denoiser(self, o: GenerationOptions, call: CallInputs, text: TextContext
                 ) -> tuple[Callable, DeepCache | None]:
        """eps(x, t) of the run: guided (or guidance-parallel), through FreeU / DeepCache,
        windowed, or travelling through a prompt schedule."""
        frame_chunk = call.frame_chunk
        if frame_chunk == "auto":
            frame_chunk = auto_frame_chunk(min(o.num_frames, o.window or o.num_frames))
        freeu = FreeU.of(o.freeu)
        deep_cache = DeepCache(o.cache_interval, o.cache_branch) \
            if o.cache_interval != 1 else None

        def denoiser_for(context: torch.Tensor) -> Callable[[torch.Tensor, int], torch.Tensor]:
            if o.guidance_parallel:
                return cfg_parallel.guided_denoiser(self.unet, context, o.guidance_scale,
                                                    frame_chunk, o.guidance_rescale,
                                                    freeu=freeu)
            return self.guided_denoiser(context, self.cfg_scale(o), frame_chunk,
                                        o.guidance_rescale, deep_cache, o.guidance_interval,
                                        freeu, self.guidance_condition(o))

        if text.schedule is not None:
            travel = self.travel_denoiser(list(text.schedule), text.context,
                                          self.cfg_scale(o) > 1.0,
                                          o.num_frames, o.loop, denoiser_for)
            return windowed(travel, o.window, o.window_overlap, o.loop,
                            pass_frames=True), deep_cache
        denoise = denoiser_for(text.context)
        if o.window is not None:
            denoise = windowed(denoise, o.window, o.window_overlap, o.loop)
        return denoise, deep_cache

    def sample(self, denoise, x: torch.Tensor, start: int, anchor, o: GenerationOptions,
               call: CallInputs, generator, deep_cache: DeepCache | None) -> torch.Tensor:
        """The sampler over `denoise` from x, once, or once per FreeInit pass (each later pass
        starts from the previous result's low frequencies, t2v.sampling.freeinit)."""
        free_init = FreeInit.of(dataclasses.asdict(o.free_init)) \
            if o.free_init.num_iters else None
        options = {"spacing": self.spacing(o), "generator": generator,
                   **sampler_options(o.sampler, eta=o.eta, solver_order=o.solver_order,
                                     thresholding=o.thresholding,
                                     dynamic_thresholding_ratio=o.dynamic_thresholding_ratio,
                                     sample_max_value=o.sample_max_value,
                                     noise_start=start == 0 and call.init_video is None
                                     and o.init_video is None,
                                     lcm_original_steps=o.lcm.original_steps,
                                     lcm_rule=o.lcm.timesteps)}
        initial_noise = x
        for k in range(free_init.num_iters if free_init else 1):
            if k > 0:
                x = reinitialize(x, initial_noise, self.schedule.alphas_cumprod, free_init,
                                 generator)
                # later passes start from an ordinary x_t, not N(0, I): no Euler start scaling
                options = {**options, "noise_start": False} if "noise_start" in options \
                    else options
            steps = free_init.steps_of_pass(o.steps, k) if free_init else o.steps
            if deep_cache is not None:
                deep_cache.reset()  # each pass starts with a full UNet call
            on_step = call.callback
            if anchor is not None:
                x, on_step = start_of.anchored(self, anchor, x, o, steps, call.callback)
            x = self.denoising_loop(denoise, x, o.sampler, steps, start, options,
                                    call.progress, on_step, call.callback_on_step_end)
        return x

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

    def guided_denoiser(self, context: torch.Tensor, guidance_scale: float,
                        frame_chunk: int | None, guidance_rescale: float = 0.0,
                        deep_cache: DeepCache | None = None,
                        guidance_interval: tuple[float, float] | None = None,
                        freeu: FreeU | None = None, timestep_cond: torch.Tensor | None = None
                        ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """eps(x, t) = u + g (c - u) from one UNet call on [x, x] (g > 1), rescaled by
        t2v.sampling.guidance.guide if guidance_rescale > 0; else the UNet. The UNet call is
        t2v.sampling.unet_call's: `frame_chunk` (None or 0: off), `freeu` (FreeU's factors) and
        `deep_cache` (DeepCache's state) shape it. `guidance_interval` (low, high): guided
        only at timesteps low <= t <= high, the conditional output alone elsewhere (one UNet
        pass on x with the prompt's context; with DeepCache both passes still run, so that its
        cached features keep their batch). `timestep_cond`: the guidance-scale embedding of a
        model that has one (`guidance_condition`), given to every UNet call."""
        guided = guidance_scale > 1.0
        unet = unet_call(self.unet, frame_chunk=frame_chunk or None, freeu=freeu,
                         deep_cache=deep_cache, timestep_cond=timestep_cond)

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
