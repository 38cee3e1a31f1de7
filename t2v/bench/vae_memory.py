"""Peak memory of decoding F frames with the full-size VAE at 256x256: t2v's chunked
`decode_video` against diffusers' `AutoencoderKL.decode` of all frames at once, same random
weights, each case in its own process.

    python -m t2v.bench.vae_memory [--frames 8 64] [--size 256]

Needs the `dev` extra (diffusers).
"""

from __future__ import annotations

import argparse

import torch

from t2v.bench.common import trained_like_
from t2v.bench.memory import measure_in_subprocess, report, status_kib
from t2v.config import VAEConfig
from t2v.models.vae import DEFAULT_CHUNK_FRAMES, AutoencoderKL
from weights_convert.diffusers import diffusers_vae_kwargs


def child(impl: str, frames: int, size: int) -> None:
    torch.manual_seed(0)
    cfg = VAEConfig()
    latents = torch.randn(1, 4, frames, size // 8, size // 8)
    if impl == "t2v":
        model = trained_like_(AutoencoderKL(cfg), 0).eval()
        baseline = status_kib("VmRSS")
        video = model.decode_video(latents)
    else:
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL
        model = trained_like_(DiffusersAutoencoderKL(**diffusers_vae_kwargs(cfg)), 0).eval()
        baseline = status_kib("VmRSS")
        with torch.no_grad():  # as the diffusers pipeline's decode_latents: one batch
            folded = latents.permute(0, 2, 1, 3, 4).reshape(frames, 4, size // 8, size // 8)
            video = model.decode(folded / cfg.scaling_factor).sample
    report(baseline, impl=impl, frames=frames, output_mib=video.numel() * 4 / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "FRAMES", "SIZE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    print(f"VAE decode, full size, {args.size}x{args.size}, t2v chunk = {DEFAULT_CHUNK_FRAMES} "
          "frames; MiB above the process's resident memory after building the model")
    print(f"{'impl':>10} {'frames':>6} {'output':>8} {'step peak':>10} {'process peak':>13}")
    for frames in args.frames:
        for impl in ("t2v", "diffusers"):
            r = measure_in_subprocess("t2v.bench.vae_memory", [impl, str(frames), str(args.size)])
            print(f"{impl:>10} {frames:>6} {r['output_mib']:>8.0f} {r['step_mib']:>10.0f} "
                  f"{r['peak_mib']:>13.0f}")


if __name__ == "__main__":
    main()
