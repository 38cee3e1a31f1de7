"""DeepCache's speed (t2v/sampling/deep_cache.py): a full-size UNet call against a shallow one at each
skip branch, and what that makes of a video's denoising loop at cache intervals N.

    python -m t2v.bench.deep_cache [--case a|b] [--repeat 3] [--steps 25] [--loop-steps 0]

Weights: every parameter random at a trained-like scale (t2v.bench.common.trained_like_).
Per call: medians of alternating full and shallow calls (t2v.bench.common.alternate). Per
video: the UNet calls of `--steps` steps with a full call every N, from the per-call times
(the sampler's own arithmetic is < 0.1% of a step); `--loop-steps K` also runs the real
DPM-Solver++ loop of K steps at each N and reports its measured ratio, to check the model.
Quality (prompt-following accuracy at N = 2, 3, 5) is measured on the demo model by
`python -m t2v.demo.quality_grid`.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from t2v.atomic import atomic_path
from t2v.bench.common import alternate, set_flush_denormal, trained_like_
from t2v.config import ScheduleConfig, UNetConfig
from t2v.models.unet import UNet3D
from t2v.sampling.deep_cache import DEFAULT_BRANCH, DeepCache, deep_cached
from t2v.sampling.samplers import SAMPLERS
from t2v.sampling.schedule import noise_schedule

CASES = {"a": (2, 8, 16), "b": (2, 16, 32)}  # batch (guidance: 2 x 1 video), frames, latent
INTERVALS = (2, 3, 5)


def per_video_speedup(full: float, shallow: float, steps: int, interval: int) -> float:
    """Plain loop time / cached loop time for `steps` UNet calls, a full one every
    `interval`."""
    n_full = math.ceil(steps / interval)
    return steps * full / (n_full * full + (steps - n_full) * shallow)


def run(case: str = "a", repeat: int = 3, steps: int = 25, loop_steps: int = 0) -> dict:
    flush = set_flush_denormal(False)
    unet = trained_like_(UNet3D(UNetConfig()), seed=0).eval()
    batch, frames, size = CASES[case]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, frames, size, size, generator=g)
    context = torch.randn(batch, 77, 1024, generator=g)
    branches = range(len(unet.down_blocks[0].resnets) + 1)
    caches = {b: DeepCache(10 ** 9, branch=b) for b in branches}  # one full call, then shallow

    def shallow(cache):
        cached = deep_cached(unet, cache)

        def call():
            cache.calls = 1  # not a refresh call
            return cached(x, 500, context)
        return call

    with torch.no_grad():
        for cache in caches.values():
            deep_cached(unet, cache)(x, 500, context)
        seconds = alternate({"full": lambda: unet(x, 500, context),
                             **{f"shallow_branch{b}": shallow(c) for b, c in caches.items()}},
                            repeat)
    full = seconds["full"]
    result = {"case": case, "batch": batch, "frames": frames, "latent": size,
              "threads": torch.get_num_threads(), "flush_denormal": flush,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "seconds_per_call": seconds, "steps": steps,
              "shallow_over_full": {b: seconds[f"shallow_branch{b}"] / full for b in branches},
              "per_video_speedup": {b: {n: per_video_speedup(full, seconds[f"shallow_branch{b}"],
                                                             steps, n) for n in INTERVALS}
                                    for b in branches}}
    print(f"case {case} (B={batch}, F={frames}, {size}x{size}), {torch.get_num_threads()} "
          f"threads: full call {full:.2f}s", flush=True)
    for b in branches:
        print(f"  branch {b}: shallow call {seconds[f'shallow_branch{b}']:.2f}s "
              f"({result['shallow_over_full'][b]:.3f} of full); per video of {steps} steps: "
              + ", ".join(f"N={n} {v:.2f}x" for n, v in result["per_video_speedup"][b].items()),
              flush=True)
    if loop_steps:

        schedule = noise_schedule(ScheduleConfig())
        loops = {}
        for n in (1, *INTERVALS):
            cached = deep_cached(unet, DeepCache(n))  # the default branch
            start = time.perf_counter()
            with torch.no_grad():
                SAMPLERS["dpmsolver++"](lambda z, t: cached(z, t, context),
                                        x.clone(), schedule, loop_steps)
            loops[n] = time.perf_counter() - start
        result["loop_seconds"] = loops
        result["loop_speedup"] = {n: loops[1] / loops[n] for n in INTERVALS}
        print(f"real {loop_steps}-step loops: " + ", ".join(
            f"N={n} {loops[n]:.1f}s" for n in loops) + "; measured speedup " + ", ".join(
            f"N={n} {s:.2f}x (model {per_video_speedup(full, seconds[f'shallow_branch{DEFAULT_BRANCH}'], loop_steps, n):.2f}x)"  # noqa: E501
            for n, s in result["loop_speedup"].items()), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=list(CASES), default="a")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25, help="steps of the modelled video")
    parser.add_argument("--loop-steps", type=int, default=0,
                        help="also time real sampling loops of this many steps at each N")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    result = run(args.case, args.repeat, args.steps, args.loop_steps)
    if args.json:
        from pathlib import Path

        with atomic_path(Path(args.json), overwrite=False) as tmp:
            tmp.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
