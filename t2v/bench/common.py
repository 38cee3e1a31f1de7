"""Helpers shared by the benchmarks: trained-like random weights, the flush-to-zero setting,
warm-up, alternating runs, medians.

Benchmarks are fair or worthless: both sides get the same weights, every parameter random at
a trained-like scale (`trained_like_`, the parity tests' randomizer). A default-initialised
diffusers model has zero-initialised layers (temporal conv outputs, transformer proj_out)
whose tiny activations decay into denormal floats and stall aten's CPU kernels: measured
27.1 s vs 8.4 s for one diffusers step with flush-to-zero on, which once made a slower t2v
look 1.6x faster (docs/performance.md).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn

from t2v.atomic import atomic_path


@torch.no_grad()
def trained_like_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a random value at a trained-like scale, including the ones the
    references zero-initialise (a zero layer hides a whole branch from a parity test and
    feeds denormals to a benchmark): norm scales 1 + 0.2 N(0, 1), biases 0.2 N(0, 1), weights
    N(0, 1) / sqrt(fan-in) so that activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim == 1 and name.endswith("weight"):
            value = 1.0 + 0.2 * noise  # norm scale
        elif p.ndim <= 1:
            value = 0.2 * noise  # bias (or a scalar)
        else:
            value = noise / math.sqrt(p[0].numel())  # fan-in scaling keeps activations O(1)
        p.copy_(value.to(p.dtype))
    return module


def zero_parameters(module: nn.Module) -> list[str]:
    """Names of parameters that are all zeros (what a fair benchmark must not have)."""
    return [name for name, p in module.named_parameters() if not p.detach().any()]


def set_flush_denormal(enabled: bool) -> bool:
    """Set the CPU's flush-to-zero mode for this process (torch has no getter, so benchmarks
    set it explicitly and report what they set); returns `enabled` if the CPU supports it,
    else False."""
    return bool(torch.set_flush_denormal(enabled)) and enabled


def alternate(cases: dict[str, Callable[[], object]], repeat: int = 3,
              warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable, run in turns so that drift affects all alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def report_line(what: str, seconds: dict[str, float]) -> str:
    ratio = seconds["diffusers"] / seconds["t2v"]
    return (f"{what}: t2v {seconds['t2v']:.3f}s, diffusers {seconds['diffusers']:.3f}s, "
            f"speedup {ratio:.2f}x")


def case_main(description: str, run: Callable[[str, int], dict], cases) -> None:
    """The command line of a benchmark that takes a case and a repeat count: runs it, writes
    the result as JSON with --json (never over an existing file)."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--case", choices=list(cases), default="a")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    result = run(args.case, args.repeat)
    if args.json:
        with atomic_path(Path(args.json), overwrite=False) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
