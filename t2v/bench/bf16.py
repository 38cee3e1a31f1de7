"""bfloat16 on the CPU: one full-size UNet step in bf16 against fp32, t2v and diffusers, same
trained-like random weights, alternating runs.

    python -m t2v.bench.bf16 [--case a|b] [--repeat 3] [--json report.json]

Prints the four times, t2v bf16 / t2v fp32 (the speed a user gets from `--dtype bfloat16`),
t2v bf16 against diffusers bf16, and the bf16 outputs' difference from fp32 (relative to the
fp32 output's largest value). Quality in prompt-following terms is measured on the demo model
(`python -m t2v.demo.quality_grid --only bf16`, docs/quality.md).
"""

from __future__ import annotations

import copy

import torch

from t2v.bench.common import alternate, case_main, set_flush_denormal
from t2v.bench.unet import CASES, build_pair
from t2v.config import UNetConfig


def run(case: str = "a", repeat: int = 3) -> dict:
    flush = set_flush_denormal(False)
    ours, reference = build_pair(UNetConfig())
    ours16, reference16 = (copy.deepcopy(m).to(torch.bfloat16) for m in (ours, reference))
    batch, frames, size = CASES[case]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, frames, size, size, generator=g)
    context = torch.randn(batch, 77, 1024, generator=g)
    t = torch.tensor([500] * batch)
    x16, context16 = x.bfloat16(), context.bfloat16()
    fns = {"t2v_fp32": lambda: ours(x, t, context),
           "t2v_bf16": lambda: ours16(x16, t, context16),
           "diffusers_fp32": lambda: reference(x, t, context).sample,
           "diffusers_bf16": lambda: reference16(x16, t, context16).sample}
    with torch.no_grad():
        expected = fns["t2v_fp32"]()
        errors = {name: float((fns[name]().float() - expected).abs().max()
                              / expected.abs().max()) for name in ("t2v_bf16", "diffusers_bf16")}
        seconds = alternate(fns, repeat)
    result = {"case": case, "threads": torch.get_num_threads(), "flush_denormal": flush,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "seconds": seconds, "bf16_error_vs_fp32": errors,
              "t2v_bf16_over_t2v_fp32": seconds["t2v_fp32"] / seconds["t2v_bf16"],
              "t2v_bf16_over_diffusers_bf16": seconds["diffusers_bf16"] / seconds["t2v_bf16"],
              "t2v_bf16_over_diffusers_fp32": seconds["diffusers_fp32"] / seconds["t2v_bf16"]}
    print(f"case {case} (B={batch}, F={frames}, {size}x{size}), {torch.get_num_threads()} "
          f"threads, {result['cpu_capability']}: "
          + ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items()), flush=True)
    print(f"t2v bf16 speedup: {result['t2v_bf16_over_t2v_fp32']:.2f}x over t2v fp32, "
          f"{result['t2v_bf16_over_diffusers_bf16']:.2f}x over diffusers bf16, "
          f"{result['t2v_bf16_over_diffusers_fp32']:.2f}x over diffusers fp32; bf16 error "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()), flush=True)
    return result


def main() -> None:
    case_main(__doc__.splitlines()[0], run, CASES)


if __name__ == "__main__":
    main()
