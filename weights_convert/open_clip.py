"""open_clip's text tower (`open_clip_pytorch_model.bin`, ViT-H-14) <-> t2v's TextEncoder.

open_clip packs q, k, v into one `in_proj_weight` (3*width rows in q, k, v order); ours keeps
three Linear layers as transformers' CLIPTextModel does. Blocks at or past `cfg.layers` (the
24th of ViT-H-14), `text_projection`, `logit_scale` and the whole `visual.*` tower are not used
by the video model and are explicitly ignored.
"""

from __future__ import annotations

from typing import Mapping

import torch

from t2v.config import TextEncoderConfig
from weights_convert.table import ConversionError, Rule, convert, invert, rename

IGNORED = (r"visual\..*", r"text_projection", r"logit_scale", r"attn_mask")


def _split_qkv(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(tensors[0].chunk(3, dim=0))


def _join_qkv(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.cat(tensors, dim=0)]


def text_encoder_rules(cfg: TextEncoderConfig) -> list[Rule]:
    """open_clip key(s) -> t2v key(s) for every parameter of `TextEncoder(cfg)`."""
    rules = [
        rename("token_embedding.weight", "embeddings.token_embedding.weight"),
        rename("positional_embedding", "embeddings.position_embedding.weight"),
        rename("ln_final.weight", "final_layer_norm.weight"),
        rename("ln_final.bias", "final_layer_norm.bias"),
    ]
    for i in range(cfg.layers):
        src, dst = f"transformer.resblocks.{i}", f"encoder.layers.{i}"
        for p in ("weight", "bias"):
            rules += [
                rename(f"{src}.ln_1.{p}", f"{dst}.layer_norm1.{p}"),
                rename(f"{src}.ln_2.{p}", f"{dst}.layer_norm2.{p}"),
                rename(f"{src}.attn.out_proj.{p}", f"{dst}.self_attn.out_proj.{p}"),
                rename(f"{src}.mlp.c_fc.{p}", f"{dst}.mlp.fc1.{p}"),
                rename(f"{src}.mlp.c_proj.{p}", f"{dst}.mlp.fc2.{p}"),
                Rule((f"{src}.attn.in_proj_{p}",),
                     tuple(f"{dst}.self_attn.{n}_proj.{p}" for n in "qkv"), _split_qkv, _join_qkv),
            ]
    return rules


def _ignored(cfg: TextEncoderConfig, state: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")}
    unused_blocks = tuple(rf"transformer\.resblocks\.{i}\..*" for i in blocks if i >= cfg.layers)
    return IGNORED + unused_blocks


def text_encoder_from_open_clip(state: Mapping[str, torch.Tensor],
                                cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """Convert an open_clip CLIP (or text-only) state dict to TextEncoder keys."""
    return convert(state, text_encoder_rules(cfg), _ignored(cfg, state), "open_clip state dict")


def text_encoder_to_open_clip(state: Mapping[str, torch.Tensor],
                              cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """The inverse: TextEncoder keys -> open_clip text-tower keys (only the blocks we keep)."""
    return convert(state, invert(text_encoder_rules(cfg)), (), "TextEncoder state dict")


def text_encoder_config_from_state(state: Mapping[str, torch.Tensor],
                                   skip_last: int = 1) -> TextEncoderConfig:
    """Infer the TextEncoderConfig of an open_clip text tower from its tensors; the video model
    runs all blocks but the last `skip_last` ("penultimate"). Heads are width / 64, the head
    width of every open_clip text tower."""
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")}
    try:
        vocab, width = state["token_embedding.weight"].shape
        return TextEncoderConfig(
            vocab_size=vocab, context_length=state["positional_embedding"].shape[0],
            width=width, heads=width // 64, layers=len(blocks) - skip_last,
            mlp_width=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    except KeyError as exc:
        raise ConversionError(f"open_clip state dict lacks {exc.args[0]}; is this an open_clip "
                              "checkpoint?") from None
