"""diffusers / transformers folder configs -> t2v configs.

A diffusers folder stores the UNet3D, VAE and text encoder with exactly our parameter names
(the text encoder under a `text_model.` prefix), so only the configs need translating.
"""

from __future__ import annotations

from typing import Mapping

import torch

from t2v.config import TextEncoderConfig
from t2v.errors import ConfigError

TEXT_MODEL_PREFIX = "text_model."


def _require(config: Mapping, key: str, allowed, what: str) -> None:
    value = config.get(key, allowed[0])
    if value not in allowed:
        raise ConfigError(f"{what}: {key}={value!r} is not supported (t2v implements "
                          f"{' or '.join(map(repr, allowed))})")


def text_encoder_config(hf_config: Mapping) -> TextEncoderConfig:
    """transformers `text_encoder/config.json` (CLIPTextModel) -> TextEncoderConfig."""
    what = "text_encoder/config.json"
    _require(hf_config, "hidden_act", ("gelu",), what)
    try:
        return TextEncoderConfig(
            vocab_size=int(hf_config["vocab_size"]),
            context_length=int(hf_config["max_position_embeddings"]),
            width=int(hf_config["hidden_size"]),
            heads=int(hf_config["num_attention_heads"]),
            layers=int(hf_config["num_hidden_layers"]),
            mlp_width=int(hf_config["intermediate_size"]),
            norm_eps=float(hf_config.get("layer_norm_eps", 1e-5)),
        )
    except KeyError as exc:
        raise ConfigError(f"{what}: missing key {exc.args[0]!r}") from None


def text_encoder_from_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the `text_model.` prefix of transformers' saved CLIPTextModel files."""
    out = {}
    for key, tensor in state.items():
        if key == "text_model.embeddings.position_ids":
            continue  # a non-learned buffer older transformers versions saved
        out[key.removeprefix(TEXT_MODEL_PREFIX)] = tensor
    return out
