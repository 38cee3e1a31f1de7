"""LoRA files of other tools (t2v.loading.lora_formats), built the way those tools write them:
diffusers/PEFT files written by peft and diffusers' own save_lora_weights, the layouts older
diffusers and its training scripts wrote, kohya files, and Text-To-Video-Finetuning's Stable
LoRA files (its `full_weights` export in diffusers names and its webui export in ModelScope
names). Outputs are compared with diffusers' `load_lora_weights`, with merges written out by
hand from each tool's formula, and with sd-webui-text2video's merge into ModelScope's UNetSD."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.deprecated.text_to_video_synthesis import TextToVideoSDPipeline
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from helpers import assert_parity, diffusers_scheduler, inputs, randomize_
from layouts import DIFF_TEXT, DIFF_UNET, DIFF_VAE, HUB_SCHEDULER, diffusers_models
from reference import modelscope_module
from t2v.config import ModelConfig, UNetConfig
from t2v.pipeline.options import load_config
from t2v.errors import UserError
from t2v.loading.lora_formats import merge_foreign_lora, merge_lora_file
from t2v.pipeline.text_to_video import TextToVideo
from t2v.cli.sample import main as sample_main
from t2v.models.text_encoder import TextEncoder
from t2v.models.unet import UNet3D
from t2v.models.vae import AutoencoderKL
from t2v.pipeline.video_io import read_video
from t2v.loading.weights import build
from weights_convert.diffusers import schedule_config, tokenizer_files
from weights_convert.modelscope import unet_from_modelscope

ROOT = Path(__file__).resolve().parents[1]
# t2v merged vs a reference: float32 sums in another order (adapters unmerged in diffusers,
# merged weights here; measured up to ~2e-6).
TOL = 1e-5
# peft target_modules (a regex, fullmatch): spatial and temporal attention, projections, the
# feed-forward output, ResNet 3x3 convolutions and time projections, temporal Conv3d layers.
UNET_TARGETS = (r".*((attentions\.\d+|transformer_in)\.transformer_blocks\.\d+\.attn[12]\."
                r"(to_q|to_k|to_v|to_out\.0)|\.proj_in|\.proj_out|ff\.net\.2|"
                r"resnets\.\d+\.(conv1|time_emb_proj)|temp_convs\.\d+\.conv1\.2)")
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PROMPT_IDS = torch.tensor([[49406, 320, 1125, 539, 49407] + [0] * 72])


def with_peft_mixin(unet):
    """diffusers 0.42's UNet3DConditionModel lacks PeftAdapterMixin, so TextToVideoSDPipeline's
    load_lora_weights fails on any UNet LoRA (AttributeError: no `load_lora_adapter`). The
    reference here is that loader with the mixin every other diffusers model has added."""
    from diffusers import UNet3DConditionModel
    from diffusers.loaders.peft import PeftAdapterMixin

    cls = type("PeftUNet3DConditionModel", (UNet3DConditionModel, PeftAdapterMixin), {})
    model = cls.from_config(unet.config)
    model.load_state_dict(unet.state_dict(), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def base():
    """Tiny diffusers models (random, every parameter) and a tokenizer."""
    text, unet, vae = diffusers_models(seed=5)
    unet = with_peft_mixin(unet)
    folder = Path(tempfile.mkdtemp())
    for name, content in tokenizer_files().items():
        (folder / name).write_text(content)
    return text, unet, vae, CLIPTokenizer.from_pretrained(folder)


def t2v_pipe(base) -> TextToVideo:
    text, unet, vae, _ = base
    config = ModelConfig(text_encoder=DIFF_TEXT, unet=DIFF_UNET, vae=DIFF_VAE,
                         schedule=schedule_config(HUB_SCHEDULER))
    def own(model):  # `build` adopts the tensors: copies, so merges leave `base` alone
        return {k: v.clone() for k, v in model.state_dict().items()}

    return TextToVideo(config,
                       build(lambda: TextEncoder(DIFF_TEXT), own(text), "text"),
                       build(lambda: UNet3D(DIFF_UNET), own(unet), "unet"),
                       build(lambda: AutoencoderKL(DIFF_VAE), own(vae), "vae"))


def diffusers_pipe(base) -> TextToVideoSDPipeline:
    text, unet, vae, tokenizer = base
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=copy.deepcopy(text), tokenizer=tokenizer,
                                 unet=copy.deepcopy(unet),
                                 scheduler=diffusers_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_out(unet, seed=0):
    x, context = inputs(1, 3, (8, 8), context_len=7, context_dim=DIFF_UNET.context_dim,
                        seed=seed)
    with torch.no_grad():
        out = unet(x, torch.tensor([500]), context)
    return out.sample if hasattr(out, "sample") else out


def text_out(text_encoder):
    with torch.no_grad():
        out = text_encoder(PROMPT_IDS)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def randomize_lora_(model, seed=1, std=0.1):
    """peft zero-initialises B (and these tools' B): every LoRA tensor random instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def peft_adapters(base, **config):
    """A diffusers UNet and CLIPTextModel with random peft adapters; their peft state dicts
    and LoraConfigs, as diffusers' training scripts produce them."""
    text, unet, _, _ = base
    unet, text = copy.deepcopy(unet), copy.deepcopy(text)
    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, **config)
    text_config = LoraConfig(r=2, lora_alpha=3, target_modules=TEXT_TARGETS)
    unet.add_adapter(unet_config)
    text.add_adapter(text_config)
    randomize_lora_(unet, 1)
    randomize_lora_(text, 2)
    return (unet.eval(), text.eval(), get_peft_model_state_dict(unet),
            get_peft_model_state_dict(text), unet_config, text_config)


