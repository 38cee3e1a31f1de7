"""VAE decode speed, t2v against diffusers on the same trained-like weights, fp32 and bf16.

    python -m t2v.bench.vae [--frames 16] [--size 256] [--repeat 3] [--json FILE]

Each row decodes `frames` latents to `size` x `size` frames: t2v's `decode_video` (8 frames
per chunk, the CLI's path) against diffusers' `AutoencoderKL.decode` of all frames in one
batch, as its text-to-video pipeline does. Rows: float32 and bfloat16 for both. Before timing,
the two implementations are checked to give the same frames (fp32). Run it alone: any other
job on the machine changes the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from t2v.atomic import atomic_path
from t2v.bench.common import alternate, set_flush_denormal, trained_like_
from t2v.config import VAEConfig
from t2v.models.vae import AutoencoderKL
from weights_convert.diffusers import diffusers_vae_kwargs

PARITY_TOL = 1e-4  # max |t2v - diffusers| / max |diffusers|, fp32 (sums in another order)


def models(cfg: VAEConfig, seed: int = 0):
    """(t2v AutoencoderKL, diffusers AutoencoderKL), same trained-like weights, eval mode."""
    from diffusers import AutoencoderKL as DiffusersVAE

    reference = trained_like_(DiffusersVAE(**diffusers_vae_kwargs(cfg)), seed).eval()
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


@torch.no_grad()
def run(frames: int = 16, size: int = 256, repeat: int = 3, cfg: VAEConfig = VAEConfig()
        ) -> dict:
    flush = set_flush_denormal(False)
    ours, reference = models(cfg)
    latents = torch.randn(1, cfg.latent_channels, frames, size // 8, size // 8,
                          generator=torch.Generator().manual_seed(0))
    folded = latents[0].transpose(0, 1)  # (F, C, h, w), frames in order

    def diffusers_decode(dtype):
        return reference.decode(folded.to(dtype) / cfg.scaling_factor).sample

    expected = diffusers_decode(torch.float32)
    actual = ours.decode_video(latents)[0].transpose(0, 1)
    diff = ((actual - expected).abs().max() / expected.abs().max()).item()
    if diff > PARITY_TOL:
        raise RuntimeError(f"t2v and diffusers decode differently: {diff:.2e} > {PARITY_TOL}")

    rows: dict[str, dict[str, float]] = {}
    rows["float32"] = alternate({"t2v": lambda: ours.decode_video(latents),
                                 "diffusers": lambda: diffusers_decode(torch.float32)}, repeat)
    ours.to(torch.bfloat16)
    reference.to(torch.bfloat16)
    rows["bfloat16"] = alternate({"t2v": lambda: ours.decode_video(latents),
                                  "diffusers": lambda: diffusers_decode(torch.bfloat16)}, repeat)
    base = rows["float32"]["diffusers"]
    return {"frames": frames, "size": size, "repeat": repeat, "flush_denormal": flush,
            "parity": diff, "threads": torch.get_num_threads(),
            "rows": {name: {**r, "speedup_vs_diffusers_fp32": base / r["t2v"]}
                     for name, r in rows.items()}}


def report(result: dict) -> str:
    lines = [f"VAE decode, {result['frames']} frames at {result['size']}x{result['size']}, "
             f"{result['threads']} threads, flush-to-zero {result['flush_denormal']}, "
             f"parity {result['parity']:.1e} (median of {result['repeat']})",
             "| row | t2v s | diffusers s | t2v speedup vs diffusers fp32 |",
             "| --- | --- | --- | --- |"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['t2v']:.2f} | {r['diffusers']:.2f} | "
                     f"{r['speedup_vs_diffusers_fp32']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    result = run(args.frames, args.size, args.repeat)
    print(report(result))
    if args.json:
        with atomic_path(args.json, overwrite=False) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
