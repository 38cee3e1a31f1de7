"""python -m t2v.sample: prompt in, a video that plays everywhere out.

    python -m t2v.sample --config configs/ms17b.yaml --prompt "an astronaut riding a horse"
    python -m t2v.sample --config configs/tiny.yaml --prompt "a test"     # offline, random weights
    torchrun --nproc_per_node 2 -m t2v.sample --config C --prompts-file prompts.txt --out videos/

Flags override the config's `sample.*` values; trailing `key=value` arguments override any
config key. Every video gets a JSON sidecar (`<output>.json`) with the resolved config, seed and
weights; `--config <output>.json` reproduces the run. Exit codes: 0 success, 2 usage or config
error (one line on stderr), 1 runtime failure. Flag reference: docs/cli.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch

from t2v import __version__
from t2v.atomic import atomic_path
from t2v.config import Config, apply_overrides, config_from_dict, config_to_dict, load_config
from t2v.errors import ConfigError, NumericalError, OneLineParser, UserError, fail
from t2v.models.lora import parse_lora_arg
from t2v.models.memory import GIB, estimate_memory, parse_size, resident_bytes
from t2v.pipeline.text_to_video import (
    TextToVideo,
    auto_frame_chunk,
    frames_to_video_tensor,
    load_pipeline,
)
from t2v.pipeline.video_io import read_video, write_gif, write_mp4, write_png_frames
from t2v.sampling import guidance_parallel
from t2v.sampling.freeu import RECOMMENDED as FREEU_RECOMMENDED
from t2v.sampling.guidance_parallel import shared_seed
from t2v.sampling.samplers import SAMPLERS

log = logging.getLogger("t2v.cli.sample")

FORMATS = {"mp4": ".mp4", "gif": ".gif", "png": ""}
FREEU_DEFAULT = (FREEU_RECOMMENDED.b1, FREEU_RECOMMENDED.b2, FREEU_RECOMMENDED.s1,
                 FREEU_RECOMMENDED.s2)  # --freeu without numbers
LONG_RUN_FRAMES = 24  # longer runs print the memory estimate first (zeroscope trains on 24)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# flag -> SampleConfig field
SAMPLE_FLAGS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed",
                "frames": "num_frames", "height": "height", "width": "width", "steps": "steps",
                "sampler": "sampler", "guidance": "guidance_scale", "eta": "eta", "fps": "fps",
                "init_video": "init_video", "strength": "strength", "window": "window",
                "window_overlap": "window_overlap", "loop": "loop",
                "thresholding": "thresholding",
                "dynamic_thresholding_ratio": "dynamic_thresholding_ratio",
                "sample_max_value": "sample_max_value",
                "prompt_weighting": "prompt_weighting", "prompt_schedule": "prompt_schedule",
                "guidance_rescale": "guidance_rescale", "freeu": "freeu",
                "guidance_interval": "guidance_interval",
                "init_image": "init_image", "init_frames": "init_frames",
                "init_weights": "init_weights", "continue_from": "continue_from",
                "continue_frames": "continue_frames", "guidance_parallel": "guidance_parallel",
                "cache_interval": "cache_interval", "cache_branch": "cache_branch"}


def read_config(path: str | None, overrides: list[str]) -> Config:
    """A YAML config, or a sidecar JSON written by this command (its "config" section)."""
    if path is not None and path.endswith(".json") and Path(path).is_file():
        try:
            data = json.loads(Path(path).read_text())
        except ValueError:
            raise ConfigError(f"{path}: not valid JSON") from None
        if isinstance(data, dict) and "config" in data:
            return apply_overrides(config_from_dict(Config, data["config"], path), overrides, path)
    return load_config(path, overrides)


def build_parser(cfg: Config, add_help: bool = True) -> argparse.ArgumentParser:
    s = cfg.sample
    p = OneLineParser(prog="python -m t2v.sample",
                      description="Generate videos with the ModelScope text-to-video model.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter, add_help=add_help)
    p.add_argument("--config", default=None,
                   help="YAML config (e.g. configs/ms17b.yaml) or a sidecar .json to reproduce")
    p.add_argument("--prompt", default=s.prompt, help="what the video shows")
    p.add_argument("--negative-prompt", default=s.negative_prompt,
                   help="what to steer away from (the unconditional branch)")
    p.add_argument("--prompts-file", type=Path, default=None,
                   help="one prompt per line (blank lines and # comments skipped)")
    p.add_argument("--seed", type=int, default=s.seed,
                   help="noise seed (prompt i of a file uses seed + i); random if unset")
    p.add_argument("--frames", type=int, default=s.num_frames, help="number of frames")
    p.add_argument("--height", type=int, default=s.height, help="pixels, a multiple of 8")
    p.add_argument("--width", type=int, default=s.width, help="pixels, a multiple of 8")
    p.add_argument("--steps", type=int, default=s.steps, help="sampling steps")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=s.sampler, help="sampler")
    p.add_argument("--guidance", type=float, default=s.guidance_scale,
                   help="classifier-free guidance scale (1 disables the unconditional pass)")
    p.add_argument("--eta", type=float, default=s.eta, help="DDIM noise (0 = deterministic)")
    p.add_argument("--thresholding", action=argparse.BooleanOptionalAction,
                   default=s.thresholding,
                   help="dynamic thresholding of the x0 predictions, per frame (diffusers' "
                   "thresholding=True; ddim, dpmsolver++, dpmsolver, sde-dpmsolver++, unipc)")
    p.add_argument("--dynamic-thresholding-ratio", type=float,
                   default=s.dynamic_thresholding_ratio,
                   help="thresholding: the quantile of |x0| taken as the threshold s")
    p.add_argument("--sample-max-value", type=float, default=s.sample_max_value,
                   help="thresholding: the largest threshold s (x0 is clamped to [-s, s] / s)")
    p.add_argument("--fps", type=int, default=s.fps, help="frames per second of the output")
    p.add_argument("--weights", default=cfg.weights.source,
                   help="local folder or hub repo id in any layout; unset = random weights")
    p.add_argument("--revision", default=cfg.weights.revision, help="hub revision")
    p.add_argument("--variant", default=cfg.weights.variant,
                   help="diffusers weights variant, e.g. fp16 (half the download)")
    p.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                   help="merge a LoRA file (t2v.training.trainer's, diffusers/PEFT, kohya or Text-To-"
                   "Video-Finetuning's Stable LoRA) into the UNet and text encoder, scaled "
                   "(default 1); repeat for several (replaces weights.lora of the config)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if "
                   "available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights and activations (auto: float16 on cuda, float32 on cpu)")
    p.add_argument("--offload", choices=["none", "model"], default="none",
                   help="model: keep the models on the CPU and move each to --device only for "
                   "its stage (text encoder, UNet, VAE): one model on the accelerator at a time")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="refuse to start when the estimated peak memory exceeds SIZE (e.g. 16GB) "
                   "and say which settings would fit; the estimate is printed for long runs")
    p.add_argument("--vae-dtype", default="float32", choices=list(DTYPES),
                   help="VAE precision (float32 avoids black/NaN frames of half VAEs)")
    p.add_argument("--init-video", default=s.init_video,
                   help="video-to-video: the input video (any format FFmpeg reads)")
    p.add_argument("--strength", type=float, default=s.strength,
                   help="video-to-video: share of the steps that run (0 = reconstruction)")
    p.add_argument("--window", type=int, default=s.window,
                   help="windowed sampling for long videos: frames the UNet sees at once "
                   "(e.g. 16 for ms-1.7b, 24 for zeroscope); unset = all frames")
    p.add_argument("--window-overlap", type=int, default=s.window_overlap,
                   help="frames shared by neighbouring windows")
    p.add_argument("--loop", action=argparse.BooleanOptionalAction, default=s.loop,
                   help="windows wrap around: a seamless loop (needs --window)")
    p.add_argument("--prompt-weighting", action=argparse.BooleanOptionalAction,
                   default=s.prompt_weighting,
                   help="read prompts in AUTOMATIC1111's syntax: (word:1.3), (word) = x1.1, "
                   "[word] = /1.1, \\( for a literal bracket; prompts past 77 tokens in 75-token "
                   "chunks (docs/sampling-tools.md)")
    p.add_argument("--prompt-schedule", default=s.prompt_schedule, metavar="SCHEDULE",
                   help="prompt travel in place of --prompt: \"0: a red ball | 32: a blue "
                   "ball\"; each window takes the prompt interpolated at its centre frame "
                   "(needs --window; docs/sampling-tools.md)")
    p.add_argument("--init-image", default=s.init_image, metavar="IMAGE",
                   help="first-frame conditioning: the image (resized) is kept in the first "
                   "--init-frames frames, fading (docs/sampling-tools.md)")
    p.add_argument("--init-frames", type=int, default=s.init_frames, metavar="K",
                   help="frames the init image conditions (weights 1 - f/K)")
    p.add_argument("--init-weights", type=float_list, default=s.init_weights, metavar="W,W,..",
                   help="per-frame weights of the conditioning frames instead (1 = kept)")
    p.add_argument("--continue-from", default=s.continue_from, metavar="VIDEO",
                   help="continue a video: its last --continue-frames frames start the clip")
    p.add_argument("--continue-frames", type=int, default=s.continue_frames, metavar="K",
                   help="frames of --continue-from repeated at the start of the new clip")
    p.add_argument("--guidance-rescale", type=float, default=s.guidance_rescale,
                   metavar="PHI", help="rescale guided outputs toward the conditional "
                   "output's std (0 = off, 0.7 = the paper's value; docs/sampling-tools.md)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=s.guidance_interval,
                   metavar=("LOW", "HIGH"), help="guide only at timesteps LOW <= t <= HIGH "
                   "(0-999), the conditional prediction alone elsewhere "
                   "(docs/sampling-tools.md)")
    p.add_argument("--guidance-parallel", action=argparse.BooleanOptionalAction,
                   default=s.guidance_parallel,
                   help="under torchrun --nproc_per_node 2: rank 0 runs the unconditional UNet "
                   "pass, rank 1 the conditional one, of the same videos (prompts not split); "
                   "rank 0 writes (docs/multi-gpu.md)")
    p.add_argument("--freeu", type=float, nargs="*", default=s.freeu,
                   metavar="B1 B2 S1 S2", help="FreeU; without numbers diffusers' values for "
                   f"this model family, {' '.join(str(v) for v in FREEU_DEFAULT)}")
    p.add_argument("--cache-interval", type=int, default=s.cache_interval, metavar="N",
                   help="DeepCache: a full UNet call every N steps, shallow ones reusing its "
                   "deep features between (1 = off; an approximation, docs/sampling-tools.md)")
    p.add_argument("--cache-branch", type=int, default=s.cache_branch, metavar="B",
                   help="DeepCache: the skip branch shallow calls recompute, 0 (the shallowest, "
                   "fastest) to the layers of the first block")
    p.add_argument("--free-init", type=int, default=s.free_init.num_iters, metavar="N",
                   help="FreeInit: N sampling passes (0 = off)")
    p.add_argument("--free-init-method", choices=["butterworth", "gaussian", "ideal"],
                   default=s.free_init.method, help="FreeInit's low-pass filter")
    p.add_argument("--free-init-fast", action=argparse.BooleanOptionalAction,
                   default=s.free_init.use_fast_sampling,
                   help="FreeInit's coarse-to-fine passes (fewer steps in early passes)")
    p.add_argument("--out", type=Path, default=None,
                   help="output file (one prompt) or folder (default: outputs/)")
    p.add_argument("--format", choices=list(FORMATS), default=None,
                   help="mp4 (H.264), gif or png (a folder of frames); default from --out or mp4")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. sample.solver_order=3")
    return p


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")


def parse(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    """Two passes: the config first, so that --help shows its values as the defaults."""
    # The same parser without help: the config path and the positional overrides, with every
    # flag's value consumed by its flag (a prompt containing "=" is not an override).
    known, _ = build_parser(Config(), add_help=False).parse_known_args(argv)
    cfg = read_config(known.config, known.overrides)
    args = build_parser(cfg).parse_args(argv)
    if args.freeu is not None and len(args.freeu) == 0:
        args.freeu = list(FREEU_DEFAULT)
    sample = {field: getattr(args, flag) for flag, field in SAMPLE_FLAGS.items()}
    sample["freeu"] = tuple(args.freeu) if args.freeu is not None else None
    if args.guidance_interval is not None:
        sample["guidance_interval"] = tuple(args.guidance_interval)
    try:
        cfg = dataclasses.replace(
            cfg, sample=dataclasses.replace(
                cfg.sample, **sample, free_init=dataclasses.replace(
                    cfg.sample.free_init, num_iters=args.free_init, method=args.free_init_method,
                    use_fast_sampling=args.free_init_fast)),
            weights=dataclasses.replace(cfg.weights, source=args.weights, revision=args.revision,
                                        variant=args.variant,
                                        lora=tuple(args.lora if args.lora is not None
                                                   else cfg.weights.lora)))
    except ConfigError as exc:
        raise ConfigError(f"command line: {exc}") from None
    return args, cfg


def read_prompts(args: argparse.Namespace, cfg: Config) -> list[str]:
    if args.prompts_file is not None:
        if cfg.sample.prompt_schedule is not None:
            raise UserError("--prompts-file and --prompt-schedule: give one of them")
        try:
            lines = args.prompts_file.read_text().splitlines()
        except OSError as exc:
            raise UserError(f"{args.prompts_file}: cannot read ({exc.strerror})") from None
        prompts = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        if not prompts:
            raise UserError(f"{args.prompts_file}: no prompts in the file")
        return prompts
    if cfg.sample.prompt_schedule is not None:
        return [""]  # the schedule holds the prompts
    if not cfg.sample.prompt:
        raise UserError("no prompt: pass --prompt \"...\" or --prompts-file FILE")
    return [cfg.sample.prompt]


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "video"


def output_paths(args: argparse.Namespace, prompts: list[str], seeds: list[int]) -> list[Path]:
    fmt = args.format
    out = args.out
    if out is not None and out.suffix and len(prompts) == 1:
        by_suffix = {v: k for k, v in FORMATS.items() if v}.get(out.suffix.lower())
        if by_suffix is None:
            raise UserError(f"{out}: unknown extension; use .mp4 or .gif, or --format png "
                            "with a folder name")
        if fmt is not None and fmt != by_suffix:
            raise UserError(f"--out {out} does not match --format {fmt}")
        return [out]
    ext = FORMATS[fmt or "mp4"]
    folder = out or Path("outputs")
    digits = len(str(len(prompts)))
    paths = []
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        prefix = f"{i:0{digits}d}-" if len(prompts) > 1 else ""
        paths.append(folder / f"{prefix}{slug(prompt)}-{seed}{ext}")
    return paths


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but CUDA is not available here; use --device cpu")
    return device


def check_writable(path: Path) -> None:
    """Refuse, before any model loads, an output whose folder cannot be made or written."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{path}: cannot write there: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot write there: no write permission in {folder}")