def save_diffusers(folder: Path, unet_state, text_state=None, unet_config=None,
                   text_config=None) -> Path:
    TextToVideoSDPipeline.save_lora_weights(
        folder, unet_lora_layers=unet_state, text_encoder_lora_layers=text_state,
        unet_lora_adapter_metadata=unet_config.to_dict() if unet_config else None,
        text_encoder_lora_adapter_metadata=text_config.to_dict() if text_config else None)
    return folder / "pytorch_lora_weights.safetensors"


def lora_factors(state: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) from a peft state dict."""
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[:-len(".lora_A.weight")]
            out[module] = (a, state[f"{module}.lora_B.weight"])
    return out


def merged_by_hand(model, factors: dict, alphas, scale: float = 1.0, prefix: str = ""):
    """W + scale * alpha / r * B A, written out (conv adapters: A carries the kernel)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module, (a, b) in factors.items():
            w = model.get_submodule(prefix + module).weight
            delta = torch.einsum("or,ri...->oi...", b.flatten(1), a)
            alpha = alphas(module) if callable(alphas) else alphas
            w += scale * alpha / a.shape[0] * delta.reshape(w.shape)
    return model


def config_alpha(config: LoraConfig):
    def alpha(module):
        for pattern, value in config.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        return config.lora_alpha
    return alpha


# -- diffusers / PEFT -------------------------------------------------------------------------

def test_diffusers_file_matches_diffusers_load_lora_weights(base, tmp_path):
    unet, text, unet_state, text_state, unet_config, text_config = peft_adapters(
        base, rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3.0})
    path = save_diffusers(tmp_path, unet_state, text_state, unet_config, text_config)
    keys = sorted(__import__("safetensors").safe_open(str(path), "pt").keys())
    # transformers 5's CLIPTextModel has no `text_model.` level; older files have it.
    assert keys[0].startswith("text_encoder.encoder.") and keys[-1].startswith("unet.")
    old_names = tmp_path / "old" / "pytorch_lora_weights.safetensors"
    old_names.parent.mkdir()
    save_file({k.replace("text_encoder.", "text_encoder.text_model."): v for k, v in
               __import__("safetensors.torch").torch.load_file(str(path)).items()},
              str(old_names), metadata=__import__("safetensors").safe_open(str(path), "pt")
              .metadata())

    reference = diffusers_pipe(base)
    reference.load_lora_weights(str(path))
    ours = t2v_pipe(base)
    names = ours.load_lora(path)
    assert len(names) == len(lora_factors(unet_state)) + len(lora_factors(text_state))
    assert any("temp_convs" in n for n in names) and any(n.startswith("text_encoder.")
                                                        for n in names)
    before = unet_out(t2v_pipe(base).unet)
    expected = unet_out(reference.unet)
    assert (expected - before).abs().max() / before.abs().max() > 1e-2  # the LoRA acts
    assert_parity(unet_out(ours.unet), expected, TOL, "UNet: t2v merged vs diffusers' "
                  "load_lora_weights")
    assert_parity(unet_out(ours.unet), unet_out(unet), TOL, "UNet: t2v vs the adapted UNet")
    hand = merged_by_hand(t2v_pipe(base).unet, lora_factors(unet_state),
                          config_alpha(unet_config))
    assert_parity(unet_out(ours.unet), unet_out(hand), TOL, "UNet: t2v vs W + a/r BA")
    assert_parity(text_out(ours.text_encoder), text_out(reference.text_encoder), TOL,
                  "text encoder: t2v merged vs diffusers' load_lora_weights")
    older = t2v_pipe(base)
    older.load_lora(old_names)
    assert all(torch.equal(a, b) for a, b in zip(older.text_encoder.state_dict().values(),
                                                 ours.text_encoder.state_dict().values()))


