"""The original ModelScope checkpoints <-> t2v (diffusers) names: UNet and VAE.

UNet (`text2video_pytorch_model.pth`, ModelScope `UNetSD`): positional containers
`input_blocks.{k}.{slot}`, `middle_block.{slot}`, `output_blocks.{k}.{slot}`, the temporal conv
nested inside each ResBlock as `temopral_conv` (sic), ResBlock leaves `in_layers.{0,2}`,
`emb_layers.1`, `out_layers.{0,3}`, `skip_connection`, and the temporal transformers'
projections as Conv1d `[out, in, 1]` where ours are Linear `[out, in]`. Rules are those of
diffusers' `scripts/convert_ms_text_to_video_to_diffusers.py` (docs/architecture.md, "Reference
facts"), written as a table generated from the config.

VAE (`first_stage_model.*` inside the Lightning checkpoint `VQGAN_autoencoder.pth`, the latent
diffusion `AutoencoderKL`): `encoder.down.{i}.block.{j}`, `decoder.up.{i}` numbered from the
*highest* resolution (ours from the lowest: `up_blocks.{i}` = `up.{levels-1-i}`),
`mid.block_{1,2}`, `mid.attn_1.{norm,q,k,v,proj_out}` with 1x1-conv weights, `nin_shortcut`,
`norm_out`. Rules as diffusers' `convert_ldm_vae_checkpoint` (docs/architecture.md).
"""

from __future__ import annotations

from typing import Mapping

import torch

from t2v.config import UNetConfig, VAEConfig
from t2v.models.unet import UNet3D
from t2v.models.vae import AutoencoderKL
from weights_convert.table import ConversionError, Rule, convert, invert, rename

# ResBlock leaf names: ours (diffusers) -> ModelScope.
RESNET_LEAVES = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}


