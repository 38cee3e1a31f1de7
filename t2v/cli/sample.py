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
from t2v.atomic import atomic_paths, write_error
from t2v.cli.flags import add_option_flags, options_from_args
from t2v.config import UNetConfig, apply_overrides, config_from_dict, config_to_dict
from t2v.errors import ConfigError, NumericalError, OneLineParser, UserError, fail
from t2v.models.lora import parse_lora_arg
from t2v.models.memory import (
    GIB,
    available_bytes,
    estimate_memory,
    parse_size,
    resident_bytes,
)
from t2v.pipeline.options import Config, GenerationOptions, load_config
from t2v.pipeline.text_to_video import TextToVideo, auto_frame_chunk, load_pipeline
from t2v.pipeline.video_io import write_gif, write_mp4, write_png_frames
from t2v.process_end import end_process
from t2v.sampling import guidance_parallel

log = logging.getLogger("t2v.cli.sample")

FORMATS = {"mp4": ".mp4", "gif": ".gif", "png": ""}
LONG_RUN_FRAMES = 24  # longer runs print the memory estimate first (zeroscope trains on 24)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
def read_config(path: str | None, overrides: list[str]) -> Config:
    """A YAML config, or a sidecar JSON written by this command (its "config" section)."""
    if path is not None and path.endswith(".json") and Path(path).is_file():
        try:
            data = json.loads(Path(path).read_text())
        except ValueError:
            raise ConfigError(f"{path}: not valid JSON") from None
        if isinstance(data, dict) and "config" in data:
            unet = data["config"].get("model", {}).get("unet")
            if isinstance(unet, dict):  # sidecars of earlier versions name removed options
                data["config"]["model"]["unet"] = UNetConfig.drop_removed(unet, path)
            return apply_overrides(config_from_dict(Config, data["config"], path), overrides, path)
    return load_config(path, overrides)


def build_parser(cfg: Config, add_help: bool = True) -> argparse.ArgumentParser:
    """The generation flags (t2v.cli.flags, one per GenerationOptions field), then the run's
    own: config, prompts file, weights, device and precision, memory, output."""
    p = OneLineParser(prog="python -m t2v.sample",
                      description="Generate videos with the ModelScope text-to-video model.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter, add_help=add_help)
    p.add_argument("--config", default=None,
                   help="YAML config (e.g. configs/ms17b.yaml) or a sidecar .json to reproduce")
    p.add_argument("--prompts-file", type=Path, default=None,
                   help="one prompt per line (blank lines and # comments skipped)")
    add_option_flags(p.add_argument_group("generation (the config's sample: section)"),
                     cfg.sample)
    run = p.add_argument_group("weights, device, output")
    run.add_argument("--weights", default=cfg.weights.source,
                     help="local folder or hub repo id in any layout; unset = random weights")
    run.add_argument("--revision", default=cfg.weights.revision, help="hub revision")
    run.add_argument("--variant", default=cfg.weights.variant,
                     help="diffusers weights variant, e.g. fp16 (half the download)")
    run.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                     help="merge a LoRA file (python -m t2v.train's, diffusers/PEFT, kohya or "
                     "Text-To-Video-Finetuning's Stable LoRA) into the UNet and text encoder, "
                     "scaled (default 1); repeat for several (replaces weights.lora)")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if "
                     "available)")
    run.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                     help="weights and activations (auto: float16 on cuda, float32 on cpu)")
    run.add_argument("--vae-dtype", default="float32", choices=list(DTYPES),
                     help="VAE precision (float32 avoids black/NaN frames of half VAEs)")
    run.add_argument("--offload", choices=["none", "model"], default="none",
                     help="model: keep the models on the CPU and move each to --device only "
                     "for its stage (text encoder, UNet, VAE)")
    run.add_argument("--max-memory", default=None, metavar="SIZE",
                     help="refuse to start when the estimated peak memory exceeds SIZE (e.g. "
                     "16GB) and say which settings would fit")
    run.add_argument("--out", type=Path, default=None,
                     help="output file (one prompt) or folder (default: outputs/)")
    run.add_argument("--format", choices=list(FORMATS), default=None,
                     help="mp4 (H.264), gif or png (a folder of frames); default from --out "
                     "or mp4")
    run.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. sample.solver_order=3")
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    """Two passes: the config first, so that --help shows its values as the defaults."""
    # The same parser without help: the config path and the positional overrides, with every
    # flag's value consumed by its flag (a prompt containing "=" is not an override).
    known, _ = build_parser(Config(), add_help=False).parse_known_args(argv)
    cfg = read_config(known.config, known.overrides)
    args = build_parser(cfg).parse_args(argv)
    lora = tuple(args.lora if args.lora is not None else cfg.weights.lora)
    weights = dataclasses.replace(cfg.weights, source=args.weights, revision=args.revision,
                                  variant=args.variant, lora=lora)
    return args, dataclasses.replace(cfg, sample=options_from_args(args, cfg.sample),
                                     weights=weights)


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


