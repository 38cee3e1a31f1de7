"""Peak memory of long generations against the memory model (t2v.models.memory), one process per case.

    python -m t2v.bench.long_video                 # mid-size model, 16 / 64 / 200 frames
    python -m t2v.bench.long_video --full-unet 2 4 # full-size UNet forward, F frames, 32x32

Mid-size: a model with ms-1.7b's topology at reduced widths (MID below: UNet 64-256, VAE
16-32), 128x128 pixels, DDIM 1 step with guidance, random weights, chunked decode, the uint8
output in memory; longer runs windowed (16, overlap 4), with all frames and automatic frame
chunks, and unchunked. Full size: one UNet forward (batch 2 as with guidance) to check the
activation term of the model.
"""

from __future__ import annotations

import argparse

import torch

from t2v.bench.common import trained_like_
from t2v.bench.memory import measure_in_subprocess, report, status_kib
from t2v.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from t2v.models.memory import estimate_memory
from t2v.models.unet import UNet3D
from t2v.pipeline.text_to_video import TextToVideo, auto_frame_chunk
from weights_convert.diffusers import diffusers_unet_kwargs

MID = ModelConfig(
    text_encoder=TextEncoderConfig(width=64, heads=2, layers=2, mlp_width=128),
    unet=UNetConfig(channels=(64, 128, 256, 256), head_dim=32, transformer_in_heads=2,
                    context_dim=64, norm_groups=32),
    vae=VAEConfig(channels=(16, 32, 32, 32), layers_per_block=1, norm_groups=16))
SIZE = 128
WINDOW, OVERLAP = 16, 4


def child_mid(frames: int, mode: str) -> None:
    """mode: "window" (WINDOW frames at a time), "auto" (all frames, the pipeline's automatic
    frame chunks) or "unchunked" (all frames at once: the control)."""

    pipe = TextToVideo.from_config(MID, seed=0)
    for module in (pipe.text_encoder, pipe.unet, pipe.vae):
        trained_like_(module, 0)
    window = WINDOW if mode == "window" else None
    chunk = None if mode == "unchunked" else "auto"
    baseline = status_kib("VmRSS")
    video = pipe("a long video", num_frames=frames, height=SIZE, width=SIZE, steps=1,
                 guidance_scale=9.0, seed=0, window=window, window_overlap=OVERLAP,
                 frame_chunk=chunk, progress=False).frames
    in_view = min(frames, window or frames)
    est = estimate_memory(MID, frames=frames, height=SIZE, width=SIZE, window=window,
                          frame_chunk=auto_frame_chunk(in_view) if chunk == "auto" else None)
    report(baseline, frames=frames, mode=mode, output_mib=video.numel() / 2**20,
           estimate_mib=(est.peak - est.weights_sampling) / 2**20)


def child_full_unet(frames: int, latent: int, impl: str = "t2v") -> None:
    """One full-size UNet forward, batch 2: t2v (frame chunks as the pipeline picks them) or
    diffusers' UNet3DConditionModel."""

    cfg = ModelConfig()
    chunk = auto_frame_chunk(frames)
    if impl == "t2v":
        unet = trained_like_(UNet3D(cfg.unet), 0).eval()
    else:
        from diffusers import UNet3DConditionModel

        unet = trained_like_(UNet3DConditionModel(**diffusers_unet_kwargs(cfg.unet)), 0).eval()
    x = torch.randn(2, 4, frames, latent, latent)
    context = torch.randn(2, 77, 1024)
    baseline = status_kib("VmRSS")
    with torch.no_grad():
        unet(x, 500, context, chunk) if impl == "t2v" else unet(x, 500, context)
    est = estimate_memory(cfg, frames=frames, height=8 * latent, width=8 * latent,
                          frame_chunk=chunk)
    report(baseline, frames=frames, impl=impl, estimate_mib=est.unet_activations / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 200])
    parser.add_argument("--full-unet", type=int, nargs="*", default=None, metavar="FRAMES")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, a, b, *impl = args.child
        if kind == "mid":
            child_mid(int(a), b)
        else:
            child_full_unet(int(a), int(b), *impl)
        return
    if args.full_unet:
        print(f"full-size UNet forward, batch 2, {args.latent}x{args.latent} latents: MiB above "
              "the built model (measured) vs the model's UNet activation term")
        for frames in args.full_unet:
            r = measure_in_subprocess("t2v.bench.long_video",
                                      ["full", str(frames), str(args.latent)])
            print(f"frames {frames:>4}: measured {r['step_mib']:>8.0f}  estimate "
                  f"{r['estimate_mib']:>8.0f}", flush=True)
        return
    print(f"mid-size model, {SIZE}x{SIZE}, guidance, window {WINDOW} (overlap {OVERLAP}) above "
          f"{WINDOW} frames: MiB above the built model")
    for frames in args.frames:
        for mode in ("window", "auto", "unchunked") if frames > WINDOW else ("auto",):
            r = measure_in_subprocess("t2v.bench.long_video", ["mid", str(frames), mode])
            print(f"frames {frames:>4} {mode:>9}: measured {r['step_mib']:>7.1f}  estimate "
                  f"{r['estimate_mib']:>7.1f}  (output {r['output_mib']:.1f})", flush=True)


if __name__ == "__main__":
    main()
