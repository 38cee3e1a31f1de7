"""One full-size UNet3D step, t2v against diffusers' UNet3DConditionModel: same random weights,
same inputs, alternating runs after a warm-up; medians, the ratio, and achieved GFLOP/s next to
a large fp32 matmul's.

    python -m t2v.bench.unet [--case a|b|all] [--repeat 3] [--json report.json]

Cases: (a) batch 2, 8 frames, 16x16 latents; (b) batch 2, 16 frames, 32x32 latents (the default
workload, 256x256 with guidance). Needs the `dev` extra (diffusers) and ~12 GB of RAM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from t2v.config import UNetConfig
from t2v.unet import UNet3D

CASES = {"a": (2, 8, 16), "b": (2, 16, 32)}  # batch, frames, latent size


def matmul_gflops(n: int = 4096, repeat: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times) / 1e9


def time_call(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="a")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    from diffusers import UNet3DConditionModel

    from weights_convert.diffusers import diffusers_unet_kwargs
    torch.manual_seed(0)
    cfg = UNetConfig()
    reference = UNet3DConditionModel(**diffusers_unet_kwargs(cfg)).eval()
    ours = UNet3D(cfg).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    peak_matmul = matmul_gflops()
    results = {"matmul_gflops": peak_matmul, "threads": torch.get_num_threads(), "cases": {}}
    print(f"fp32 4096^2 matmul: {peak_matmul:.1f} GFLOP/s, {torch.get_num_threads()} threads")
    for name in CASES if args.case == "all" else [args.case]:
        batch, frames, size = CASES[name]
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 4, frames, size, size, generator=g)
        context = torch.randn(batch, 77, 1024, generator=g)
        t = torch.tensor([500] * batch)
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                ours(x, t, context)
            flops = counter.get_total_flops()
            reference(x, t, context)  # warm-up
            times = {"t2v": [], "diffusers": []}
            for _ in range(args.repeat):  # alternate, so drift affects both alike
                times["t2v"] += time_call(lambda: ours(x, t, context), 1)
                times["diffusers"] += time_call(lambda: reference(x, t, context).sample, 1)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["diffusers"] / med["t2v"]
        gflops = flops / med["t2v"] / 1e9
        results["cases"][name] = {"batch": batch, "frames": frames, "latent": size,
                                  "gflop": flops / 1e9, "seconds": med, "speedup": ratio,
                                  "t2v_gflops": gflops, "efficiency": gflops / peak_matmul}
        print(f"case {name} (B={batch}, F={frames}, {size}x{size}): {flops / 1e9:.0f} GFLOP; "
              f"t2v {med['t2v']:.2f}s, diffusers {med['diffusers']:.2f}s, speedup {ratio:.2f}x; "
              f"t2v {gflops:.1f} GFLOP/s = {gflops / peak_matmul:.2f} of matmul")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