def test_scale_multiplies_the_update(base, tmp_path):
    _, _, unet_state, _, unet_config, _ = peft_adapters(base)
    path = save_diffusers(tmp_path, unet_state, unet_config=unet_config)
    ours = t2v_pipe(base)
    ours.load_lora(path, scale=0.5)
    hand = merged_by_hand(t2v_pipe(base).unet, lora_factors(unet_state), 8.0, scale=0.5)
    assert_parity(unet_out(ours.unet), unet_out(hand), TOL, "scale 0.5 vs W + 0.5 a/r BA")
    full = t2v_pipe(base)
    full.load_lora(path)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w0, w_half, w_full = (p.unet.get_submodule(name).weight for p in (t2v_pipe(base), ours,
                                                                       full))
    torch.testing.assert_close(w_half - w0, 0.5 * (w_full - w0), rtol=0, atol=1e-6)


def test_other_diffusers_layouts_merge_the_same(base, tmp_path):
    """The layouts diffusers still reads: its training scripts' `lora.down/up` keys
    (convert_state_dict_to_diffusers), the old attention-processor keys (unprefixed, as
    `unet.save_attn_procs` wrote them, here a .bin pickle), and PEFT keys with per-layer
    `.alpha` instead of metadata. No metadata: alpha = rank unless `.alpha` says otherwise."""
    from diffusers.utils import convert_state_dict_to_diffusers

    _, _, unet_state, _, _, _ = peft_adapters(base)
    factors = lora_factors(unet_state)
    hand = merged_by_hand(t2v_pipe(base).unet, factors, lambda m: factors[m][0].shape[0])
    expected = unet_out(hand)

    converted = {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(unet_state).items()}
    assert any(".lora.down.weight" in k for k in converted)
    save_file(converted, str(tmp_path / "scripts.safetensors"), metadata={"format": "pt"})

    old = {}
    for module, (a, b) in factors.items():
        attn = re.fullmatch(r"(.*\.attn[12])\.(to_q|to_k|to_v|to_out)(\.0)?", module)
        stem = f"{attn[1]}.processor.{attn[2]}_lora" if attn else f"{module}.lora"
        old[f"{stem}.down.weight"], old[f"{stem}.up.weight"] = a, b
    torch.save(old, tmp_path / "pytorch_lora_weights.bin")

    alphas = {f"{m}.alpha": torch.tensor(float(i % 3 + 1)) for i, m in enumerate(factors)}
    with_alpha = {**{f"unet.{k}": v for k, v in unet_state.items()},
                  **{f"unet.{k}": v for k, v in alphas.items()}}
    save_file(with_alpha, str(tmp_path / "alpha.safetensors"))

    for name in ("scripts.safetensors", "pytorch_lora_weights.bin"):
        ours = t2v_pipe(base)
        ours.load_lora(tmp_path / name)
        assert_parity(unet_out(ours.unet), expected, TOL, f"{name} vs W + BA")
    ours = t2v_pipe(base)
    ours.load_lora(tmp_path / "alpha.safetensors")
    hand = merged_by_hand(t2v_pipe(base).unet, factors, lambda m: alphas[f"{m}.alpha"].item())
    assert_parity(unet_out(ours.unet), unet_out(hand), TOL, ".alpha keys vs W + a/r BA")


# -- kohya ------------------------------------------------------------------------------------

