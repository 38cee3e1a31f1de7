"""UNet3D parity: diffusers UNet3DConditionModel and the original ModelScope UNetSD."""

import dataclasses
import time

import pytest
import torch
from diffusers import UNet3DConditionModel

from helpers import (PARITY_TOL, TINY, assert_parity, assert_round_trip, diffusers_unet, inputs,
                     matched_unets, max_rel_diff, randomize_)
from reference import modelscope_module
from t2v.config import UNetConfig
from t2v.pipeline.options import load_config
from t2v.errors import ConfigError
from t2v.models.unet import UNet3D, guidance_scale_embedding
from weights_convert import ConversionError
from weights_convert.diffusers import diffusers_unet_kwargs, unet_config
from weights_convert.modelscope import unet_from_modelscope, unet_to_modelscope

# Same topology as ms-1.7b (4 levels, attention on the first 3, 2 layers per block, 8-head
# transformer_in), tiny widths.
# ModelScope hard-codes GroupNorm(32, .) and a 1024-wide context in its decoder.
TINY_MS = UNetConfig(channels=(32, 64, 64, 64), head_dim=16, context_dim=1024, norm_groups=32)
GRAD_TOL = 1e-5  # gradients: max |diff| relative to max |reference gradient|

# unet/config.json of ali-vilab/text-to-video-ms-1.7b (main), and the keys its first upload
# also carried (docs/architecture.md).
HUB_UNET_CONFIG = {
    "_class_name": "UNet3DConditionModel", "_diffusers_version": "0.15.0.dev0",
    "act_fn": "silu", "attention_head_dim": 64, "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock3D", "CrossAttnDownBlock3D",
                         "CrossAttnDownBlock3D", "DownBlock3D"],
    "downsample_padding": 1, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "sample_size": 32,
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D",
                       "CrossAttnUpBlock3D"],
}
FIRST_UPLOAD_EXTRA = {
    "flip_sin_to_cos": True, "freq_shift": 0, "use_linear_projection": True,
    "upcast_attention": False, "mid_block_type": "UNetMidBlock3DCrossAttn",
    "time_embedding_type": "positional", "class_embed_type": None,
}




def modelscope_unet(cfg: UNetConfig, seed: int = 0):
    mult = [c // cfg.channels[0] for c in cfg.channels]
    scales = [1 / 2 ** i for i, a in enumerate(cfg.attention) if a]
    model = modelscope_module("unet_sd").UNetSD(
        in_dim=cfg.in_channels, dim=cfg.channels[0], y_dim=cfg.context_dim,
        context_dim=cfg.context_dim, out_dim=cfg.out_channels, dim_mult=mult,
        num_heads=cfg.transformer_in_heads, head_dim=cfg.head_dim,
        num_res_blocks=cfg.layers_per_block, attn_scales=scales, dropout=0.1,
        temporal_attention=True)
    return randomize_(model, seed).eval()




@pytest.fixture(scope="module")
def pair():
    return matched_unets()




@pytest.mark.parametrize("frames", [1, 3, 5])
@pytest.mark.parametrize("size", [(16, 16), (12, 20)])  # 12x20: not a multiple of 8
@pytest.mark.parametrize("timestep", [500, torch.tensor(37), torch.tensor([10, 990])],
                         ids=["int", "0-d", "per-sample"])
def test_matches_diffusers(pair, frames, size, timestep):
    ours, reference = pair
    x, context = inputs(2, frames, size)
    with torch.no_grad():
        expected = reference(x, timestep, context).sample
        actual = ours(x, timestep, context)
    assert actual.shape == x.shape
    assert_parity(actual, expected, what=f"UNet3D vs diffusers F={frames} {size}")


@pytest.mark.parametrize("cfg", [
    UNetConfig(channels=(32, 64, 96), attention=(False, True, True), layers_per_block=1,
               head_dim=16, context_dim=24, norm_groups=8),
    UNetConfig(channels=(64, 128), attention=(True, False), layers_per_block=3, head_dim=32,
               context_dim=16, norm_groups=16, in_channels=3, out_channels=5),
], ids=["3-levels", "2-levels"])
def test_other_topologies_match_diffusers(cfg):
    reference = diffusers_unet(cfg, seed=5)
    ours = UNet3D(cfg).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg.in_channels, 2, 10, 6, generator=g)
    context = torch.randn(2, 5, cfg.context_dim, generator=g)
    with torch.no_grad():
        expected = reference(x, torch.tensor([1, 999]), context).sample
        actual = ours(x, torch.tensor([1, 999]), context)
    assert actual.shape == (2, cfg.out_channels, 2, 10, 6)
    assert_parity(actual, expected, what=f"UNet3D {cfg.channels} vs diffusers")


def test_every_input_matters(pair):
    """Guards the parity tests against a degenerate network: frames, text and time all move
    the output."""
    ours, _ = pair
    x, context = inputs(1, 3, (16, 16))
    with torch.no_grad():
        base = ours(x, 10, context)
        other_frame = x.clone()
        other_frame[:, :, 2] += 1.0
        assert (ours(other_frame, 10, context)[:, :, 0] - base[:, :, 0]).abs().max() > 1e-3
        assert (ours(x, 10, context + 1.0) - base).abs().max() > 1e-3
        assert (ours(x, 900, context) - base).abs().max() > 1e-3


