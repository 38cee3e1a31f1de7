"""Does each optimisation still pay? One full-size UNet step with each of t2v's speed paths
switched off in turn, against all on and against diffusers, same trained-like random weights,
alternating runs.

    python -m t2v.bench.ablation [--case a|b] [--repeat 3] [--json report.json]

Variants: `t2v` (all on), `no_onednn_linear` (every linear through F.linear, i.e. MKL, and
GEGLU as one matmul and a chunk: the plain `self.proj(x)` code), `no_fused_geglu` (oneDNN
linears, GEGLU unfused), `nchw` (activations not channels-last), `diffusers`. Flush-to-zero
off, recorded. An optimisation that does not beat its variant by more than the run-to-run
noise (docs/performance.md) is a candidate for removal.
"""

from __future__ import annotations

import contextlib

import torch

from t2v import layers
from t2v.bench.common import alternate, case_main, set_flush_denormal
from t2v.bench.unet import CASES, build_pair
from t2v.config import UNetConfig


@contextlib.contextmanager
def switched(module, name: str, value):
    previous = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, previous)


def run(case: str = "a", repeat: int = 3) -> dict:
    flush = set_flush_denormal(False)
    ours, reference = build_pair(UNetConfig())
    batch, frames, size = CASES[case]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, frames, size, size, generator=g)
    context = torch.randn(batch, 77, 1024, generator=g)
    t = torch.tensor([500] * batch)

    def variant(*switches):
        def call():
            with contextlib.ExitStack() as stack:
                for module, name, value in switches:
                    stack.enter_context(switched(module, name, value))
                return ours(x, t, context)
        return call

    fns = {"t2v": variant(),
           "no_onednn_linear": variant((layers, "ONEDNN_LINEAR", False)),
           "no_fused_geglu": variant((layers, "FUSED_GEGLU", False)),
           "nchw": variant((ours, "channels_last", False)),
           "diffusers": lambda: reference(x, t, context).sample}
    with torch.no_grad():
        expected = fns["t2v"]()
        for name, fn in fns.items():  # every variant computes the same maths
            diff = float((fn() - expected).abs().max() / expected.abs().max())
            if diff > 1e-4:
                raise AssertionError(f"variant {name} differs from t2v by {diff:.2e}")
        seconds = alternate(fns, repeat)
    result = {"case": case, "threads": torch.get_num_threads(), "flush_denormal": flush,
              "seconds": seconds,
              "t2v_speedup_over": {k: v / seconds["t2v"] for k, v in seconds.items()
                                   if k != "t2v"}}
    print(f"case {case} (B={batch}, F={frames}, {size}x{size}), "
          f"{torch.get_num_threads()} threads, flush-to-zero {'on' if flush else 'off'}: "
          + ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items()), flush=True)
    print("t2v (all on) is faster than: " + ", ".join(
        f"{k} {v:.3f}x" for k, v in result["t2v_speedup_over"].items()), flush=True)
    return result


def main() -> None:
    case_main(__doc__.splitlines()[0], run, CASES)


if __name__ == "__main__":
    main()
