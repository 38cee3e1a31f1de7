"""Timing helpers shared by the benchmarks: warm-up, alternating runs, medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable


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
