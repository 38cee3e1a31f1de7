"""End to end: the default workload through `python -m t2v.sample` against a diffusers script
doing the same, each in a fresh process, same full-size weights (every parameter random at a
trained-like scale).

    python -m t2v.bench.end_to_end [--dtype float32|bfloat16] [--steps 25] [--weights-dir D]
                                   [--json report.json]

Workload: 16 frames at 256x256, DPM-Solver++ (order 2) with `--steps` steps, guidance 9, one
prompt, seed 0, written as an MP4, every component in `--dtype` on both sides (t2v's VAE
through `--vae-dtype`). The diffusers side is `TextToVideoSDPipeline.from_pretrained` on a
diffusers folder of the same weights with `DPMSolverMultistepScheduler`; it writes its frames
with t2v's MP4 writer (diffusers' `export_to_video` needs imageio or OpenCV, which the `dev`
extra does not install), so the two differ in model code only. Measured per side: wall time
from process start to exit (the video written) and the time to the first denoising step (when
the sampler's progress bar first shows, i.e. after import, load and text encoding).
The weights (about 7 GB per layout in fp32) are written once to `--weights-dir` (default: a
temporary folder, removed afterwards) and reused if already there. Run it from the
repository root (the t2v side reads configs/ms17b.yaml).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from t2v.atomic import atomic_path
from t2v.bench.common import trained_like_
from t2v.config import ModelConfig
from t2v.pipeline.text_to_video import TextToVideo
from weights_convert.diffusers import save_diffusers
from weights_convert.native import save_native

PROMPT = "an astronaut riding a horse on the moon"

DIFFUSERS_SCRIPT = """
import sys, torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.pipelines.deprecated.text_to_video_synthesis import TextToVideoSDPipeline
from t2v.pipeline.video_io import export_to_video
folder, out, steps, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
pipe = TextToVideoSDPipeline.from_pretrained(folder, torch_dtype=getattr(torch, dtype))
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
frames = pipe(sys.argv[5], num_inference_steps=steps, guidance_scale=9.0, num_frames=16,
              height=256, width=256, generator=torch.Generator().manual_seed(0),
              output_type="np").frames[0]
export_to_video(frames, out, fps=8)
"""


def prepare_weights(folder: Path) -> tuple[Path, Path]:
    """Full-size weights in the native and the diffusers layout (written once)."""

    native, diffusers = folder / "native", folder / "diffusers"
    if (native / "model.yaml").exists() and (diffusers / "model_index.json").exists():
        return native, diffusers
    cfg = ModelConfig()
    model = TextToVideo.from_config(cfg)
    states = {}
    for seed, name in enumerate(("text_encoder", "unet", "vae")):
        module = getattr(model, name)
        states[name] = trained_like_(module, seed).state_dict()
    for target, writer in ((native, save_native), (diffusers, save_diffusers)):
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        writer(target, cfg, states)
    return native, diffusers


def timed(command: list[str], steps: int) -> dict[str, float]:
    """Run `command`; seconds to exit and to the progress bar's first appearance."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_step = None
    log = b""
    marker = re.compile(rb"\b0/%d\b" % steps)
    while chunk := process.stderr.read1(4096):
        log += chunk
        if first_step is None and marker.search(log):
            first_step = time.perf_counter() - start
    if process.wait() != 0:
        raise RuntimeError(f"{command[:3]} failed:\n{log.decode(errors='replace')[-2000:]}")
    return {"wall": time.perf_counter() - start, "to_first_step": first_step}


def commands(dtype: str, steps: int, native: Path, diffusers: Path,
             out_dir: Path) -> tuple[list[str], list[str]]:
    """The two command lines. Every component runs in `dtype` on both sides: diffusers'
    `torch_dtype` casts the whole pipeline, so t2v gets `--vae-dtype` too (its default VAE
    dtype is float32 whatever `--dtype` says)."""
    t2v_cmd = [sys.executable, "-m", "t2v.sample", "--config", "configs/ms17b.yaml",
               "--weights", str(native), "--prompt", PROMPT, "--seed", "0",
               "--sampler", "dpmsolver++", "--steps", str(steps), "--guidance", "9",
               "--frames", "16", "--height", "256", "--width", "256", "--dtype", dtype,
               "--vae-dtype", dtype, "--out", str(out_dir / f"t2v_{dtype}.mp4"), "--overwrite"]
    ref_cmd = [sys.executable, "-c", DIFFUSERS_SCRIPT, str(diffusers),
               str(out_dir / f"diffusers_{dtype}.mp4"), str(steps), dtype, PROMPT]
    return t2v_cmd, ref_cmd


def run(dtype: str, steps: int, weights_dir: Path, out_dir: Path) -> dict:
    if not Path("configs/ms17b.yaml").is_file():
        raise SystemExit("run from the repository root: configs/ms17b.yaml not found")
    native, diffusers = prepare_weights(weights_dir)
    t2v_cmd, ref_cmd = commands(dtype, steps, native, diffusers, out_dir)
    seconds = {"t2v": timed(t2v_cmd, steps), "diffusers": timed(ref_cmd, steps)}
    result = {"dtype": dtype, "steps": steps, "threads": torch.get_num_threads(),
              "seconds": seconds,
              "speedup_wall": seconds["diffusers"]["wall"] / seconds["t2v"]["wall"],
              "speedup_to_first_step": (seconds["diffusers"]["to_first_step"]
                                        / seconds["t2v"]["to_first_step"])}
    print(f"{dtype}, {steps} steps: t2v {seconds['t2v']['wall']:.1f}s (first step at "
          f"{seconds['t2v']['to_first_step']:.1f}s), diffusers {seconds['diffusers']['wall']:.1f}s"
          f" (first step at {seconds['diffusers']['to_first_step']:.1f}s); speedup "
          f"{result['speedup_wall']:.2f}x wall, {result['speedup_to_first_step']:.2f}x to the "
          "first step", flush=True)
    return result


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """--weights-dir and --json, shared by the end-to-end benchmarks."""
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="keep the full-size weights here (reused when present)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")


def run_with_scratch(parser: argparse.ArgumentParser, args: argparse.Namespace, measure,
                     prefix: str) -> dict:
    """measure(weights_dir, out_dir) in a temporary folder (removed afterwards; the weights go
    to --weights-dir if given), its result written to --json (never over an existing file)."""
    if args.json and args.json.exists():
        parser.error(f"{args.json} already exists; choose another path")
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        result = measure(args.weights_dir or scratch, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        with atomic_path(args.json, overwrite=False) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=25)
    add_common_flags(parser)
    args = parser.parse_args()
    run_with_scratch(parser, args, lambda weights, out: run(args.dtype, args.steps, weights,
                                                            out), "t2v-e2e-")

if __name__ == "__main__":
    main()