def write_output(frames, path: Path, fmt: str, fps: int, metadata: dict, overwrite: bool):
    try:
        if fmt == "mp4":
            write_mp4(frames, path, fps, metadata, overwrite)
        elif fmt == "gif":
            write_gif(frames, path, fps, overwrite)
        else:
            write_png_frames(frames, path, overwrite)
    except OSError as exc:  # includes PyAV's errors for files it cannot open
        raise UserError(f"{path}: cannot write ({exc.strerror or exc})") from None


def check_memory(args, cfg: Config, device: torch.device, dtype, vae_dtype, offload: bool,
                 streamed: bool, baseline: int | None = None) -> None:
    """Print the memory estimate for long runs; refuse runs over --max-memory. `baseline`:
    the process's memory before the models loaded (default: measured now, on CPU runs)."""

    budget = None
    if args.max_memory is not None:
        try:
            budget = parse_size(args.max_memory)
        except ValueError as exc:
            raise UserError(f"--max-memory: {exc}") from None
    s = cfg.sample
    if budget is None and s.num_frames <= LONG_RUN_FRAMES:
        return


    if baseline is None:
        baseline = resident_bytes() if device.type == "cpu" else 0  # host memory: CPU only

    def estimate(**change):
        window = change.get("window", s.window)
        in_view = min(s.num_frames, window) if window else s.num_frames
        settings = dict(frames=s.num_frames, height=s.height, width=s.width,
                        frame_chunk=auto_frame_chunk(in_view),
                        guidance=s.guidance_scale > 1, window=s.window, dtype=dtype,
                        vae_dtype=vae_dtype, offload=offload and device.type != "cpu",
                        output_in_memory=not streamed, baseline=baseline)
        return estimate_memory(cfg.model, **{**settings, **change})

    est = estimate()
    if budget is None or est.peak <= budget:
        log.info("%s", est.summary())
        return
    hints = []
    if s.window is None and s.num_frames > 16:
        hints.append(f"--window 16 ({estimate(window=16).peak / GIB:.1f} GiB)")
    if not offload and device.type != "cpu":
        hints.append(f"--offload model ({estimate(offload=True).peak / GIB:.1f} GiB)")
    if dtype == torch.float32 and device.type != "cpu":
        hints.append(f"--dtype float16 ({estimate(dtype=torch.float16).peak / GIB:.1f} GiB)")
    hints.append("fewer --frames or a smaller --height/--width")
    raise UserError(f"estimated peak memory {est.peak / GIB:.1f} GiB exceeds --max-memory "
                    f"{budget / GIB:.1f} GiB; try {', '.join(hints)}")


