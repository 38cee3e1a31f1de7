"""Every benchmark of docs/performance.md in one run: ours and the reference on the same random
weights, a printed summary, a JSON report, and the check against the performance targets.

    python -m t2v.bench [--json t2v-bench.json] [--overwrite] [--skip unet_b text ...]

Sections (all full size unless named tiny): unet_a, unet_b (one UNet step, cases a and b),
text (2 prompts), vae (decode of 16 frames at 256x256), tiny_pipeline, load (time and peak
RSS), vae_memory (decode of 8 vs 64 frames), unet_memory (a 64-frame UNet step). About an
hour on 2 CPU cores; ~20 GB of RAM. Needs the `dev` extra (diffusers, transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from t2v.bench import load, small, unet
from t2v.bench.common import report_line
from t2v.bench.memory import measure_in_subprocess

SECTIONS = ("unet_a", "unet_b", "text", "vae", "tiny_pipeline", "load",
            "vae_memory", "unet_memory")

# The targets (full size, fp32, same weights as diffusers).
TARGETS = {
    "unet_speedup_eager": 1.3,  # diffusers time / t2v time, at least
    "unet_efficiency": 0.85,  # t2v GFLOP/s / best large-matmul GFLOP/s, at least
    "vae_memory_64_over_8": 1.2,  # decode peak memory, 64 frames / 8 frames, at most
    "load_time_ratio": 0.5,  # t2v / diffusers from_pretrained, at most
    "load_rss_over_weights": 1.2,  # at most
}


def machine() -> dict:
    import diffusers
    import transformers
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    # The instruction set torch dispatches to (e.g. "AVX2", "AVX512"): hosts of one machine
    # kind differ, and bf16 is fast only with AVX512-BF16 (docs/performance.md).
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_sections(todo: list[str], repeat: int) -> dict:
    results: dict = {}
    cases = [c for c in ("a", "b") if f"unet_{c}" in todo]
    if cases:
        results["unet"] = unet.run(cases, repeat)
    if "text" in todo:
        results["text"] = small.bench_text(repeat)
    if "vae" in todo:
        results["vae"] = small.bench_vae_decode(repeat)
    if "tiny_pipeline" in todo:
        results["tiny_pipeline"] = small.bench_tiny_pipeline(repeat)
    for name in ("text", "vae", "tiny_pipeline"):
        if name in results:
            print(report_line(name, results[name]), flush=True)
    if "load" in todo:
        folder = Path(tempfile.gettempdir()) / "t2v-bench-load"
        load.prepare(folder)
        results["load"] = {impl: measure_in_subprocess("t2v.bench.load", [impl, str(folder)])
                           for impl in ("t2v", "diffusers")}
        print("load: " + ", ".join(f"{k} {v['seconds']:.1f}s peak {v['peak_mib']:.0f} MiB"
                                   for k, v in results["load"].items()), flush=True)
    if "vae_memory" in todo:
        results["vae_memory"] = {
            f"{impl}_{frames}": measure_in_subprocess("t2v.bench.vae_memory",
                                                      [impl, str(frames), "256"])
            for frames in (8, 64) for impl in ("t2v", "diffusers")}
        print("vae decode memory (MiB above the model): " + ", ".join(
            f"{k} {v['step_mib']:.0f}" for k, v in results["vae_memory"].items()), flush=True)
    if "unet_memory" in todo:
        results["unet_memory"] = {
            impl: measure_in_subprocess("t2v.bench.long_video", ["full", "64", "32", impl])
            for impl in ("t2v", "diffusers")}
        print("64-frame UNet step, batch 2, 32x32 (MiB above the model): " + ", ".join(
            f"{k} {v['step_mib']:.0f}" for k, v in results["unet_memory"].items()), flush=True)
    return results


def check_targets(results: dict) -> dict:
    """Each target with the measured value and whether it is met (absent sections: skipped)."""
    checks = {}

    def check(name: str, value: float, at_least: bool) -> None:
        limit = TARGETS[name]
        checks[name] = {"value": round(value, 3), "target": limit,
                        "met": value >= limit if at_least else value <= limit}

    for case, r in results.get("unet", {}).get("cases", {}).items():
        check("unet_speedup_eager", r["speedup"], True)
        checks[f"unet_speedup_eager_{case}"] = checks.pop("unet_speedup_eager")
        check("unet_efficiency", r["efficiency"]["t2v"], True)
        checks[f"unet_efficiency_{case}"] = checks.pop("unet_efficiency")
    if "vae_memory" in results:
        m = results["vae_memory"]
        check("vae_memory_64_over_8", m["t2v_64"]["step_mib"] / m["t2v_8"]["step_mib"], False)
    if "load" in results:
        ours, ref = results["load"]["t2v"], results["load"]["diffusers"]
        check("load_time_ratio", ours["seconds"] / ref["seconds"], False)
        check("load_rss_over_weights", ours["peak_mib"] / ours["weights_mib"], False)
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("t2v-bench.json"),
                        help="the report (default: t2v-bench.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--skip", nargs="+", default=[], choices=SECTIONS, metavar="SECTION",
                        help=f"sections to leave out: {', '.join(SECTIONS)}")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per case (median)")
    args = parser.parse_args(argv)
    if args.json.exists() and not args.overwrite:
        print(f"error: {args.json} exists; pass --overwrite to replace it or --json another "
              "path", file=sys.stderr)
        return 2
    if not args.json.parent.is_dir():
        print(f"error: the folder of --json {args.json} does not exist", file=sys.stderr)
        return 2
    todo = [s for s in SECTIONS if s not in args.skip]
    report = {"machine": machine(), "command": "python -m t2v.bench " + " ".join(
        sys.argv[1:] if argv is None else argv)}
    print(json.dumps(report["machine"]), flush=True)
    report["results"] = run_sections(todo, args.repeat)
    report["targets"] = check_targets(report["results"])
    for name, c in report["targets"].items():
        print(f"target {name}: {c['value']} (target {c['target']}) "
              f"{'met' if c['met'] else 'NOT met'}")
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.json)  # atomic: a report is whole or absent
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