def test_matches_modelscope_unetsd():
    reference = modelscope_unet(TINY_MS)
    ours = UNet3D(TINY_MS).eval()
    ours.load_state_dict(unet_from_modelscope(reference.state_dict(), TINY_MS), strict=True)
    x, context = inputs(2, 3, (16, 16), context_len=77, context_dim=1024)
    t = torch.tensor([10, 990])
    with torch.no_grad():
        expected = reference(x, t, context)
        actual = ours(x, t, context)
    assert_parity(actual, expected, what="UNet3D vs ModelScope UNetSD")


def test_modelscope_table_round_trip_is_bit_exact():
    assert_round_trip(modelscope_unet(TINY_MS, seed=3).state_dict(),
                      lambda s: unet_from_modelscope(s, TINY_MS),
                      lambda s: unet_to_modelscope(s, TINY_MS))


def test_modelscope_table_is_strict():
    state = modelscope_unet(TINY_MS).state_dict()
    del state["input_blocks.1.0.temopral_conv.conv4.3.bias"]
    state["output_blocks.0.9.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError) as err:
        unet_from_modelscope(state, TINY_MS)
    assert "input_blocks.1.0.temopral_conv.conv4.3.bias" in str(err.value)
    assert "output_blocks.0.9.weight" in str(err.value)


def test_modelscope_export_refuses_frame_positions():
    cfg = dataclasses.replace(TINY_MS, temporal_position_embedding=True)
    with pytest.raises(ConversionError, match="temporal_position_embedding"):
        unet_to_modelscope(UNet3D(cfg).state_dict(), cfg)


def gradients(model, x, context, t):
    """Gradients of a fixed linear functional of the output w.r.t. inputs and parameters."""
    model.zero_grad()
    x, context = x.clone().requires_grad_(), context.clone().requires_grad_()
    out = model(x, t, context)
    out = out.sample if hasattr(out, "sample") else out
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return {"x": x.grad, "context": context.grad,
            **{name: p.grad.clone() for name, p in model.named_parameters()}}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_match_diffusers(pair, checkpointing):
    ours, reference = pair
    x, context = inputs(2, 3, (12, 12), seed=1)
    t = torch.tensor([3, 700])
    expected = gradients(reference, x, context, t)
    ours.gradient_checkpointing = checkpointing
    try:
        actual = gradients(ours, x, context, t)
    finally:
        ours.gradient_checkpointing = False
    assert expected.keys() == actual.keys()
    worst = max(max_rel_diff(actual[k], expected[k]) for k in expected)
    print(f"[parity] UNet3D gradients (checkpointing={checkpointing}): {worst:.2e}")
    assert worst <= GRAD_TOL


def test_checkpointing_leaves_outputs_and_gradients_unchanged():
    model = randomize_(UNet3D(TINY), seed=4).eval()
    x, context = inputs(1, 2, (8, 8), seed=2)
    results = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        out = model(x, 250, context)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_builds_on_meta_device_at_full_size():
    with torch.device("meta"):
        model = UNet3D(UNetConfig())
    assert all(p.is_meta for p in model.parameters())


def test_key_set_and_shapes_equal_diffusers_full_size():
    with torch.device("meta"):
        ours = UNet3D(UNetConfig())
        reference = UNet3DConditionModel(**diffusers_unet_kwargs(UNetConfig()))
    expected = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    assert len(expected) == 1480


def test_hub_config_translates_to_ms17b():
    ms17b = load_config().model.unet
    assert unet_config(HUB_UNET_CONFIG) == ms17b
    assert unet_config({**HUB_UNET_CONFIG, **FIRST_UPLOAD_EXTRA}) == ms17b
    assert unet_config(diffusers_unet_kwargs(TINY)) == TINY


def test_frame_position_embedding_matches_diffusers_sinusoidal_blocks():
    """temporal_position_embedding=True is diffusers' BasicTransformerBlock with
    positional_embeddings="sinusoidal" in every temporal transformer (transformer_in and the
    temp_attentions); the reference UNet gets those blocks' pos_embed set by hand."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    cfg = dataclasses.replace(TINY, temporal_position_embedding=True)
    reference = diffusers_unet(dataclasses.replace(cfg, temporal_position_embedding=False))
    temporal = [m for m in reference.modules() if isinstance(m, TransformerTemporalModel)]
    assert len(temporal) == 1 + 2 * 3 + 1 + 3 * 3  # transformer_in, down, mid, up levels
    for block in (b for m in temporal for b in m.modules()
                  if isinstance(b, BasicTransformerBlock)):
        block.pos_embed = SinusoidalPositionalEmbedding(block.norm1.normalized_shape[0], 32)
    ours = UNet3D(cfg).eval()
    ours.load_state_dict({k: v for k, v in reference.state_dict().items()
                          if not k.endswith("pos_embed.pe")}, strict=True)
    plain = UNet3D(TINY).eval()
    plain.load_state_dict(ours.state_dict())
    x, context = inputs(2, 6, (8, 8))
    with torch.no_grad():
        expected = reference(x, torch.tensor([3, 900]), context).sample
        actual = ours(x, torch.tensor([3, 900]), context)
        without = plain(x, torch.tensor([3, 900]), context)
    assert_parity(actual, expected, what="UNet3D with frame positions vs diffusers")
    assert max_rel_diff(without, expected) > 100 * PARITY_TOL  # the embedding matters
    with pytest.raises(ConfigError, match="temporal_position_embedding"):
        diffusers_unet_kwargs(cfg)


GUIDED = dataclasses.replace(TINY, time_cond_proj_dim=24)


def test_guidance_scale_embedding_matches_diffusers():
    """LCM's embedding of w: diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding."""
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 1.0, 4.5, 7.5])
    for dim in (256, 24, 7):
        expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, dim)
        assert torch.equal(guidance_scale_embedding(w, dim), expected)