def run(argv: list[str]) -> list[Path]:
    args, cfg = parse(argv)
    prompts = read_prompts(args, cfg)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    parallel = cfg.sample.guidance_parallel  # both ranks run every prompt, rank 0 writes
    device = resolve_device(args.device, local_rank)
    if parallel:
        start_guidance_parallel(world, cfg.sample.guidance_scale, device)
    base_seed = cfg.sample.seed if cfg.sample.seed is not None else random.randrange(2**31 - 10**6)
    if parallel and cfg.sample.seed is None:

        base_seed = shared_seed() % (2**31 - 10**6)
    elif world > 1 and cfg.sample.seed is None:
        raise UserError("several processes need a shared --seed (each would draw its own)")
    seeds = [base_seed + i for i in range(len(prompts))]
    paths = output_paths(args, [p or cfg.sample.prompt_schedule or "" for p in prompts], seeds)
    fmt = args.format or {v: k for k, v in FORMATS.items() if v}.get(paths[0].suffix, "png")
    mine = [i for i in range(len(prompts)) if parallel or i % world == rank]  # this share
    writer = rank == 0 or not parallel
    for i in mine:
        for path in (paths[i], paths[i].with_name(paths[i].name + ".json")):
            if path.exists() and not args.overwrite:
                raise UserError(f"{path}: already exists; pass --overwrite to replace it")
            check_writable(path)

    init_video = None
    if cfg.sample.init_video is not None:
        frames, _ = read_video(Path(cfg.sample.init_video), max_frames=cfg.sample.num_frames)
        init_video = frames_to_video_tensor(frames, cfg.sample.height, cfg.sample.width)

    conditioning = read_conditioning(cfg.sample)

    dtype = DTYPES[args.dtype] if args.dtype != "auto" else \
        (torch.float16 if device.type == "cuda" else torch.float32)
    vae_dtype = DTYPES[args.vae_dtype]
    offload = args.offload == "model"
    check_memory(args, cfg, device, dtype, vae_dtype, offload, streamed=fmt == "mp4")
    pipe, cfg, layout = build_pipeline(cfg, device, dtype, vae_dtype, offload)
    written = []
    for i in mine:
        run_cfg = dataclasses.replace(cfg, sample=dataclasses.replace(
            cfg.sample, prompt=prompts[i], seed=seeds[i]))
        if writer:
            log.info("[%d/%d] %s (seed %d)", i + 1, len(prompts),
                     prompts[i] or cfg.sample.prompt_schedule, seeds[i])
        latents = generate(pipe, run_cfg.sample, init_video,
                           progress=writer and not args.no_progress, conditioning=conditioning)
        if not writer:
            continue
        sidecar = sidecar_record(paths[i], fmt, run_cfg, layout, device, dtype, vae_dtype)
        write_outputs(pipe, latents, run_cfg, paths[i], fmt, sidecar, args.overwrite,
                      progress=not args.no_progress)
        print(paths[i], flush=True)
        written.append(paths[i])
    if parallel:
        torch.distributed.destroy_process_group()
    return written