def kohya_state(factors: dict, alphas: dict, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for module, (a, b) in factors.items():
        name = prefix + module.replace(".", "_")
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = a, b
        out[f"{name}.alpha"] = torch.tensor(alphas[module])
    return out


def test_kohya_file(base, tmp_path):
    _, _, unet_state, text_state, _, _ = peft_adapters(base)
    factors, text_factors = lora_factors(unet_state), lora_factors(text_state)
    alphas = {m: float(i % 4 + 1) for i, m in enumerate(factors)}  # per layer, as kohya's
    state = kohya_state(factors, alphas, "lora_unet_")
    state.update(kohya_state(text_factors, {m: 1.5 for m in text_factors}, "lora_te_"))
    save_file(state, str(tmp_path / "kohya.safetensors"))
    ours = t2v_pipe(base)
    ours.load_lora(tmp_path / "kohya.safetensors", scale=0.7)
    hand = merged_by_hand(t2v_pipe(base).unet, factors, alphas.get, scale=0.7)
    assert_parity(unet_out(ours.unet), unet_out(hand), TOL, "kohya (temporal layers too) vs "
                  "W + s a/r BA")
    hand_text = merged_by_hand(t2v_pipe(base).text_encoder,
                               {k.removeprefix("text_model."): v for k, v in text_factors.items()},
                               1.5, scale=0.7)
    assert_parity(text_out(ours.text_encoder), text_out(hand_text), TOL, "kohya text encoder")

    # diffusers converts kohya names of the spatial layers (its renaming breaks temporal ones:
    # `temp_attentions` becomes `temp.attentions`): compare on those, one alpha for all.
    spatial = {m: f for m, f in factors.items() if "temp" not in m and "transformer_in" not in m}
    state = kohya_state(spatial, {m: 2.0 for m in spatial}, "lora_unet_")
    state.update(kohya_state(text_factors, {m: 1.5 for m in text_factors}, "lora_te_"))
    save_file(state, str(tmp_path / "spatial.safetensors"))
    reference = diffusers_pipe(base)
    reference.load_lora_weights(str(tmp_path / "spatial.safetensors"))
    ours = t2v_pipe(base)
    ours.load_lora(tmp_path / "spatial.safetensors")
    assert_parity(unet_out(ours.unet), unet_out(reference.unet), TOL,
                  "kohya: t2v vs diffusers' load_lora_weights")
    assert_parity(text_out(ours.text_encoder), text_out(reference.text_encoder), TOL,
                  "kohya text encoder: t2v vs diffusers")


# -- Text-To-Video-Finetuning's Stable LoRA ---------------------------------------------------

def stable_lora_state(model, rank=2, seed=3, std=0.1, skip=()) -> dict[str, torch.Tensor]:
    """`loralib.lora_state_dict` of a model Text-To-Video-Finetuning's `add_lora_to` wrapped
    (ancestor UNet3DConditionModel, search classes Linear/Conv2d/Conv3d/Embedding): A and B
    shaped as its loralib layers (convolutions: A (r k, in k), B (out k, r k)), random."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if any(re.search(s, name) for s in skip):
            continue
        if isinstance(m, torch.nn.Linear):
            a, b = (rank, m.in_features), (m.out_features, rank)
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            k = m.kernel_size[0]
            a, b = (rank * k, m.in_channels * k), (m.out_channels * k, rank * k)
        elif isinstance(m, torch.nn.Embedding):
            a, b = (rank, m.num_embeddings), (m.embedding_dim, rank)
        else:
            continue
        out[f"{name}.lora_A"] = std * torch.randn(a, generator=g)
        out[f"{name}.lora_B"] = std * torch.randn(b, generator=g)
    return out


def stable_lora_merged(model, state: dict, scale=1.0, names=lambda n: n):
    """Each layer's weight as Text-To-Video-Finetuning's layers compute it in forward (and
    sd-webui-text2video merges it): W + scale * (alpha / r = 1) * delta."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in model.named_modules():
            key = names(n)
            if f"{key}.lora_A" not in state or isinstance(m, torch.nn.Conv1d):
                continue
            delta = state[f"{key}.lora_B"].float() @ state[f"{key}.lora_A"].float()
            w = m.weight
            if isinstance(m, torch.nn.Conv3d):  # view (i, o, k, k, 1), mean over dim -2
                delta = delta.view(*w.shape[:3], w.shape[2], 1).mean(dim=-2, keepdim=True)
            elif isinstance(m, torch.nn.Embedding):
                delta = delta.T
            w += scale * delta.view(w.shape)
    return model


def test_stable_lora_full_weights(base, tmp_path):
    """`full_weights/..._unet.safetensors`: diffusers names, fp32, no metadata; every Linear,
    Conv2d and temporal Conv3d of the UNet, as its default `unet_lora_modules:
    [UNet3DConditionModel]` wraps them."""
    ours = t2v_pipe(base)
    state = stable_lora_state(ours.unet, std=0.05)
    assert any(".temp_convs." in k for k in state) and "conv_in.lora_A" in state
    save_file(state, str(tmp_path / "lora_unet.safetensors"))
    names = ours.load_lora(tmp_path / "lora_unet.safetensors", scale=0.8)
    assert len(names) == len(state) // 2
    hand = stable_lora_merged(t2v_pipe(base).unet, state, scale=0.8)
    assert_parity(unet_out(ours.unet), unet_out(hand), TOL, "Stable LoRA vs its forward")
    assert (unet_out(ours.unet) - unet_out(t2v_pipe(base).unet)).abs().max() > 1e-2


# Text-To-Video-Finetuning's convert_unet_state_dict(strict_mapping=True), as it renames LoRA
# keys for the webui: whole-key renames (conv_in.weight, ...) never match a LoRA key, then
# ResNet leaves inside `resnets`, then these prefixes in this order (4 levels, 2 layers).
FT_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
             ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"),
             ("skip_connection", "conv_shortcut")]


