"""Inflating an image UNet into UNet3D, freezing by name, summaries and activation capture."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from helpers import assert_parity, randomize_
from t2v.config import UNetConfig
from t2v.training.surgery import capture, inflate, is_temporal, parameter_summary, set_trainable
from t2v.models.unet import UNet3D
from weights_convert import ConversionError

CFG = UNetConfig(channels=(32, 64, 64, 64), head_dim=8, context_dim=32, norm_groups=4)


def image_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    """A Stable-Diffusion-2.x-style image UNet (linear projections, 64-wide heads scaled)."""
    model = UNet2DConditionModel(
        block_out_channels=cfg.channels, layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D"
                               for a in cfg.attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D"
                             for a in reversed(cfg.attention)),
        attention_head_dim=tuple(c // cfg.head_dim for c in cfg.channels),  # = head counts
        cross_attention_dim=cfg.context_dim, use_linear_projection=True,
        norm_num_groups=cfg.norm_groups, flip_sin_to_cos=True, freq_shift=0)
    return randomize_(model, seed=1).eval()


def test_inflated_unet_equals_the_image_unet_on_every_frame():
    reference = image_unet(CFG)
    unet = inflate(reference.state_dict(), CFG)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 16, 16, generator=g)
    context = torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        video = unet(x, t, context)
        frames = x.permute(0, 2, 1, 3, 4).reshape(6, 4, 16, 16)
        per_frame = reference(frames, t.repeat_interleave(3), context.repeat_interleave(3, 0))
        expected = per_frame.sample.reshape(2, 3, 4, 16, 16).permute(0, 2, 1, 3, 4)
    assert_parity(video, expected, what="inflated UNet3D vs UNet2DConditionModel per frame")


def test_inflation_refuses_a_mismatched_image_unet():
    state = image_unet(CFG).state_dict()
    del state["conv_in.weight"]
    with pytest.raises(ConversionError, match="conv_in.weight"):
        inflate(state, CFG)


def test_freeze_by_pattern_and_summary():
    unet = UNet3D(CFG)
    names = set_trainable(unet, ["temporal"])
    assert names and all(is_temporal(n) for n in names)
    assert all(p.requires_grad == is_temporal(n) for n, p in unet.named_parameters())
    summary = parameter_summary(unet=unet)
    total = sum(p.numel() for p in unet.parameters())
    assert summary["temporal"]["total"] + summary["spatial"]["total"] == total
    assert summary["temporal"]["trainable"] == summary["temporal"]["total"]
    assert summary["spatial"]["trainable"] == 0
    set_trainable(unet, ["attention"])
    assert all(p.requires_grad == (".attn1." in n or ".attn2." in n)
               for n, p in unet.named_parameters())
    with pytest.raises(ValueError, match="no parameter matches"):
        set_trainable(unet, ["nothing_like_this"])


def test_capture_uses_state_dict_names():
    unet = UNet3D(CFG).eval()
    x, context = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 7, 32)
    with torch.no_grad(), capture(unet, ["up_blocks.2.temp_attentions.1", "conv_in"]) as acts:
        unet(x, 5, context)
    assert acts["conv_in"].shape == (2, 32, 8, 8)
    assert acts["up_blocks.2.temp_attentions.1"].shape[0] == 2
    with pytest.raises(KeyError, match="no submodule"):
        with capture(unet, ["up_blocks.9"]):
            pass


def test_capture_joins_frame_chunks_and_keeps_the_last_call():
    """With frame chunks a per-frame layer runs once per chunk; capture used to keep only the
    last chunk (2 of 5 frames here)."""
    unet = UNet3D(CFG).eval()
    names = ["down_blocks.0.resnets.0", "up_blocks.2.attentions.0"]
    x, context = torch.randn(2, 4, 5, 8, 8), torch.randn(2, 7, 32)
    with torch.no_grad(), capture(unet, names) as whole:
        unet(x, 5, context)
    with torch.no_grad(), capture(unet, names) as chunked:
        unet(torch.randn_like(x), 7, context, 2)  # an earlier call: replaced by the next one
        unet(x, 5, context, 2)
    for name in names:
        assert chunked[name].shape == whole[name].shape == (10,) + whole[name].shape[1:]
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-5, atol=1e-5)


def test_inflates_from_a_diffusers_folder(tmp_path):
    reference = image_unet(CFG)
    reference.save_pretrained(tmp_path / "unet")
    from_folder = inflate(tmp_path / "unet", CFG)
    from_state = inflate(reference.state_dict(), CFG)
    folder_state, state = from_folder.state_dict(), from_state.state_dict()
    spatial = [k for k in state if not is_temporal(k)]
    assert spatial and all(torch.equal(folder_state[k], state[k]) for k in spatial)