def start_guidance_parallel(world: int, guidance_scale: float, device: torch.device) -> None:
    """--guidance-parallel: guidance on, exactly 2 processes; joins their process group."""
    guidance_parallel.check_scale(guidance_scale)
    if world != guidance_parallel.RANKS:
        raise UserError(f"--guidance-parallel needs exactly {guidance_parallel.RANKS} processes "
                        f"(torchrun --nproc_per_node {guidance_parallel.RANKS}), got {world}")
    guidance_parallel.init(device)


def build_pipeline(cfg: Config, device: torch.device, dtype, vae_dtype,
                   offload: bool) -> tuple[TextToVideo, Config, str]:
    """The pipeline of the config (t2v.pipeline.text_to_video.load_pipeline), LoRA files merged; returns
    it with the config of what was loaded and the layout."""
    if cfg.weights.source is None:
        log.warning("weights.source is null: using RANDOM weights (the video is noise); pass "
                    "--weights or use configs/ms17b.yaml for real output")
    pipe, layout = load_pipeline(cfg.weights.source, cfg.model, revision=cfg.weights.revision,
                                 variant=cfg.weights.variant, dtype=dtype, vae_dtype=vae_dtype,
                                 device=device, offload=offload)
    cfg = dataclasses.replace(cfg, model=pipe.config)  # what was actually loaded
    for spec in cfg.weights.lora:

        path, scale = parse_lora_arg(spec)
        names = pipe.load_lora(path, scale)
        log.info("merged LoRA %s (scale %g) into %d layers", path, scale, len(names))
    return pipe, cfg, layout