def ft_layer_map():
    pairs = [("input_blocks.0.1", "transformer_in")]
    for i in range(4):
        for j in range(2):
            pairs.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                pairs.append((f"input_blocks.{3 * i + j + 1}.1.",
                              f"down_blocks.{i}.attentions.{j}."))
            pairs.append((f"input_blocks.{3 * i + j + 1}.0.temopral_conv.",
                          f"down_blocks.{i}.temp_convs.{j}."))
            if i < 3:
                pairs.append((f"input_blocks.{3 * i + j + 1}.2.",
                              f"down_blocks.{i}.temp_attentions.{j}."))
        for j in range(3):
            pairs.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                pairs.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
            pairs.append((f"output_blocks.{3 * i + j}.0.temopral_conv.",
                          f"up_blocks.{i}.temp_convs.{j}."))
            if i > 0:
                pairs.append((f"output_blocks.{3 * i + j}.2.",
                              f"up_blocks.{i}.temp_attentions.{j}."))
        if i < 3:
            pairs.append((f"input_blocks.{3 * (i + 1)}.op.",
                          f"down_blocks.{i}.downsamplers.0.conv."))
            pairs.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 3}.",
                          f"up_blocks.{i}.upsamplers.0."))
    pairs += [("middle_block.1.", "mid_block.attentions.0.")]
    pairs += [(f"middle_block.{3 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    pairs += [("middle_block.2.", "mid_block.temp_attentions.0.")]
    pairs += [(f"middle_block.{3 * j}.temopral_conv.", f"mid_block.temp_convs.{j}.")
              for j in range(2)]
    return pairs


def ft_webui_key(key: str) -> str:
    new = key
    if "resnets" in key:
        for sd, hf in FT_RESNET:
            new = new.replace(hf, sd)
    for sd, hf in ft_layer_map():
        new = new.replace(hf, sd)
    return new


TINY_MS = UNetConfig(channels=(32, 64, 64, 64), head_dim=16, context_dim=1024, norm_groups=32)


def test_stable_lora_webui_export_matches_the_webui_merge_into_modelscope(tmp_path):
    """`webui_*.safetensors`: ModelScope names, fp16, metadata stable_lora_text_to_video.
    Reference: sd-webui-text2video's merge of it into ModelScope's own UNetSD, by module
    name. It skips the temporal transformers' projections (Conv1d in UNetSD) and the layers
    whose names stay diffusers' (conv_in, conv_out, time_embedding), so this file leaves them
    out; the full_weights test covers those."""
    cfg = TINY_MS
    mult = [c // cfg.channels[0] for c in cfg.channels]
    ms = randomize_(modelscope_module("unet_sd").UNetSD(
        in_dim=4, dim=cfg.channels[0], y_dim=cfg.context_dim, context_dim=cfg.context_dim,
        out_dim=4, dim_mult=mult, num_heads=cfg.transformer_in_heads, head_dim=cfg.head_dim,
        num_res_blocks=2, attn_scales=[1, 0.5, 0.25], dropout=0.1, temporal_attention=True),
        seed=4).eval()
    ours = UNet3D(cfg).eval()
    ours.load_state_dict(unet_from_modelscope(ms.state_dict(), cfg), strict=True)
    skip = (r"(transformer_in|temp_attentions\.\d+)\.proj_(in|out)$", r"^conv_(in|out)$",
            r"^time_embedding\.")
    state = stable_lora_state(ours, std=0.05, skip=skip)
    webui = {ft_webui_key(k): v.half() for k, v in state.items()}
    assert "input_blocks.1.0.in_layers.2.lora_A" in webui  # down_blocks.0.resnets.0.conv1
    assert "output_blocks.2.1.conv.lora_A" in webui  # up_blocks.0.upsamplers.0.conv
    path = tmp_path / "webui_lora.safetensors"
    save_file(webui, str(path), metadata={"stable_lora_text_to_video": "v1",
                                          "lora_name": "lora_text_to_video_1a2b3"})

    assert len(merge_foreign_lora(path, 1.0, ours)) == len(state) // 2
    reference = stable_lora_merged(ms, webui)
    x, context = inputs(1, 3, (16, 16), context_len=7, context_dim=1024)
    t = torch.tensor([500])
    with torch.no_grad():
        expected, actual = reference(x, t, context), ours(x, t, context)
        before = ms(x, t, context)
    assert (expected - before).abs().max() / before.abs().max() > 1e-2
    assert_parity(actual, expected, TOL, "Stable LoRA webui file: t2v vs the webui's merge "
                  "into UNetSD")


def test_stable_lora_text_encoder(base, tmp_path):
    """Text LoRA (its `text_encoder_lora_modules` CLIPEncoderLayer, plus the embeddings with
    CLIPTextEmbeddings): transformers names in full_weights, open_clip-style in the webui
    export (`resblocks.N.attn.q_proj`, `mlp.c_fc`), loralib's (B @ A).T for embeddings."""
    ours = t2v_pipe(base)
    te_state = stable_lora_state(ours.text_encoder, seed=6, std=0.05)
    state = {f"text_model.{k}": v for k, v in te_state.items()}
    webui = {}
    for key, v in state.items():
        new = key.replace("text_model.encoder.layers.", "resblocks.")
        new = new.replace(".self_attn", ".attn").replace(".fc1.", ".c_fc.")
        webui[new.replace(".fc2.", ".c_proj.")] = v
    assert "resblocks.0.mlp.c_fc.lora_A" in webui
    assert "text_model.embeddings.token_embedding.lora_A" in webui
    hand = stable_lora_merged(t2v_pipe(base).text_encoder, te_state, scale=0.5)
    for name, tensors in (("full.safetensors", state), ("webui.safetensors", webui)):
        save_file(tensors, str(tmp_path / name))
        pipe = t2v_pipe(base)
        pipe.load_lora(tmp_path / name, scale=0.5)
        assert_parity(text_out(pipe.text_encoder), text_out(hand), TOL, f"Stable LoRA text {name}")


def test_stable_lora_biases_replace_the_base_bias(base, tmp_path):
    """lora_bias 'all' / 'lora_only' also saves the trained biases; the trainer loads them
    with load_state_dict: at scale s the bias moves s of the way to the file's."""
    ours = t2v_pipe(base)
    name = "down_blocks.0.attentions.0.proj_in"
    layer = ours.unet.get_submodule(name)
    old = layer.bias.detach().clone()
    new = torch.randn(old.shape)
    save_file({f"{name}.bias": new, "mid_block.resnets.0.norm1.bias": torch.zeros(64),
               **{k: v for k, v in stable_lora_state(ours.unet).items()
                  if k.startswith(name + ".")}}, str(tmp_path / "b.safetensors"))
    ours.load_lora(tmp_path / "b.safetensors", scale=0.25)
    torch.testing.assert_close(layer.bias, old + 0.25 * (new - old))


# -- errors -----------------------------------------------------------------------------------

def bad_files(unet) -> list[tuple[dict, dict, str]]:
    a = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w = unet.get_submodule(a).weight
    good = {f"unet.{a}.lora_A.weight": torch.ones(2, w.shape[1]),
            f"unet.{a}.lora_B.weight": torch.ones(w.shape[0], 2)}
    return [
        ({**good, "unet.something_else": torch.ones(1)}, {}, "'unet.something_else': not a "
         "LoRA key"),
        ({"unet.down_blocks.9.proj_in.lora_A.weight": torch.ones(2, 2),
          "unet.down_blocks.9.proj_in.lora_B.weight": torch.ones(2, 2)}, {},
         "'unet.down_blocks.9.proj_in.lora_A.weight': names no layer of the UNet"),
        ({**good, f"unet.{a}.lora_B.weight": torch.ones(w.shape[0] + 1, 2)}, {},
         f"'unet.{a}.lora_B.weight' has shape ({w.shape[0] + 1}, 2)"),
        ({f"unet.{a}.lora_A.weight": torch.ones(2, w.shape[1])}, {}, "no B/up tensor"),
        ({f"unet.{a}.lora.down.weight": torch.ones(2, w.shape[1]), **good}, {},
         "a second down tensor"),
        ({**good, f"unet.{a}.lora_magnitude_vector": torch.ones(w.shape[0])}, {}, "DoRA"),
        ({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
          torch.ones(2, 32)}, {}, "no text encoder was given"),
        ({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(1)}, {},
         "no text encoder was given"),
        ({"lora_unet_conv_in.lora_down.weight": torch.ones(1), "x.lora_A.weight":
          torch.ones(1)}, {}, "'x.lora_A.weight': not a kohya key"),
        ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(1)}, {},
         "second text encoder"),
        ({"unet:0:up": torch.ones(1), "unet:0:down": torch.ones(1)}, {}, "cloneofsimo"),
        ({"down_blocks.0.resnets.0.norm1.lora_A": torch.ones(1, 1),
          "down_blocks.0.resnets.0.norm1.lora_B": torch.ones(1, 1)}, {}, "GroupNorm, not a "
         "layer LoRA adapts"),
        ({**good}, {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4})},
         "has rank 2 but lora_adapter_metadata says 4"),
    ]


