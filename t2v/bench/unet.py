"""One full-size UNet3D step, t2v against diffusers' UNet3DConditionModel: same random weights,
same inputs, alternating runs after a warm-up; medians, the ratio, and achieved GFLOP/s next to
a large fp32 matmul's.

    python -m t2v.bench.unet [--case a|b|all] [--repeat 3] [--json report.json]

Cases: (a) batch 2, 8 frames, 16x16 latents; (b) batch 2, 16 frames, 32x32 latents (the default
workload, 256x256 with guidance). Weights: every parameter random at a trained-like scale on
both sides (`build_pair`); flush-to-zero off unless `--flush-denormal`, recorded either way.
Needs the `dev` extra (diffusers) and ~12 GB of RAM. (The torch.compile path it also timed
was removed on 2026-12-03: slower than eager, docs/performance.md.)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from t2v.atomic import atomic_path
from t2v.bench.common import alternate, set_flush_denormal, trained_like_
from t2v.config import UNetConfig
from t2v.models.unet import UNet3D
from weights_convert.diffusers import diffusers_unet_kwargs

CASES = {"a": (2, 8, 16), "b": (2, 16, 32)}  # batch, frames, latent size


def matmul_gflops(n: int = 4096, repeat: int = 3) -> dict[str, float]:
    """Best rate of an n x n fp32 matmul through MKL (`torch.mm`, what `F.linear` uses) and,
    where available, through oneDNN (`torch.ops.mkldnn._linear_pointwise`: inductor's CPU
    linear)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    kernels = {"mkl": lambda: a @ b}
    onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if onednn is not None:
        kernels["onednn"] = lambda: onednn(a, b, None, "none", [], "")
    rates = {}
    for name, fn in kernels.items():
        fn()
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        rates[name] = 2 * n ** 3 / best / 1e9
    return rates


def count_flops(model, *args) -> int:
    """FLOPs of one call, counted on the aten ops (`torch.utils.flop_counter`)."""
    with FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops()


def build_pair(cfg: UNetConfig, seed: int = 0):
    """(t2v UNet3D, diffusers UNet3DConditionModel), the same weights: every parameter random
    at a trained-like scale (t2v.bench.common.trained_like_), never a default init."""
    from diffusers import UNet3DConditionModel

    reference = trained_like_(UNet3DConditionModel(**diffusers_unet_kwargs(cfg)), seed).eval()
    ours = UNet3D(cfg).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


def run(cases: list[str], repeat: int = 3, flush_denormal: bool = False) -> dict:
    flush = set_flush_denormal(flush_denormal)
    ours, reference = build_pair(UNetConfig())
    matmul = matmul_gflops()
    peak = max(matmul.values())
    results = {"matmul_gflops": matmul, "threads": torch.get_num_threads(),
               "weights": "trained-like random (t2v.bench.common.trained_like_)",
               "flush_denormal": flush, "cases": {}}
    print("fp32 4096^2 matmul GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in matmul.items())
          + f"; {torch.get_num_threads()} threads; flush-to-zero {'on' if flush else 'off'}",
          flush=True)
    for name in cases:
        batch, frames, size = CASES[name]
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 4, frames, size, size, generator=g)
        context = torch.randn(batch, 77, 1024, generator=g)
        t = torch.tensor([500] * batch)
        with torch.no_grad():
            flops = count_flops(reference, x, t, context)
            fns = {"t2v": lambda: ours(x, t, context),
                   "diffusers": lambda: reference(x, t, context).sample}
            case = {"batch": batch, "frames": frames, "latent": size, "gflop": flops / 1e9}
            seconds = alternate(fns, repeat)
        case["seconds"] = seconds
        case["speedup"] = seconds["diffusers"] / seconds["t2v"]
        case["gflops"] = {k: flops / s / 1e9 for k, s in seconds.items()}
        case["efficiency"] = {k: v / peak for k, v in case["gflops"].items()}
        line = (f"case {name} (B={batch}, F={frames}, {size}x{size}): {flops / 1e9:.0f} GFLOP; "
                f"t2v {seconds['t2v']:.2f}s, diffusers {seconds['diffusers']:.2f}s, "
                f"speedup {case['speedup']:.2f}x; t2v {case['gflops']['t2v']:.1f} GFLOP/s = "
                f"{case['efficiency']['t2v']:.2f} of the best matmul")
        print(line, flush=True)
        results["cases"][name] = case
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="a")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--flush-denormal", action="store_true",
                        help="run with the CPU's flush-to-zero mode on (recorded in the report)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    args = parser.parse_args()
    if args.json and os.path.exists(args.json) and not args.overwrite:
        parser.error(f"{args.json} already exists; pass --overwrite to replace it")
    results = run(list(CASES) if args.case == "all" else [args.case], args.repeat,
                  args.flush_denormal)
    if args.json:
        from pathlib import Path

        with atomic_path(Path(args.json), overwrite=args.overwrite) as tmp:
            tmp.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
