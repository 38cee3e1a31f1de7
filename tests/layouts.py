"""Writers of tiny checkpoints in every real layout, made with the reference code itself."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import DDIMScheduler, UNet3DConditionModel
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from transformers import CLIPTextConfig, CLIPTextModel

from helpers import randomize_
from reference import modelscope_module
from t2v.config import TextEncoderConfig, UNetConfig, VAEConfig
from weights_convert.diffusers import diffusers_unet_kwargs, diffusers_vae_kwargs

# Tiny configs that the original ModelScope classes can build (GroupNorm(32), a 1024-wide
# context in UNetSD's decoder), and a text tower whose width is 64 per head as open_clip's are.
MS_UNET = UNetConfig(channels=(32, 64, 64, 64), head_dim=16, context_dim=1024, norm_groups=32)
MS_VAE = VAEConfig(channels=(32, 64, 64), layers_per_block=1, norm_groups=32)
MS_TEXT = TextEncoderConfig(width=64, heads=1, layers=2, mlp_width=128)

# Tiny diffusers configs (context width = text width, so they work together in a pipeline).
DIFF_TEXT = TextEncoderConfig(width=32, heads=2, layers=2, mlp_width=64)
DIFF_UNET = UNetConfig(channels=(32, 64, 64, 64), head_dim=8, context_dim=32, norm_groups=4)
DIFF_VAE = VAEConfig(channels=(32, 64, 64), layers_per_block=1, norm_groups=8)

HUB_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}


def modelscope_configuration(cfg: UNetConfig) -> dict:
    """A configuration.json as ModelScope's hub repo ships it, for a UNet config."""
    return {
        "framework": "pytorch", "task": "text-to-video-synthesis",
        "model": {
            "type": "latent-text-to-video-synthesis",
            "model_args": {"ckpt_clip": "open_clip_pytorch_model.bin",
                           "ckpt_unet": "text2video_pytorch_model.pth",
                           "ckpt_autoencoder": "VQGAN_autoencoder.pth",
                           "max_frames": 16, "tiny_gpu": 1},
            "model_cfg": {
                "unet_in_dim": cfg.in_channels, "unet_dim": cfg.channels[0], "unet_y_dim": 768,
                "unet_context_dim": cfg.context_dim, "unet_out_dim": cfg.out_channels,
                "unet_dim_mult": [c // cfg.channels[0] for c in cfg.channels],
                "unet_num_heads": cfg.transformer_in_heads, "unet_head_dim": cfg.head_dim,
                "unet_res_blocks": cfg.layers_per_block,
                "unet_attn_scales": [1 / 2 ** i for i, a in enumerate(cfg.attention) if a],
                "unet_dropout": 0.1, "temporal_attention": "True", "num_timesteps": 1000,
                "mean_type": "eps", "var_type": "fixed_small", "loss_type": "mse"}},
        "pipeline": {"type": "latent-text-to-video-synthesis"},
    }


def modelscope_models(seed: int = 0):
    unet = modelscope_module("unet_sd").UNetSD(
        in_dim=4, dim=MS_UNET.channels[0], y_dim=768, context_dim=MS_UNET.context_dim,
        out_dim=4, dim_mult=[c // MS_UNET.channels[0] for c in MS_UNET.channels],
        num_heads=MS_UNET.transformer_in_heads, head_dim=MS_UNET.head_dim,
        num_res_blocks=MS_UNET.layers_per_block, attn_scales=[1, 0.5, 0.25], dropout=0.1,
        temporal_attention=True)
    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3,
                    ch=MS_VAE.channels[0],
                    ch_mult=[c // MS_VAE.channels[0] for c in MS_VAE.channels],
                    num_res_blocks=MS_VAE.layers_per_block, attn_resolutions=[], dropout=0.0)
    vae = modelscope_module("autoencoder").AutoencoderKL(ddconfig, 4)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=MS_TEXT.width,
                       heads=MS_TEXT.heads, layers=MS_TEXT.layers + 1,
                       mlp_ratio=MS_TEXT.mlp_width / MS_TEXT.width)
    clip = CLIP(embed_dim=64, text_cfg=text,
                vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                         image_size=16))
    return (randomize_(unet, seed).eval(), randomize_(vae, seed + 1).eval(),
            randomize_(clip, seed + 2).eval())


def save_lightning_checkpoint(state_dict: dict, path: Path) -> None:
    """A checkpoint shaped like VQGAN_autoencoder.pth: Lightning metadata and callback objects
    next to a state_dict whose VAE keys carry `first_stage_model.`, plus other SD parts."""
    import numpy as np

    names = ["pytorch_lightning", "pytorch_lightning.callbacks",
             "pytorch_lightning.callbacks.model_checkpoint"]
    module = types.ModuleType(names[-1])

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_score = "val/rec_loss", torch.tensor(0.25)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update({name: module for name in names})
    try:
        checkpoint = {
            "epoch": 6, "global_step": np.int64(70000), "pytorch-lightning_version": "1.4.2",
            "callbacks": {ModelCheckpoint: ModelCheckpoint()},
            "state_dict": {**{f"first_stage_model.{k}": v for k, v in state_dict.items()},
                           "model.diffusion_model.out.2.bias": torch.zeros(4),
                           "cond_stage_model.model.ln_final.weight": torch.ones(8)},
        }
        torch.save(checkpoint, path)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def write_modelscope_folder(folder: Path, seed: int = 0):
    """The original layout, written from the original classes. Returns the models."""
    folder.mkdir(parents=True, exist_ok=True)
    unet, vae, clip = modelscope_models(seed)
    (folder / "configuration.json").write_text(json.dumps(modelscope_configuration(MS_UNET)))
    torch.save(unet.state_dict(), folder / "text2video_pytorch_model.pth")
    save_lightning_checkpoint(vae.state_dict(), folder / "VQGAN_autoencoder.pth")
    torch.save(clip.state_dict(), folder / "open_clip_pytorch_model.bin")
    return unet, vae, clip


def diffusers_models(seed: int = 0):
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=DIFF_TEXT.width, intermediate_size=DIFF_TEXT.mlp_width,
        num_attention_heads=DIFF_TEXT.heads, num_hidden_layers=DIFF_TEXT.layers,
        max_position_embeddings=77, hidden_act="gelu"))
    unet = UNet3DConditionModel(**diffusers_unet_kwargs(DIFF_UNET))
    vae = DiffusersAutoencoderKL(**diffusers_vae_kwargs(DIFF_VAE))
    return (randomize_(text, seed).eval(), randomize_(unet, seed + 1).eval(),
            randomize_(vae, seed + 2).eval())


def write_diffusers_folder(folder: Path, seed: int = 0, safe: bool = True,
                           variant: str | None = None):
    """A diffusers pipeline folder through the libraries' own save_pretrained."""
    text, unet, vae = diffusers_models(seed)
    dtype = torch.float16 if variant == "fp16" else torch.float32
    for name, model in (("text_encoder", text), ("unet", unet), ("vae", vae)):
        model.to(dtype).save_pretrained(folder / name, safe_serialization=safe, variant=variant)
        model.float()
    DDIMScheduler.from_config(HUB_SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "TextToVideoSDPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet3DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    return text, unet, vae
