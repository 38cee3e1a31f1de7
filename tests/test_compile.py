"""The opt-in torch.compile path (t2v.compile): compiled blocks equal the eager ones."""

import pytest
import torch

from helpers import TINY, assert_parity, inputs, matched_unets, randomize_
from t2v.compile import COMPILED_BLOCKS, compile_block, compile_unet
from t2v.unet import ResBlock, TemporalConv, UNet3D


@pytest.mark.parametrize("make, args", [
    (lambda: ResBlock(32, 64, 128, 4, 1e-5), lambda g: (torch.randn(6, 32, 8, 8, generator=g),
                                                         torch.randn(6, 128, generator=g))),
    (lambda: TemporalConv(32, 4, 1e-5), lambda g: (torch.randn(6, 32, 8, 8, generator=g), 3)),
], ids=["resblock", "temporal_conv"])
def test_compiled_block_equals_eager(make, args):
    block = randomize_(make(), 0).eval()
    x, extra = args(torch.Generator().manual_seed(0))
    keys = list(block.state_dict())
    with torch.no_grad():
        eager = block(x, extra)
        compile_block(block)
        compiled = block(x, extra)
        compile_block(block, False)
        assert block._compiled_call_impl is None
        again = block(x, extra)
    assert_parity(compiled, eager, what="compiled block vs eager")
    assert torch.equal(again, eager)
    assert list(block.state_dict()) == keys  # no _orig_mod. prefixes


def test_compile_unet_selects_the_convolution_blocks():
    unet = UNet3D(TINY)
    compile_unet(unet)
    compiled = [m for m in unet.modules() if m._compiled_call_impl is not None]
    assert compiled and all(isinstance(m, COMPILED_BLOCKS) for m in compiled)
    assert len(compiled) == sum(isinstance(m, COMPILED_BLOCKS) for m in unet.modules())
    compile_unet(unet, False)
    assert all(m._compiled_call_impl is None for m in unet.modules())


@pytest.mark.full
def test_compiled_unet_matches_diffusers():
    """Every block compiled (~50 graphs: minutes on 2 cores), the tiny UNet vs diffusers."""
    ours, reference = matched_unets(seed=5)
    x, context = inputs(2, 3, (16, 16))
    with torch.no_grad():
        expected = reference(x, 500, context).sample
        compiled = compile_unet(ours)(x, 500, context)
    assert_parity(compiled, expected, what="compiled UNet vs diffusers")