def test_bad_files_are_one_line_errors_naming_the_key(tmp_path):
    unet = UNet3D(DIFF_UNET).eval()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    for i, (tensors, metadata, needle) in enumerate(bad_files(unet)):
        path = tmp_path / f"bad{i}.safetensors"
        save_file(tensors, str(path), metadata=metadata or None)
        with pytest.raises(UserError) as info:
            merge_foreign_lora(path, 1.0, unet)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and needle in message, message
        assert "\n" not in message
    after = unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # untouched

    torch.save([torch.ones(2), torch.ones(2)], tmp_path / "cloneofsimo.pt")
    with pytest.raises(UserError, match="2 tensors, but a T2V-Turbo file for this UNet holds"):
        merge_lora_file(tmp_path / "cloneofsimo.pt", 1.0, unet)
    torch.save([torch.ones(2)] * 3, tmp_path / "odd.pt")
    with pytest.raises(UserError, match="not .up, down. tensor pairs"):
        merge_lora_file(tmp_path / "odd.pt", 1.0, unet)
    after = unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # untouched
    with pytest.raises(UserError, match="not found"):
        merge_foreign_lora(tmp_path / "nope.safetensors", 1.0, unet)


# -- CLI --------------------------------------------------------------------------------------

def luma_psnr(a: np.ndarray, b: np.ndarray) -> float:
    luma = np.array([0.299, 0.587, 0.114])
    mse = np.mean((a.astype(np.float64) @ luma - b.astype(np.float64) @ luma) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


def test_cli_merges_a_diffusers_file(tmp_path, capsys):
    config = ROOT / "configs" / "tiny.yaml"
    cfg = load_config(config)
    pipe = TextToVideo.from_config(cfg.model, seed=0)
    state = {}
    g = torch.Generator().manual_seed(0)
    for name, m in pipe.unet.named_modules():
        if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$|temp_convs\.\d+\.conv1\.2$", name):
            a = torch.randn(4, *m.weight.shape[1:], generator=g)
            b = torch.randn(m.weight.shape[0], 4, *[1] * (m.weight.ndim - 2), generator=g)
            state[f"unet.{name}.lora_A.weight"], state[f"unet.{name}.lora_B.weight"] = a, b
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(state, str(path))

    s = cfg.sample
    kwargs = dict(num_frames=s.num_frames, height=s.height, width=s.width, steps=s.steps,
                  seed=2, progress=False, output="uint8")
    plain = pipe("a red ball", **kwargs).frames[0].numpy()
    pipe.load_lora(path, 0.5)
    expected = pipe("a red ball", **kwargs).frames[0].numpy()
    assert np.abs(expected.astype(int) - plain.astype(int)).mean() > 5  # the LoRA acts

    out = tmp_path / "v.mp4"
    code = sample_main(["--config", str(config), "--prompt", "a red ball", "--seed", "2",
                        "--lora", f"{path}:0.5", "--out", str(out), "--no-progress"])
    assert code == 0
    frames, _ = read_video(out)
    # H.264 keeps ~38 dB of luma on these noise-like frames (tests/test_cli.py); the video
    # without the LoRA is far below that (10 dB or more below the merged one's PSNR).
    psnr, psnr_plain = luma_psnr(frames, expected), luma_psnr(frames, plain)
    print(f"[cli] luma PSNR vs merged in Python {psnr:.1f} dB, vs no LoRA {psnr_plain:.1f} dB")
    assert psnr > 32.0 and psnr > psnr_plain + 10

    bad = tmp_path / "bad.safetensors"
    save_file({"unet.nothing.lora_A.weight": torch.ones(1, 1)}, str(bad))
    capsys.readouterr()
    code = sample_main(["--config", str(config), "--prompt", "x", "--lora", str(bad),
                        "--out", str(tmp_path / "w.mp4")])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not (tmp_path / "w.mp4").exists()
    assert err_lines[-1].startswith(f"error: {bad}: 'unet.nothing.lora_A.weight'"), err_lines


# -- T2V-Turbo (MS): a pickled list placed by position ---------------------------------------

def t2v_turbo_file(reference: torch.nn.Module, path: Path, rank: int = 8, seed: int = 0):
    """A file as T2V-Turbo's code writes one for `reference` (diffusers UNet3DConditionModel
    with time_cond_proj_dim): its loader walks reference.named_modules() and adapts every
    module whose class is exactly nn.Linear, nn.Conv2d or nn.Conv3d, rank min(rank, in, out);
    save_lora_weight stores [up, down] per module (up (out, r[, 1...]), down (r, in[, kernel]))
    with torch.save. Returns the list."""
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for _, module in reference.named_modules():
        kind = type(module)
        if kind is torch.nn.Linear:
            r = min(rank, module.in_features, module.out_features)
            up, down = (module.out_features, r), (r, module.in_features)
        elif kind in (torch.nn.Conv2d, torch.nn.Conv3d):
            r = min(rank, module.in_channels, module.out_channels)
            ones = (1,) * len(module.kernel_size)
            up, down = (module.out_channels, r, *ones), (r, module.in_channels, *module.kernel_size)
        else:
            continue
        tensors += [0.05 * torch.randn(up, generator=g), 0.05 * torch.randn(down, generator=g)]
    torch.save(tensors, path)
    return tensors


def collapse_like_t2v_turbo(reference: torch.nn.Module, tensors: list) -> None:
    """Their collapse_lora: W += up @ down for each adapted module in the same walk (conv:
    the flattened product reshaped to W), alpha 1."""
    pairs = iter(zip(tensors[::2], tensors[1::2]))
    with torch.no_grad():
        for _, module in reference.named_modules():
            if type(module) in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d):
                up, down = next(pairs)
                module.weight += (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)