def _squeeze_last(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [tensors[0][..., 0]]  # Conv1d [out, in, 1] -> Linear [out, in]


def _unsqueeze_last(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [tensors[0][..., None]]


def _unet_prefixes(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(our prefix, ModelScope prefix, kind) for every sub-module of the UNet."""
    n = cfg.layers_per_block
    pairs = [
        ("time_embedding.linear_1", "time_embed.0", "plain"),
        ("time_embedding.linear_2", "time_embed.2", "plain"),
        ("conv_in", "input_blocks.0.0", "plain"),
        ("transformer_in", "input_blocks.0.1", "temporal"),
        ("conv_norm_out", "out.0", "plain"),
        ("conv_out", "out.2", "plain"),
    ]

    def layer(ours: str, ms: str, i: int, attention: bool) -> None:
        pairs.extend([
            (f"{ours}.resnets.{i}", f"{ms}.0", "resnet"),
            (f"{ours}.temp_convs.{i}", f"{ms}.0.temopral_conv", "plain"),
        ])
        if attention:
            pairs.extend([(f"{ours}.attentions.{i}", f"{ms}.1", "plain"),
                          (f"{ours}.temp_attentions.{i}", f"{ms}.2", "temporal")])

    k = 1  # input_blocks.0 is conv_in + transformer_in
    levels = len(cfg.channels)
    for level in range(levels):
        for i in range(n):
            layer(f"down_blocks.{level}", f"input_blocks.{k}", i, cfg.attention[level])
            k += 1
        if level < levels - 1:
            pairs.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{k}.op",
                          "plain"))
            k += 1

    pairs += [
        ("mid_block.resnets.0", "middle_block.0", "resnet"),
        ("mid_block.temp_convs.0", "middle_block.0.temopral_conv", "plain"),
        ("mid_block.attentions.0", "middle_block.1", "plain"),
        ("mid_block.temp_attentions.0", "middle_block.2", "temporal"),
        ("mid_block.resnets.1", "middle_block.3", "resnet"),
        ("mid_block.temp_convs.1", "middle_block.3.temopral_conv", "plain"),
    ]

    k = 0
    for b, level in enumerate(reversed(range(levels))):
        attention = cfg.attention[level]
        for i in range(n + 1):
            layer(f"up_blocks.{b}", f"output_blocks.{k}", i, attention)
            if i == n and level > 0:  # the upsampler is the last slot of the level's last entry
                slot = 3 if attention else 1
                pairs.append((f"up_blocks.{b}.upsamplers.0.conv",
                              f"output_blocks.{k}.{slot}.conv", "plain"))
            k += 1
    return pairs


def _leaf_rule(ours: str, ms: str, kind: str, leaf: str) -> Rule:
    if kind == "resnet":
        module, _, param = leaf.partition(".")
        return rename(f"{ms}.{RESNET_LEAVES[module]}.{param}", f"{ours}.{leaf}")
    if kind == "temporal" and leaf in ("proj_in.weight", "proj_out.weight"):
        return Rule((f"{ms}.{leaf}",), (f"{ours}.{leaf}",), _squeeze_last, _unsqueeze_last)
    return rename(f"{ms}.{leaf}" if leaf else ms, f"{ours}.{leaf}" if leaf else ours)


def _prefix_rules(model: torch.nn.Module, prefixes: list[tuple[str, str, str]],
                  leaf_rule) -> list[Rule]:
    """One rule per parameter of `model`: the single prefix pair that owns it, then
    `leaf_rule(our prefix, reference prefix, kind, leaf)`."""
    rules = []
    for key in model.state_dict():
        owners = [p for p in prefixes if key.startswith(p[0] + ".")]
        if len(owners) != 1:  # a bug in the prefix list, not in the user's file
            raise AssertionError(f"conversion table: {key} has {len(owners)} owners")
        prefix, reference, kind = owners[0]
        rules.append(leaf_rule(prefix, reference, kind, key[len(prefix) + 1:]))
    return rules


def unet_rules(cfg: UNetConfig) -> list[Rule]:
    """ModelScope UNetSD key -> UNet3D key, one rule per parameter of `UNet3D(cfg)`."""
    with torch.device("meta"):
        model = UNet3D(cfg)
    return _prefix_rules(model, _unet_prefixes(cfg), _leaf_rule)


def unet_from_modelscope(state: Mapping[str, torch.Tensor],
                         cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Convert a `text2video_pytorch_model.pth` state dict to UNet3D keys."""
    return convert(state, unet_rules(cfg), (), "ModelScope UNet state dict")


def unet_to_modelscope(state: Mapping[str, torch.Tensor],
                       cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """The inverse: UNet3D keys -> ModelScope UNetSD keys."""
    beyond = cfg.beyond_reference() + (["time_cond_proj_dim"] if cfg.time_cond_proj_dim
                                       else [])
    if beyond:
        raise ConversionError("ModelScope's UNetSD has no equivalent of model.unet."
                              f"{', model.unet.'.join(beyond)}: a UNet with it cannot be "
                              "exported (export to the diffusers layout instead)")
    return convert(state, invert(unet_rules(cfg)), (), "UNet3D state dict")


LDM_PREFIX = "first_stage_model."


def _conv1x1_to_linear(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [tensors[0][:, :, 0, 0]]


def _linear_to_conv1x1(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [tensors[0][:, :, None, None]]


def _vae_prefixes(cfg: VAEConfig) -> list[tuple[str, str, str]]:
    levels = len(cfg.channels)
    pairs = [("quant_conv", "quant_conv", "plain"), ("post_quant_conv", "post_quant_conv", "plain")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.{name}", f"{part}.{name}", "plain") for name in ("conv_in", "conv_out")]
        pairs += [
            (f"{part}.conv_norm_out", f"{part}.norm_out", "plain"),
            (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", "resnet"),
            (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", "resnet"),
            (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", "attention"),
        ]
    for i in range(levels):
        for j in range(cfg.layers_per_block):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}",
                          "resnet"))
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv",
                      f"encoder.down.{i}.downsample.conv", "plain"))
        ms_level = levels - 1 - i  # ModelScope's decoder.up.0 is the highest resolution
        for j in range(cfg.layers_per_block + 1):
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ms_level}.block.{j}",
                          "resnet"))
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv",
                      f"decoder.up.{ms_level}.upsample.conv", "plain"))
    return pairs


VAE_ATTENTION_LEAVES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                        "to_out.0": "proj_out"}


