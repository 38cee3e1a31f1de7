"""Text encoding (full-size ViT-H-14 text tower, 2 prompts), VAE decode (full size, 16 frames at
256x256) and the whole tiny pipeline end to end, t2v against transformers / diffusers on the
same weights.

    python -m t2v.bench.small [--repeat 5] [--json report.json]

Needs the `dev` extra.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from t2v.atomic import atomic_path
from t2v.bench.common import alternate, report_line, trained_like_
from t2v.bench.vae import models
from t2v.config import ModelConfig, ScheduleConfig, TextEncoderConfig, UNetConfig, VAEConfig
from t2v.loading.weights import build
from t2v.models.text_encoder import TextEncoder
from t2v.models.tokenizer import Tokenizer
from t2v.models.unet import UNet3D
from t2v.models.vae import AutoencoderKL
from t2v.pipeline.text_to_video import TextToVideo
from weights_convert.diffusers import (
    diffusers_scheduler_config,
    diffusers_text_encoder_config,
    diffusers_unet_kwargs,
    diffusers_vae_kwargs,
    tokenizer_files,
)

PROMPTS = ["an astronaut riding a horse on the moon", ""]


def bench_text(repeat: int) -> dict[str, float]:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = TextEncoderConfig()
    hf = {k: v for k, v in diffusers_text_encoder_config(cfg).items()
          if k not in ("architectures", "model_type", "torch_dtype")}
    reference = trained_like_(CLIPTextModel(CLIPTextConfig(**hf)), 0).eval()
    ours = TextEncoder(cfg).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    ids = Tokenizer()(PROMPTS)
    with torch.no_grad():
        return alternate({"t2v": lambda: ours(ids),
                          "diffusers": lambda: reference(ids).last_hidden_state}, repeat)


def bench_vae_decode(repeat: int, frames: int = 16, size: int = 256) -> dict[str, float]:
    """t2v's chunked `decode_video` (8 frames at a time, into uint8-ready float frames) against
    diffusers' `decode` of all frames in one batch, as its text-to-video pipeline does."""
    cfg = VAEConfig()
    ours, reference = models(cfg)
    latents = torch.randn(1, 4, frames, size // 8, size // 8)
    folded = latents.permute(0, 2, 1, 3, 4).reshape(frames, 4, size // 8, size // 8)
    with torch.no_grad():
        return alternate({"t2v": lambda: ours.decode_video(latents),
                          "diffusers": lambda: reference.decode(folded / cfg.scaling_factor)},
                         repeat)


def bench_tiny_pipeline(repeat: int) -> dict[str, float]:
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import DDIMScheduler, UNet3DConditionModel
    from diffusers.pipelines.deprecated.text_to_video_synthesis import TextToVideoSDPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = ModelConfig(
        text_encoder=TextEncoderConfig(width=32, heads=2, layers=2, mlp_width=64),
        unet=UNetConfig(channels=(32, 64, 64, 64), head_dim=8, context_dim=32, norm_groups=4),
        vae=VAEConfig(channels=(16, 32, 32, 32), layers_per_block=1, norm_groups=4),
        schedule=ScheduleConfig())
    torch.manual_seed(0)
    hf = {k: v for k, v in diffusers_text_encoder_config(cfg.text_encoder).items()
          if k not in ("architectures", "model_type", "torch_dtype")}
    text = trained_like_(CLIPTextModel(CLIPTextConfig(**hf)), 0).eval()
    unet = trained_like_(UNet3DConditionModel(**diffusers_unet_kwargs(cfg.unet)), 1).eval()
    vae = trained_like_(DiffusersVAE(**diffusers_vae_kwargs(cfg.vae)), 2).eval()
    folder = Path(tempfile.mkdtemp())
    for name, content in tokenizer_files().items():
        (folder / name).write_text(content)
    reference = TextToVideoSDPipeline(
        vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(folder), unet=unet,
        scheduler=DDIMScheduler.from_config(diffusers_scheduler_config(cfg.schedule)))
    reference.set_progress_bar_config(disable=True)
    ours = TextToVideo(cfg, build(lambda: TextEncoder(cfg.text_encoder), text.state_dict(), "t"),
                       build(lambda: UNet3D(cfg.unet), unet.state_dict(), "u"),
                       build(lambda: AutoencoderKL(cfg.vae), vae.state_dict(), "v"))
    kwargs = dict(num_frames=8, height=64, width=64)
    return alternate({
        "t2v": lambda: ours("a dog", steps=10, seed=0, progress=False, **kwargs),
        "diffusers": lambda: reference("a dog", num_inference_steps=10, output_type="np",
                                       generator=torch.Generator().manual_seed(0), **kwargs),
    }, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    args = parser.parse_args()
    if args.json and Path(args.json).exists() and not args.overwrite:
        parser.error(f"{args.json} already exists; pass --overwrite to replace it")
    results = {"text_encoding_2_prompts": bench_text(args.repeat),
               "vae_decode_16_frames_256px": bench_vae_decode(max(2, args.repeat // 2)),
               "tiny_pipeline_8_frames_64px_10_steps": bench_tiny_pipeline(args.repeat)}
    for name, seconds in results.items():
        print(report_line(name, seconds))
    if args.json:
        with atomic_path(Path(args.json), overwrite=args.overwrite) as tmp:
            tmp.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