def read_conditioning(s) -> dict:
    """The first-frame conditioning arguments of the pipeline from sample.init_image /
    sample.continue_from, read and resized to the video size."""
    if s.init_image is not None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(s.init_image) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            reason = "not found" if isinstance(exc, FileNotFoundError) else "not a readable image"
            raise UserError(f"{s.init_image}: {reason} (--init-image)") from None
        image = frames_to_video_tensor(pixels[None], s.height, s.width)[:, :, 0]
        return {"init_image": image, "init_frames": s.init_frames,
                "init_weights": s.init_weights}
    if s.continue_from is not None:
        frames, _ = read_video(Path(s.continue_from))
        video = frames_to_video_tensor(frames, s.height, s.width)  # (1, 3, F, H, W) in [-1, 1]
        return {"continue_from": ((video + 1) / 2).permute(0, 2, 1, 3, 4),  # diffusers' form
                "continue_frames": s.continue_frames,
                "init_weights": s.init_weights}
    return {}


def sidecar_record(path: Path, fmt: str, cfg: Config, layout: str, device: torch.device,
                   dtype, vae_dtype) -> dict:
    """The JSON sidecar of one output: `--config <output>.json` reproduces the run."""
    return {"t2v_version": __version__, "output": str(path), "format": fmt,
            "weights": {"source": cfg.weights.source, "revision": cfg.weights.revision,
                        "layout": layout},
            "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "vae_dtype": str(vae_dtype).removeprefix("torch."),
            "config": config_to_dict(cfg)}


