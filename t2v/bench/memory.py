"""Peak memory of a measured step, in a fresh process per case.

`measure_in_subprocess(module, args)` runs `python -m module --child args...`; the child builds
its models, records its resident memory, runs the step and reports the peak (VmHWM) as JSON
on its last stdout line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now, VmHWM: peak so far)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def report(baseline_kib: int, **extra) -> None:
    """Child side: print the measurement as the last line."""
    peak = status_kib("VmHWM")
    print(json.dumps({"baseline_mib": baseline_kib / 1024, "peak_mib": peak / 1024,
                      "step_mib": (peak - baseline_kib) / 1024, **extra}))


# glibc serves blocks from 64 KiB up with mmap, so freed tensors go back to the OS at once:
# peaks then measure the live tensors, not heap fragmentation (without it, identical runs of
# t2v.bench.long_video differed by 30 MiB; with it, by under 1 MiB).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measure_in_subprocess(module: str, args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", module, "--child", *args], check=True,
                         capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
    return json.loads(out.stdout.strip().splitlines()[-1])
