"""The full-size fast path: a consistency-distilled ms-1.7b (4 LCM steps, guidance embedding:
one UNet pass per step, every component in bf16) through `python -m t2v.sample`, beside a
diffusers script doing its usual 25-step DPM-Solver++ run (guidance 9: 50 UNet passes,
float32), in the same session, each in a fresh process.

    python -m t2v.bench.few_step [--steps 4] [--dtype bfloat16] [--weights-dir D] [--json R]

Weights: full size, every parameter random at a trained-like scale (t2v.bench.end_to_end's
folders), and for t2v's side the same weights plus a 256-wide guidance embedding
(model.unet.time_cond_proj_dim, random like the rest): what a T2V-Turbo or a
`train.objective: consistency` student adds. The workload of docs/performance.md: 16 frames
at 256x256, one prompt, seed 0, an MP4. Measured per side: wall time from process start to
exit and the time to the first denoising step (t2v.bench.end_to_end.timed). Random weights make
no video worth watching; the timing is what a trained student of this architecture costs.
Run it from the repository root.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import torch

from t2v.bench.common import trained_like_
from t2v.bench.end_to_end import (DIFFUSERS_SCRIPT, PROMPT, add_common_flags,
                                  prepare_weights, run_with_scratch, timed)
from t2v.loading.weights import read_checkpoint
from t2v.models.unet import add_guidance_embedding, UNet3D
from weights_convert.native import save_native

EMBEDDING = 256  # T2V-Turbo's time_cond_proj_dim


def student_weights(native: Path, folder: Path) -> Path:
    """`native` plus a random trained-like guidance embedding, as a native folder."""
    if (folder / "model.yaml").exists():
        return folder
    _, cfg, states = read_checkpoint(native, layout="native")
    with torch.device("meta"):
        unet = UNet3D(cfg.unet)
    add_guidance_embedding(unet, EMBEDDING)
    projection = trained_like_(torch.nn.Linear(EMBEDDING, cfg.unet.channels[0], bias=False), 9)
    states["unet"] = {**states["unet"], "time_embedding.cond_proj.weight": projection.weight}
    cfg = dataclasses.replace(cfg, unet=unet.cfg)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    save_native(folder, cfg, states)
    return folder


REFERENCE_STEPS = 25  # diffusers' usual run: DPM-Solver++ 25 steps, guidance 9


def commands(steps: int, dtype: str, student: Path, diffusers: Path,
             out_dir: Path) -> tuple[list[str], list[str]]:
    """t2v's fast path (lcm, `steps` single passes, every component in `dtype`) and the
    diffusers script's usual fp32 run."""
    t2v_cmd = [sys.executable, "-m", "t2v.sample", "--config", "configs/ms17b.yaml",
               "--weights", str(student), "--prompt", PROMPT, "--seed", "0",
               "--sampler", "lcm", "--steps", str(steps), "--guidance", "8.5",
               "--frames", "16", "--height", "256", "--width", "256", "--dtype", dtype,
               "--vae-dtype", dtype, "--out", str(out_dir / "t2v_lcm.mp4"), "--overwrite"]
    ref_cmd = [sys.executable, "-c", DIFFUSERS_SCRIPT, str(diffusers),
               str(out_dir / "diffusers.mp4"), str(REFERENCE_STEPS), "float32", PROMPT]
    return t2v_cmd, ref_cmd


def run(steps: int, dtype: str, weights_dir: Path, out_dir: Path) -> dict:
    if not Path("configs/ms17b.yaml").is_file():
        raise SystemExit("run from the repository root: configs/ms17b.yaml not found")
    native, diffusers = prepare_weights(weights_dir)
    student = student_weights(native, weights_dir / "student")
    t2v_cmd, ref_cmd = commands(steps, dtype, student, diffusers, out_dir)
    seconds = {"t2v": timed(t2v_cmd, steps), "diffusers": timed(ref_cmd, REFERENCE_STEPS)}
    result = {"t2v": {"sampler": "lcm", "steps": steps, "dtype": dtype, "unet_passes": steps},
              "diffusers": {"sampler": "dpmsolver++", "steps": REFERENCE_STEPS,
                            "dtype": "float32", "unet_passes": 2 * REFERENCE_STEPS},
              "threads": torch.get_num_threads(), "seconds": seconds,
              "speedup_wall": seconds["diffusers"]["wall"] / seconds["t2v"]["wall"]}
    print(f"t2v lcm {steps} steps {dtype}: {seconds['t2v']['wall']:.1f}s (first step at "
          f"{seconds['t2v']['to_first_step']:.1f}s); diffusers dpmsolver++ 25 steps float32: "
          f"{seconds['diffusers']['wall']:.1f}s (first step at "
          f"{seconds['diffusers']['to_first_step']:.1f}s); {result['speedup_wall']:.1f}x",
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    add_common_flags(parser)
    args = parser.parse_args()
    run_with_scratch(parser, args, lambda weights, out: run(args.steps, args.dtype, weights,
                                                            out), "t2v-few-step-")

if __name__ == "__main__":
    main()