def generate(pipe: TextToVideo, s, init_video: torch.Tensor | None, progress: bool,
             conditioning: dict | None = None, callback=None) -> torch.Tensor:
    """One video's latents for the sample settings `s` (its prompt and seed included);
    `callback(i, t, x, x0)` after every step (the pipeline's)."""
    return pipe(s.prompt, s.negative_prompt, num_frames=s.num_frames, height=s.height,
                width=s.width, steps=s.steps, guidance_scale=s.guidance_scale,
                sampler=s.sampler, eta=s.eta, seed=s.seed, init_video=init_video,
                strength=s.strength, timestep_spacing=s.timestep_spacing,
                solver_order=s.solver_order, thresholding=s.thresholding,
                dynamic_thresholding_ratio=s.dynamic_thresholding_ratio,
                sample_max_value=s.sample_max_value, window=s.window,
                window_overlap=s.window_overlap,
                loop=s.loop, freenoise=s.freenoise, prompt_weighting=s.prompt_weighting,
                prompt_schedule=s.prompt_schedule, guidance_rescale=s.guidance_rescale,
                guidance_interval=s.guidance_interval, guidance_parallel=s.guidance_parallel,
                cache_interval=s.cache_interval,
                cache_branch=s.cache_branch,
                freeu=s.freeu or False,
                free_init=(dataclasses.asdict(s.free_init) if s.free_init.num_iters else False),
                output="latents", progress=progress, callback=callback,
                **(conditioning or {})).frames