def test_t2v_turbo_file_merges_as_its_authors_code(tmp_path):
    """A T2V-Turbo-format file for a tiny ms-1.7b-like UNet: t2v's base UNet (no guidance
    embedding) + the file equals diffusers' UNet3DConditionModel(time_cond_proj_dim=256) with
    the same base weights, its cond_proj base zero (t2v's documented choice: theirs is an
    unseeded random draw), merged as their collapse_lora does; outputs with timestep_cond."""
    from diffusers import UNet3DConditionModel

    from t2v.loading.t2v_turbo import GUIDANCE_EMBEDDING, positional_modules
    from t2v.models.unet import guidance_scale_embedding
    from weights_convert.diffusers import diffusers_unet_kwargs

    turbo_cfg = dataclasses.replace(DIFF_UNET, time_cond_proj_dim=GUIDANCE_EMBEDDING)
    reference = randomize_(UNet3DConditionModel(**diffusers_unet_kwargs(turbo_cfg)), 9).eval()
    with torch.no_grad():
        reference.time_embedding.cond_proj.weight.zero_()
    base = {k: v.clone() for k, v in reference.state_dict().items() if "cond_proj" not in k}
    tensors = t2v_turbo_file(reference, tmp_path / "unet_lora.pt")
    collapse_like_t2v_turbo(reference, tensors)
    order = [n for n, m in reference.named_modules()
             if type(m) in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)]
    assert order.index("mid_block.resnets.0.conv1") > order.index("up_blocks.0.resnets.0.conv1")

    pipe_unet = UNet3D(DIFF_UNET).eval()
    pipe_unet.load_state_dict(base, strict=True)
    assert positional_modules(pipe_unet, ("time_embedding.cond_proj",)) == order
    merged = merge_lora_file(tmp_path / "unet_lora.pt", 1.0, pipe_unet)
    assert merged == order and pipe_unet.cfg.time_cond_proj_dim == GUIDANCE_EMBEDDING
    x, context = inputs(2, 3, (8, 8))
    cond = guidance_scale_embedding(torch.tensor([7.5, 3.0]), GUIDANCE_EMBEDDING)
    with torch.no_grad():
        expected = reference(x, torch.tensor([999, 259]), context, timestep_cond=cond).sample
        actual = pipe_unet(x, torch.tensor([999, 259]), context, timestep_cond=cond)
    assert_parity(actual, expected, what="T2V-Turbo file merged vs diffusers + their collapse")