def _vae_leaf_rule(ours: str, ms: str, kind: str, leaf: str) -> Rule:
    module, _, param = leaf.rpartition(".")
    if kind == "resnet":
        return rename(f"{ms}.{module.replace('conv_shortcut', 'nin_shortcut')}.{param}",
                      f"{ours}.{leaf}")
    if kind == "attention":
        source = f"{ms}.{VAE_ATTENTION_LEAVES[module]}.{param}"
        if module != "group_norm" and param == "weight":
            return Rule((source,), (f"{ours}.{leaf}",), _conv1x1_to_linear, _linear_to_conv1x1)
        return rename(source, f"{ours}.{leaf}")
    return rename(f"{ms}.{leaf}", f"{ours}.{leaf}")


def vae_rules(cfg: VAEConfig) -> list[Rule]:
    """LDM / ModelScope VAE key (without `first_stage_model.`) -> AutoencoderKL key."""
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    return _prefix_rules(model, _vae_prefixes(cfg), _vae_leaf_rule)


def vae_from_modelscope(state: Mapping[str, torch.Tensor],
                        cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Convert the VAE part of an LDM/ModelScope state dict to AutoencoderKL keys.

    Accepts the Lightning checkpoint's `state_dict` as is (keys `first_stage_model.*`; the
    other Stable Diffusion components it may hold are ignored) or the bare VAE keys.
    """
    if any(k.startswith(LDM_PREFIX) for k in state):
        state = {k[len(LDM_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
    return convert(state, vae_rules(cfg), (), "ModelScope VAE state dict")


def vae_to_modelscope(state: Mapping[str, torch.Tensor],
                      cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """The inverse: AutoencoderKL keys -> bare LDM VAE keys (no `first_stage_model.`)."""
    return convert(state, invert(vae_rules(cfg)), (), "AutoencoderKL state dict")


def unet_config_from_modelscope(model_cfg: Mapping) -> UNetConfig:
    """`configuration.json` -> model.model_cfg (the `unet_*` keys) -> UNetConfig."""
    what = "configuration.json model_cfg"
    if str(model_cfg.get("temporal_attention", True)).lower() != "true":
        raise ConversionError(f"{what}: temporal_attention must be true; t2v implements the "
                              "model with temporal transformers")
    try:
        dim = int(model_cfg["unet_dim"])
        mult = [int(m) for m in model_cfg["unet_dim_mult"]]
        scales = [float(s) for s in model_cfg["unet_attn_scales"]]
        return UNetConfig(
            in_channels=int(model_cfg.get("unet_in_dim", 4)),
            out_channels=int(model_cfg.get("unet_out_dim", 4)),
            channels=tuple(dim * m for m in mult),
            attention=tuple(1 / 2 ** i in scales for i in range(len(mult))),
            layers_per_block=int(model_cfg["unet_res_blocks"]),
            head_dim=int(model_cfg["unet_head_dim"]),
            transformer_in_heads=int(model_cfg.get("unet_num_heads") or dim // 32),
            context_dim=int(model_cfg["unet_context_dim"]),
            norm_groups=32,  # UNetSD hard-codes GroupNorm(32, .)
        )
    except KeyError as exc:
        raise ConversionError(f"{what} lacks {exc.args[0]!r}") from None


def vae_config_from_state(state: Mapping[str, torch.Tensor]) -> VAEConfig:
    """Infer the VAEConfig of an LDM VAE (keys without `first_stage_model.`) from its tensors.
    ModelScope hard-codes the architecture; reading it from the tensors also serves other
    LDM autoencoders. GroupNorm groups (32) and the scaling factor are LDM's constants."""
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")})
    blocks = {int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block.")}
    try:
        return VAEConfig(
            in_channels=state["encoder.conv_in.weight"].shape[1],
            out_channels=state["decoder.conv_out.weight"].shape[0],
            latent_channels=state["post_quant_conv.weight"].shape[0],
            channels=tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]
                           for i in levels),
            layers_per_block=len(blocks),
        )
    except KeyError as exc:
        raise ConversionError(f"VAE state dict lacks {exc.args[0]}; is this an LDM "
                              "autoencoder?") from None