def write_outputs(pipe: TextToVideo, latents: torch.Tensor, cfg: Config, path: Path, fmt: str,
                  sidecar: dict, overwrite: bool, progress: bool) -> None:
    """Decode and write the video (MP4: decoded chunks go straight into the encoder, the
    video is never held whole), then its JSON sidecar."""
    s = cfg.sample
    frames = (chunk.cpu().numpy() for _, chunk in pipe.iter_frames(latents, progress=progress))
    if fmt != "mp4":
        frames = np.concatenate(list(frames))
    params = {"prompt": s.prompt, "negative_prompt": s.negative_prompt, "seed": s.seed,
              "steps": s.steps, "sampler": s.sampler, "guidance_scale": s.guidance_scale,
              "frames": s.num_frames, "size": [s.width, s.height], "fps": s.fps,
              "weights": cfg.weights.source, "lora": list(cfg.weights.lora),
              "t2v_version": __version__}
    if s.prompt_schedule is not None:
        params["prompt_schedule"] = s.prompt_schedule
    if s.guidance_rescale:
        params["guidance_rescale"] = s.guidance_rescale
    if s.guidance_interval is not None:
        params["guidance_interval"] = list(s.guidance_interval)
    if s.freeu is not None:
        params["freeu"] = dict(zip(("b1", "b2", "s1", "s2"), s.freeu))
    if s.cache_interval != 1:
        params["cache_interval"] = s.cache_interval
        params["cache_branch"] = s.cache_branch
    if s.free_init.num_iters:
        params["free_init"] = dataclasses.asdict(s.free_init)
    write_output(frames, path, fmt, s.fps, params, overwrite)
    with atomic_path(path.with_name(path.name + ".json"), overwrite) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        run(sys.argv[1:] if argv is None else argv)
    except (UserError, NumericalError) as exc:
        return fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
