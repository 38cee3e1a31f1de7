"""Load time and peak memory of the full-size UNet (random weights, fp32, 5.6 GB): t2v's
native `unet.safetensors` through `t2v.loading.weights.build` against diffusers'
`UNet3DConditionModel.from_pretrained` of the same tensors, one fresh process per case.

    python -m t2v.bench.load [--dir DIR] [--repeat 2]     # DIR defaults to the temp dir

Writes both files once (about 11 GB of disk). Needs the `dev` extra (diffusers).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from t2v.bench.common import trained_like_
from t2v.bench.memory import measure_in_subprocess, report, status_kib
from t2v.config import UNetConfig
from t2v.loading.checkpoint_io import read_state_dict
from t2v.loading.weights import build
from t2v.models.unet import UNet3D
from weights_convert.diffusers import diffusers_unet_kwargs


def prepare(folder: Path) -> None:
    from diffusers import UNet3DConditionModel
    from safetensors.torch import save_file

    if (folder / "unet.safetensors").exists() and (folder / "diffusers").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    model = trained_like_(UNet3DConditionModel(**diffusers_unet_kwargs(UNetConfig())), 0)
    model.save_pretrained(folder / "diffusers")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "unet.safetensors"))


def child(impl: str, folder: Path) -> None:
    baseline = status_kib("VmRSS")
    start = time.perf_counter()
    if impl == "t2v":
        model = build(lambda: UNet3D(UNetConfig()), read_state_dict(folder / "unet.safetensors"),
                      "unet")
    else:
        from diffusers import UNet3DConditionModel
        model = UNet3DConditionModel.from_pretrained(folder / "diffusers")
    checksum = sum(float(p.double().sum()) for p in model.parameters())  # touch every weight
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    report(baseline, impl=impl, seconds=seconds, weights_mib=weights / 2**20, checksum=checksum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "t2v-bench-load",
                        help="where the two weight files are written once (~11 GB)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    prepare(args.dir)
    print("full-size UNet load (includes reading every weight once); MiB of resident memory")
    print(f"{'impl':>10} {'seconds':>8} {'weights':>8} {'peak RSS':>9} {'peak/weights':>13}")
    for _ in range(args.repeat):
        for impl in ("t2v", "diffusers"):
            r = measure_in_subprocess("t2v.bench.load", [impl, str(args.dir)])
            print(f"{impl:>10} {r['seconds']:>8.2f} {r['weights_mib']:>8.0f} "
                  f"{r['peak_mib']:>9.0f} {r['peak_mib'] / r['weights_mib']:>13.2f}")


if __name__ == "__main__":
    main()