def test_t2v_turbo_file_through_the_pipeline_and_cli_flags(tmp_path):
    """TextToVideo.load_lora of a T2V-Turbo file: the pipeline's config gains the embedding
    and `--sampler lcm --steps 4` runs one UNet pass per step."""
    from diffusers import UNet3DConditionModel

    from t2v.loading.t2v_turbo import GUIDANCE_EMBEDDING
    from weights_convert.diffusers import diffusers_unet_kwargs

    text, unet, vae = diffusers_models(seed=3)
    config = ModelConfig(text_encoder=DIFF_TEXT, unet=DIFF_UNET, vae=DIFF_VAE,
                         schedule=schedule_config(HUB_SCHEDULER))
    pipe = TextToVideo(config, build(lambda: TextEncoder(DIFF_TEXT), text.state_dict(), "text"),
                       build(lambda: UNet3D(DIFF_UNET), unet.state_dict(), "unet"),
                       build(lambda: AutoencoderKL(DIFF_VAE), vae.state_dict(), "vae"))
    turbo_cfg = dataclasses.replace(DIFF_UNET, time_cond_proj_dim=GUIDANCE_EMBEDDING)
    t2v_turbo_file(UNet3DConditionModel(**diffusers_unet_kwargs(turbo_cfg)),
                   tmp_path / "unet_lora.pt")
    pipe.load_lora(tmp_path / "unet_lora.pt")
    assert pipe.config.unet.time_cond_proj_dim == GUIDANCE_EMBEDDING
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    pipe("a cat", num_frames=2, height=32, width=32, steps=4, sampler="lcm",
         lcm={"timesteps": "stride"}, guidance_scale=8.5, seed=0, progress=False)
    handle.remove()
    assert calls == [1] * 4
