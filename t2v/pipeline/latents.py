"""Where sampling starts: the run's generator, x_T (noise, given latents, or a noised input
video for video-to-video) and the first-frame conditioning that is re-imposed every step.

Video-to-video (SDEdit, Meng et al. 2022, arXiv:2108.01073; diffusers' VideoToVideoSDPipeline):
encode the input video with the VAE (a posterior sample), noise it to the timestep where the
last `int(steps * strength)` steps begin, and run only those steps.
"""

from __future__ import annotations

import random

import torch

from t2v.errors import UserError
from t2v.noise import randn
from t2v.pipeline.inputs import image_argument, video_argument
from t2v.pipeline.options import GenerationOptions
from t2v.sampling.first_frames import FirstFrames, check_weights, fading_weights
from t2v.sampling.samplers import first_alpha_cumprod
from t2v.sampling.schedule import add_noise
from t2v.sampling.windows import reschedule_noise

Generators = torch.Generator | list  # one generator, or one per video


def make_generator(seed: int | None, generator: Generators | None, batch: int
                   ) -> tuple[Generators, int | None]:
    """Always a generator (or one per video): it draws the initial noise (unless latents
    are given) and every later draw (DDIM with eta > 0, video-to-video), so a seed
    reproduces the whole run. Returns (generator, the seed used or None)."""
    if seed is not None and generator is not None:
        raise UserError("pass seed or generator, not both (a generator carries its own seed)")
    if isinstance(generator, list) and len(generator) != batch:
        raise UserError(f"{len(generator)} generators for {batch} videos; give one, or one "
                        "per video")
    if generator is not None:
        return generator, None
    used_seed = seed if seed is not None else random.randrange(2**31)
    return torch.Generator("cpu").manual_seed(used_seed), used_seed


def initial_noise(shape: tuple[int, ...], generator: Generators, latents: torch.Tensor | None,
                  o: GenerationOptions) -> torch.Tensor:
    """x_T: the given latents, or N(0, I) from the generator(s), FreeNoise-rescheduled for
    windowed runs (t2v.sampling.windows)."""
    if latents is not None:
        if tuple(latents.shape) != shape:
            raise UserError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents
    latents = randn(shape, generator)
    if o.window is not None and o.freenoise and shape[2] > o.window:
        stride = o.window - o.window_overlap
        generators = generator if isinstance(generator, list) else [generator]
        latents = torch.cat([reschedule_noise(part, o.window, stride, g) for part, g in
                             zip(latents.split(len(latents) // len(generators)), generators)])
    return latents


def video_to_video_start(pipe, video: torch.Tensor, batch: int, o: GenerationOptions,
                         generator: Generators, chunk: int) -> tuple[torch.Tensor, int]:
    """(x at the first kept step, that step's index): encode, then noise (diffusers'
    VideoToVideoSDPipeline)."""
    if isinstance(generator, list):
        raise UserError("video-to-video takes one generator (or a seed), not a list")
    if video.shape[0] not in (1, batch):
        raise UserError(f"init_video has batch {video.shape[0]}, prompts {batch}")
    video = video.to(pipe.device, pipe.vae.dtype).expand(batch, *video.shape[1:])
    with pipe._stage(pipe.vae) as vae:
        latents = vae.encode_video(video, generator=generator, chunk_frames=chunk)
    start = o.steps - min(int(o.steps * o.strength), o.steps)
    if start == o.steps:  # strength 0: nothing to denoise, the reconstruction
        return latents.to(pipe.latent_dtype), start
    a = first_alpha_cumprod(o.sampler, o.steps, pipe.schedule, pipe.spacing(o), start)
    b, c, f, h, w = latents.shape
    # Drawn after the posterior noise, folded ((b f), c, h, w), as diffusers draws it.
    noise = randn((b * f, c, h, w), generator, latents.device, latents.dtype)
    noise = noise.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
    x = add_noise(latents, noise, a.to(latents.device))
    return x.to(pipe.latent_dtype), start


def _conditioning_frames(init_image, continue_from, o: GenerationOptions
                         ) -> tuple[str, int, tuple[float, ...], torch.Tensor]:
    """(what, K, weights, frames (B, 3, K, H, W) in [-1, 1]) of the conditioning input."""
    if init_image is not None:
        k, what = o.init_frames, "init_image"
        weights = (fading_weights(k) if o.init_weights is None
                   else check_weights(o.init_weights, k, "init_weights"))
        return what, k, weights, image_argument(init_image)  # (B, 3, 1, H, W)
    k, what = o.continue_frames, "continue_from"
    weights = (1.0,) * k if o.init_weights is None else check_weights(o.init_weights, k,
                                                                      "init_weights")
    frames = video_argument(continue_from)
    if frames.shape[2] < k:
        raise UserError(f"continue_from has {frames.shape[2]} frames; continue_frames is {k}")
    return what, k, weights, frames[:, :, -k:]


def first_frames(pipe, init_image, continue_from, o: GenerationOptions, shape, generator,
                 chunk: int) -> FirstFrames | None:
    """The conditioning of t2v.sampling.first_frames: (latents, weights, noise), or None.
    `continue_from`: a video in diffusers' forms (t2v.pipeline.inputs.video_argument)."""
    if init_image is None and continue_from is None:
        return None
    batch, _, num_frames, h, w = shape
    what, k, weights, frames = _conditioning_frames(init_image, continue_from, o)
    if not 1 <= k <= num_frames:
        raise UserError(f"{what}: between 1 and num_frames ({num_frames}) conditioning "
                        f"frames, got {k}")
    f = pipe.vae_scale_factor
    if tuple(frames.shape[-2:]) != (h * f, w * f):
        raise UserError(f"{what} is {frames.shape[-1]}x{frames.shape[-2]} pixels, the video "
                        f"{w * f}x{h * f}; resize it (the CLI does)")
    if frames.shape[0] not in (1, batch):
        raise UserError(f"{what} has batch {frames.shape[0]}, the run {batch} videos")
    frames = frames.expand(batch, 3, k, h * f, w * f)  # an image repeats K times
    with pipe._stage(pipe.vae) as vae:
        latents = vae.encode_video(frames.to(pipe.device, pipe.vae.dtype),
                                   generator=generator, chunk_frames=chunk)
    noise = randn(latents.shape, generator, pipe.device, torch.float32)
    return FirstFrames(latents.float(), torch.tensor(weights), noise)


def anchored(pipe, anchor: FirstFrames, x: torch.Tensor, o: GenerationOptions, steps: int,
             callback):
    """x with the conditioning frames at the first step's noise level, and the step
    callback that re-imposes them at each next level (t2v.sampling.first_frames)."""
    levels = [first_alpha_cumprod(o.sampler, steps, pipe.schedule, pipe.spacing(o), i)
              for i in range(steps)] + [None]
    x = x.clone()
    anchor.replace_(x, levels[0])

    def on_step(i, t, x, x0):
        anchor.replace_(x, levels[i + 1])
        if callback is not None:
            callback(i, t, x, x0)

    return x, on_step
