"""Opt-in torch.compile path for inference: regional, static shapes, frozen weights.

    compile_unet(unet)          # the UNet's ResBlocks and temporal convolutions compile
    compile_unet(unet, False)   # back to eager (the compiled code is kept for re-enabling)

What is compiled and why (measured on this project's CPU, docs/performance.md):
- ResBlocks and temporal convolutions (GroupNorm -> SiLU -> convolution chains): inductor fuses
  the norms and activations and, with `freezing`, prepacks the convolution weights into
  oneDNN's blocked layout once instead of on every call: 20-25% faster on those blocks.
- Transformers stay eager: their time is in linear layers, and inductor's frozen linears were
  no faster than eager ones (slower with static shapes).
- Compiling the whole UNet at once did not finish in 11 minutes here; per-block graphs take
  a few seconds each.

Each block compiles on its first call for each input shape (about 50 graphs at full size).
Frozen weights are copies: about 3.3 GB more memory at full size. Inference only (no
gradients); the results equal the eager ones within float32 rounding (tests/test_compile.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from t2v.unet import ResBlock, TemporalConv

COMPILED_BLOCKS = (ResBlock, TemporalConv)
INDUCTOR_OPTIONS = {"freezing": True}


def compile_block(module: nn.Module, enabled: bool = True) -> None:
    """Route `module(...)` through its compiled version (made once, on first use) or back."""
    if enabled:
        if getattr(module, "_t2v_compiled", None) is None:
            module._t2v_compiled = torch.compile(module._call_impl, dynamic=False,
                                                 options=INDUCTOR_OPTIONS)
        module._compiled_call_impl = module._t2v_compiled  # what nn.Module.compile() sets
    else:
        module._compiled_call_impl = None


def compile_unet(unet: nn.Module, enabled: bool = True) -> nn.Module:
    """Compile (or un-compile) the UNet's ResBlocks and temporal convolutions in place; the
    module tree, parameter names and state_dict() are unchanged. Returns the UNet."""
    blocks = [m for m in unet.modules() if isinstance(m, COMPILED_BLOCKS)]
    # Every block instance is its own graph (its weights are frozen into it), all sharing one
    # forward code object; without this dynamo would fall back to eager after 8 of them.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               4 * len(blocks))
    for block in blocks:
        compile_block(block, enabled)
    return unet
