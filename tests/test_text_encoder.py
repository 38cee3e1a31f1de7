"""TextEncoder parity: transformers CLIPTextModel and open_clip's own text tower."""

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from transformers import CLIPTextConfig, CLIPTextModel

from helpers import assert_parity, randomize_
from t2v.config import TextEncoderConfig
from t2v.pipeline.options import load_config
from t2v.errors import ConfigError
from t2v.models.text_encoder import TextEncoder
from t2v.models.tokenizer import Tokenizer
from weights_convert import ConversionError
from weights_convert.diffusers import text_encoder_config, text_encoder_from_transformers
from weights_convert.open_clip import text_encoder_from_open_clip, text_encoder_to_open_clip

TINY = TextEncoderConfig(width=32, heads=2, layers=3, mlp_width=64)
PROMPTS = ["a red panda climbing a tree", "", "waves crashing on rocks at sunset, 4k",
           " ".join(["long"] * 90)]

# text_encoder/config.json of ali-vilab/text-to-video-ms-1.7b (docs/architecture.md).
HUB_TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
    "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1024,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1, "projection_dim": 512,
    "torch_dtype": "float32", "vocab_size": 49408,
}


def hf_config(cfg: TextEncoderConfig) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width,
                          intermediate_size=cfg.mlp_width, num_attention_heads=cfg.heads,
                          num_hidden_layers=cfg.layers, max_position_embeddings=cfg.context_length,
                          hidden_act="gelu", layer_norm_eps=cfg.norm_eps)


def open_clip_model(cfg: TextEncoderConfig) -> CLIP:
    """A whole open_clip CLIP (tiny vision tower included) with one block more than we run,
    as ViT-H-14 has 24 blocks and the video model uses 23."""
    text = CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                       width=cfg.width, heads=cfg.heads, layers=cfg.layers + 1,
                       mlp_ratio=cfg.mlp_width / cfg.width)
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    return CLIP(embed_dim=cfg.width, vision_cfg=vision, text_cfg=text).eval()


@torch.no_grad()
def open_clip_penultimate(model: CLIP, ids: torch.Tensor) -> torch.Tensor:
    """ModelScope's FrozenOpenCLIPEmbedder(layer='penultimate'): every block but the last, then
    ln_final. (Its own code is sequence-first and breaks on open_clip >= 2.26, so the same
    steps are written here batch-first with open_clip's modules.)"""
    x = model.token_embedding(ids) + model.positional_embedding
    for block in model.transformer.resblocks[:-1]:
        x = block(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


@pytest.fixture(scope="module")
def ids():
    return Tokenizer()(PROMPTS)


@pytest.mark.parametrize("batch", [1, 3])
def test_matches_transformers_clip_text_model(ids, batch):
    reference = randomize_(CLIPTextModel(hf_config(TINY)), seed=1).eval()
    ours = TextEncoder(TINY).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)  # same names, no converter
    with torch.no_grad():
        expected = reference(ids[:batch]).last_hidden_state
        actual = ours(ids[:batch])
    assert actual.shape == (batch, 77, TINY.width)
    assert_parity(actual, expected, what="CLIPTextModel")


@pytest.mark.parametrize("batch", [1, 3])
def test_matches_open_clip_penultimate_layer(ids, batch):
    model = randomize_(open_clip_model(TINY), seed=2)
    ours = TextEncoder(TINY).eval()
    ours.load_state_dict(text_encoder_from_open_clip(model.state_dict(), TINY), strict=True)
    with torch.no_grad():
        actual = ours(ids[:batch])
    assert_parity(actual, open_clip_penultimate(model, ids[:batch]), what="open_clip")


def test_key_set_and_shapes_equal_clip_text_model_full_size():
    cfg = TextEncoderConfig()  # ViT-H-14 as used: 23 layers, width 1024
    with torch.device("meta"):
        reference = CLIPTextModel(hf_config(cfg))
        ours = TextEncoder(cfg)
    expected = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    assert sum(p.numel() for p in ours.parameters()) == 340_387_840  # docs/architecture.md


def test_open_clip_table_round_trip_is_bit_exact():
    model = randomize_(open_clip_model(TINY), seed=3)
    state = model.state_dict()
    ours = text_encoder_from_open_clip(state, TINY)
    back = text_encoder_to_open_clip(ours, TINY)
    kept = [k for k in state if k.startswith(("token_", "positional_", "ln_final"))
            or (k.startswith("transformer.resblocks.") and int(k.split(".")[2]) < TINY.layers)]
    assert sorted(back) == sorted(kept)
    for key in kept:
        assert torch.equal(back[key], state[key]), key


def test_open_clip_table_is_strict():
    state = randomize_(open_clip_model(TINY), seed=4).state_dict()
    incomplete = {k: v for k, v in state.items() if k != "transformer.resblocks.1.ln_2.bias"}
    with pytest.raises(ConversionError, match=r"missing keys: transformer\.resblocks\.1\.ln_2"):
        text_encoder_from_open_clip(incomplete, TINY)
    with pytest.raises(ConversionError, match="unexpected keys: something_else"):
        text_encoder_from_open_clip({**state, "something_else": torch.zeros(1)}, TINY)


def test_transformers_saved_prefix_is_stripped():
    reference = CLIPTextModel(hf_config(TINY))
    saved = {f"text_model.{k}": v for k, v in reference.state_dict().items()}
    saved["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    TextEncoder(TINY).load_state_dict(text_encoder_from_transformers(saved), strict=True)


def test_hub_config_translates_to_ms17b():
    assert text_encoder_config(HUB_TEXT_ENCODER_CONFIG) == load_config().model.text_encoder
    with pytest.raises(ConfigError, match="hidden_act='quick_gelu'"):
        text_encoder_config({**HUB_TEXT_ENCODER_CONFIG, "hidden_act": "quick_gelu"})
    with pytest.raises(ConfigError, match="missing key 'hidden_size'"):
        text_encoder_config({k: v for k, v in HUB_TEXT_ENCODER_CONFIG.items()
                             if k != "hidden_size"})


@pytest.mark.full
def test_full_size_matches_open_clip_vit_h_14(ids):
    """The real ViT-H-14 text tower (24 blocks, width 1024) with random weights."""
    cfg = TextEncoderConfig()
    text_cfg = CLIPTextCfg(**open_clip.get_model_config("ViT-H-14")["text_cfg"])
    assert text_cfg.layers == cfg.layers + 1 and text_cfg.width == cfg.width
    tower = open_clip.model._build_text_tower(1024, text_cfg).eval()
    randomize_(tower, seed=5)
    ours = TextEncoder(cfg).eval()
    ours.load_state_dict(text_encoder_from_open_clip(tower.state_dict(), cfg), strict=True)
    with torch.no_grad():
        actual = ours(ids)
    assert_parity(actual, open_clip_penultimate(tower, ids), what="open_clip ViT-H-14")