@pytest.mark.parametrize("frames", [1, 3])
def test_guidance_embedding_matches_diffusers_time_cond_proj_dim(frames):
    """time_cond_proj_dim: UNet3DConditionModel(time_cond_proj_dim=...) with timestep_cond,
    every parameter random (cond_proj included): same output; the embedding moves it."""
    reference = diffusers_unet(GUIDED, seed=11)
    assert reference.time_embedding.cond_proj is not None
    ours = UNet3D(GUIDED).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x, context = inputs(2, frames, (12, 20))
    cond = guidance_scale_embedding(torch.tensor([3.0, 6.5]), 24)
    t = torch.tensor([259, 999])
    with torch.no_grad():
        expected = reference(x, t, context, timestep_cond=cond).sample
        actual = ours(x, t, context, timestep_cond=cond)
        other = ours(x, t, context, timestep_cond=guidance_scale_embedding(
            torch.tensor([1.0, 1.0]), 24))
    assert_parity(actual, expected, what="UNet3D time_cond_proj_dim vs diffusers")
    assert max_rel_diff(other, expected) > 100 * PARITY_TOL
    assert unet_config({**HUB_UNET_CONFIG, "time_cond_proj_dim": 24}).time_cond_proj_dim == 24
    assert diffusers_unet_kwargs(GUIDED)["time_cond_proj_dim"] == 24
    with pytest.raises(ValueError, match="timestep_cond"):
        ours(x, t, context, timestep_cond=cond[:, :10])
    with pytest.raises(ValueError, match="timestep_cond"):
        UNet3D(TINY)(x, t, context, timestep_cond=cond)
    with pytest.raises(ConversionError, match="time_cond_proj_dim"):
        unet_to_modelscope(ours.state_dict(), GUIDED)


@pytest.mark.parametrize("change, needle", [
    ({"act_fn": "gelu"}, "act_fn"),
    ({"num_attention_heads": 8}, "num_attention_heads"),
    ({"down_block_types": ["DownBlockSpatioTemporal"] * 4}, "down_block_types"),
    ({"attention_head_dim": [8, 16, 32, 64]}, "attention_head_dim"),
    ({"up_block_types": ["CrossAttnUpBlock3D"] * 4}, "mirror"),
    ({"_class_name": "UNet2DConditionModel"}, "_class_name"),
])
def test_unsupported_hub_configs_are_refused(change, needle):
    with pytest.raises(ConfigError, match=needle):
        unet_config({**HUB_UNET_CONFIG, **change})


@pytest.mark.full
def test_full_size_parameter_count_and_forward_match_diffusers():
    cfg = load_config().model.unet
    reference = diffusers_unet(cfg, seed=7)
    ours = UNet3D(cfg).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert sum(p.numel() for p in ours.parameters()) == 1_411_233_860
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 8, 8, generator=g)
    context = torch.randn(1, 77, 1024, generator=g)
    with torch.no_grad():
        start = time.perf_counter()
        expected = reference(x, 500, context).sample
        t_ref = time.perf_counter() - start
        start = time.perf_counter()
        actual = ours(x, 500, context)
        t_ours = time.perf_counter() - start
    print(f"[time] full-size UNet forward F=2 8x8: diffusers {t_ref:.2f}s, t2v {t_ours:.2f}s")
    assert_parity(actual, expected, what="full-size UNet3D vs diffusers")


@pytest.mark.full
def test_full_size_matches_modelscope_unetsd():
    cfg = load_config().model.unet
    reference = modelscope_unet(cfg, seed=8)
    ours = UNet3D(cfg).eval()
    ours.load_state_dict(unet_from_modelscope(reference.state_dict(), cfg), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 2, 8, 8, generator=g)
    context = torch.randn(1, 77, 1024, generator=g)
    with torch.no_grad():
        expected = reference(x, torch.tensor([500]), context)
        actual = ours(x, torch.tensor([500]), context)
    assert_parity(actual, expected, what="full-size UNet3D vs ModelScope UNetSD")