def write_output(frames, path: Path, fmt: str, fps: int, metadata: dict, into: Path):
    """Write the video `path` at its temporary name `into`; errors name `path`."""
    try:
        if fmt == "mp4":
            write_mp4(frames, into, fps, metadata, overwrite=True)
        elif fmt == "gif":
            write_gif(frames, into, fps, overwrite=True)
        else:
            write_png_frames(frames, into, overwrite=True)
    except OSError as exc:  # includes PyAV's errors for files it cannot open
        raise write_error(path, exc) from None
    except UserError as exc:
        raise UserError(str(exc).replace(str(into), str(path))) from None


def memory_budget(max_memory: str | None, device: torch.device) -> tuple[int | None, str]:
    """(bytes a run may peak at, what that limit is): --max-memory when given, else what the
    process holds now plus what the machine (or its cgroup, or the GPU) has free."""
    if max_memory is not None:
        try:
            return parse_size(max_memory), "--max-memory"
        except ValueError as exc:
            raise UserError(f"--max-memory: {exc}") from None
    free = available_bytes(device)
    if free is None:
        return None, ""
    held = resident_bytes() if device.type == "cpu" else torch.cuda.memory_reserved(device)
    return held + free, "the memory available (--max-memory sets another limit)"


def check_memory(args, cfg: Config, device: torch.device, dtype, vae_dtype, offload: bool,
                 streamed: bool, baseline: int | None = None) -> None:
    """Refuse, before anything loads, a run whose estimated peak exceeds --max-memory or, by
    default, the memory available; print the estimate for long runs. `baseline`: the process's
    memory before the models loaded (default: measured now, on CPU runs)."""
    budget, limit = memory_budget(args.max_memory, device)
    s = cfg.sample
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
        if args.max_memory is not None or s.num_frames > LONG_RUN_FRAMES:
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
    raise UserError(f"estimated peak memory {est.peak / GIB:.1f} GiB exceeds {limit} "
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

        base_seed = guidance_parallel.shared_seed() % (2**31 - 10**6)
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
        latents = generate(pipe, run_cfg.sample, progress=writer and not args.no_progress)
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


def sidecar_record(path: Path, fmt: str, cfg: Config, layout: str, device: torch.device,
                   dtype, vae_dtype) -> dict:
    """The JSON sidecar of one output: `--config <output>.json` reproduces the run."""
    return {"t2v_version": __version__, "output": str(path), "format": fmt,
            "weights": {"source": cfg.weights.source, "revision": cfg.weights.revision,
                        "layout": layout},
            "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "vae_dtype": str(vae_dtype).removeprefix("torch."),
            "config": config_to_dict(cfg)}


def generate(pipe: TextToVideo, s: GenerationOptions, progress: bool, callback=None
             ) -> torch.Tensor:
    """One video's latents for the options `s` (its prompt and seed included; input files it
    names are read by the pipeline); `callback(i, t, x, x0)` after every step."""
    return pipe(s.prompt, s, output="latents", progress=progress, callback=callback).frames


def write_outputs(pipe: TextToVideo, latents: torch.Tensor, cfg: Config, path: Path, fmt: str,
                  sidecar: dict, overwrite: bool, progress: bool) -> None:
    """Decode and write the video (MP4: decoded chunks go straight into the encoder, the
    video is never held whole) and its JSON sidecar, committed together."""
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
    # The video and its sidecar commit as a pair (t2v.atomic.atomic_paths): a kill leaves the
    # old pair, a video without a sidecar, or the new pair; never a video with another's sidecar.
    try:
        with atomic_paths([path, path.with_name(path.name + ".json")], overwrite) as tmps:
            write_output(frames, path, fmt, s.fps, params, into=tmps[0])
            tmps[1].write_text(json.dumps(sidecar, indent=2) + "\n")
    except OSError as exc:  # writing the sidecar, or a commit
        raise write_error(path, exc) from None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        run(sys.argv[1:] if argv is None else argv)
    except (UserError, NumericalError) as exc:
        return fail(exc)
    return 0


if __name__ == "__main__":
    end_process(main())
