"""The demo student against its teacher in one process: the time of one video, prompt to
frames (text encoding, sampling, VAE decode), with configs/demo.yaml (the teacher: DPM-Solver++
25 steps, guidance 5 at timesteps 600-999) and configs/demo_fast.yaml (the student: the teacher
plus the shipped LoRA, LCM, one UNet pass per step) at each of `--steps`.

    python -m t2v.bench.demo_fast [--steps 1 2 4 8] [--repeats 20] [--json R]

Both pipelines are loaded first (load time is not counted); then every repeat times the teacher
and each student setting once, in turn, so that a slow spell of the machine hits all of them.
Printed: the median and the fastest of the repeats per setting and the teacher's median over
the student's. Run it from the repository root (it reads configs/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from t2v.atomic import atomic_path
from t2v.models.lora import parse_lora_arg
from t2v.pipeline.options import load_config
from t2v.pipeline.text_to_video import TextToVideo

TEACHER_CONFIG = Path("configs/demo.yaml")
STUDENT_CONFIG = Path("configs/demo_fast.yaml")
PROMPT = "a red circle moving right on a black background"


def load(config_path: Path):
    """The pipeline and generation options a sampling config names (its weights and LoRAs)."""
    cfg = load_config(config_path)
    pipe = TextToVideo.from_pretrained(cfg.weights.source, dtype=torch.float32,
                                       vae_dtype=torch.float32)
    for spec in cfg.weights.lora:
        pipe.load_lora(*parse_lora_arg(spec))
    return pipe, dataclasses.replace(cfg.sample, prompt=PROMPT, seed=0)


def seconds_of(pipe, options) -> float:
    start = time.perf_counter()
    pipe(PROMPT, options, progress=False)
    return time.perf_counter() - start


def run(steps: list[int], repeats: int) -> dict:
    if not (TEACHER_CONFIG.is_file() and STUDENT_CONFIG.is_file()):
        raise SystemExit(f"run from the repository root: {TEACHER_CONFIG} or {STUDENT_CONFIG} "
                         "not found")
    teacher, teacher_options = load(TEACHER_CONFIG)
    student, student_options = load(STUDENT_CONFIG)
    settings = {"teacher": (teacher, teacher_options)}
    for n in steps:
        settings[f"student {n} steps"] = (student, dataclasses.replace(student_options, steps=n))
    for pipe, options in settings.values():  # warm-up: first calls allocate
        seconds_of(pipe, options)
    times = {name: [] for name in settings}
    for _ in range(repeats):
        for name, (pipe, options) in settings.items():
            times[name].append(seconds_of(pipe, options))
    teacher_median = statistics.median(times["teacher"])
    result = {"threads": torch.get_num_threads(), "repeats": repeats,
              "teacher": {"sampler": teacher_options.sampler, "steps": teacher_options.steps},
              "seconds": {name: {"median": statistics.median(t), "fastest": min(t)}
                          for name, t in times.items()},
              "speedup": {name: teacher_median / statistics.median(t)
                          for name, t in times.items() if name != "teacher"}}
    for name, t in result["seconds"].items():
        ratio = result["speedup"].get(name)
        print(f"{name:>18}: median {t['median'] * 1000:7.1f} ms, fastest "
              f"{t['fastest'] * 1000:7.1f} ms" + (f"; {ratio:.2f}x faster than the teacher"
                                                   if ratio else ""), flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.json and args.json.exists():
        parser.error(f"{args.json} already exists; choose another path")
    if args.repeats < 1 or min(args.steps) < 1:
        parser.error("--repeats and --steps must be >= 1")
    result = run(args.steps, args.repeats)
    if args.json:
        with atomic_path(args.json, overwrite=False) as tmp:
            tmp.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
