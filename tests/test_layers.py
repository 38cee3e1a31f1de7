"""The oneDNN linear path (t2v.layers): same numbers as F.linear, taken only where it may be."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import TINY, assert_parity, inputs, matched_unets, randomize_
from t2v import layers
from t2v.layers import geglu, linear
from t2v.lora import add_lora
from t2v.unet import UNet3D

needs_onednn = pytest.mark.skipif(layers._LINEAR_POINTWISE is None or
                                  not torch.backends.mkldnn.is_available(),
                                  reason="this torch build has no oneDNN")


def make_linear(k=48, n=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear(bias):
    layer = make_linear(bias=bias)
    x = torch.randn(3, 17, 48)
    residual = torch.randn(3, 17, 40)
    with torch.no_grad():
        assert layers._use_onednn(layer, x)
        assert_parity(linear(layer, x), F.linear(x, layer.weight, layer.bias))
        assert_parity(linear(layer, x, residual), residual + F.linear(x, layer.weight,
                                                                      layer.bias))
        # a transposed (non-contiguous) input, as after a rearrange
        xt = torch.randn(3, 48, 17).transpose(1, 2)
        assert_parity(linear(layer, xt), F.linear(xt, layer.weight, layer.bias))


@needs_onednn
def test_geglu_matches_reference_formula():
    layer = make_linear(n=64)
    x = torch.randn(2, 9, 48)
    with torch.no_grad():
        a, gate = F.linear(x, layer.weight, layer.bias).chunk(2, dim=-1)
        assert_parity(geglu(layer, x), a * F.gelu(gate))


def test_fast_path_only_where_it_may_be_taken():
    layer = make_linear()
    x = torch.randn(2, 48)
    assert not layers._use_onednn(layer, x)  # grad enabled and the weight requires it
    with torch.no_grad():
        assert layers._use_onednn(layer, x) == (layers._LINEAR_POINTWISE is not None)
        assert not layers._use_onednn(layer, x.double())
        with torch.backends.mkldnn.flags(enabled=False):
            assert not layers._use_onednn(layer, x)
        handle = layer.register_forward_hook(lambda *a: None)  # surgery.capture's hooks
        assert not layers._use_onednn(layer, x)
        handle.remove()
        wrapped = nn.Sequential(make_linear())
        add_lora(wrapped, rank=2, names=["0"])  # peft replaces the Linear with its LoRA wrapper
        assert not layers._use_onednn(wrapped[0], x)


def test_lora_branch_is_not_bypassed():
    """An unmerged peft LoRA on a projection changes the output (the fast path must call it)."""
    torch.manual_seed(0)
    unet = UNet3D(TINY).eval()
    randomize_(unet, 0)
    x, context = inputs(1, 2, (8, 8))
    with torch.no_grad():
        before = unet(x, 10, context)
        names = [n for n, m in unet.named_modules() if n.endswith("attn1.to_q")]
        add_lora(unet, rank=2, names=names)
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.5)
        after = unet(x, 10, context)
    assert (after - before).abs().max() > 1e-3


def test_unet_channels_last_and_nchw_layouts_match_diffusers():
    ours, reference = matched_unets(seed=4)
    x, context = inputs(2, 3, (12, 20))
    with torch.no_grad():
        expected = reference(x, 500, context).sample
        for channels_last in (True, False):
            ours.channels_last = channels_last
            out = ours(x, 500, context)
            assert out.is_contiguous()
            assert_parity(out, expected, what=f"channels_last={channels_last}")


@needs_onednn
def test_unet_same_with_and_without_onednn():
    ours, reference = matched_unets(seed=3)
    x, context = inputs(2, 3, (16, 16))
    with torch.no_grad():
        fast = ours(x, 500, context)
        with torch.backends.mkldnn.flags(enabled=False):
            plain = ours(x, 500, context)
        expected = reference(x, 500, context).sample
    assert_parity(fast, expected)
    assert_parity(plain, expected)
