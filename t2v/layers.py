"""Small pieces of maths shared by the text encoder, the UNet and the VAE."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

try:  # oneDNN's fused linear (what inductor emits on CPU); absent from builds without mkldnn
    _LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise
except (AttributeError, RuntimeError):
    _LINEAR_POINTWISE = None


# Switches for the benchmarks that check each optimisation still pays (t2v.bench.ablation):
# False sends linear layers through F.linear (MKL), GEGLU through one matmul and a chunk.
ONEDNN_LINEAR = True
FUSED_GEGLU = True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              causal: bool = False) -> torch.Tensor:
    """Multi-head softmax attention, (N, L, heads*d) in and out, scale d**-0.5.

    Goes through `scaled_dot_product_attention`, so PyTorch picks the fused kernel it has.
    """
    q, k, v = (rearrange(x, "n l (h d) -> n h l d", h=heads) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return rearrange(out, "n h l d -> n l (h d)")


def _use_onednn(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer(x)` may run as oneDNN's linear instead of `F.linear` (MKL's sgemm).

    On x86 CPUs PyTorch sends float32 `F.linear` to MKL, which on this project's AMD machines
    runs at half the rate of oneDNN (docs/performance.md). oneDNN has no backward here, so only
    when no gradient is needed; only a plain `nn.Linear` without hooks (a peft LoRA wrapper or
    a capture hook must see the call); never while torch.compile traces (inductor picks its
    own kernels). Switched off with `torch.backends.mkldnn.flags(enabled=False)`.
    """
    return (ONEDNN_LINEAR and _LINEAR_POINTWISE is not None and type(layer) is nn.Linear
            and x.device.type == "cpu" and x.dtype == torch.float32
            and layer.weight.dtype == torch.float32 and torch.backends.mkldnn.enabled
            and not (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad))
            and not layer._forward_hooks and not layer._forward_pre_hooks
            and not torch.compiler.is_compiling())


def linear(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None
           ) -> torch.Tensor:
    """`layer(x)`, plus `residual` if given (same shape), the add fused into the matmul when
    the oneDNN path applies."""
    if _use_onednn(layer, x):
        if residual is not None and residual.shape == x.shape[:-1] + layer.weight.shape[:1]:
            return _LINEAR_POINTWISE.binary(x, residual.contiguous(), layer.weight, layer.bias,
                                            "add")
        y = _LINEAR_POINTWISE(x, layer.weight, layer.bias, "none", [], "")
    else:
        y = layer(x)
    return y if residual is None else residual + y


def geglu(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GEGLU with `layer` projecting to 2*hidden: a * gelu(gate), a the first half (exact GELU).

    On the oneDNN path the two halves are two matmuls, the GELU and the product fused into
    their epilogues, so the (tokens, 2*hidden) intermediate is never written."""
    if FUSED_GEGLU and _use_onednn(layer, x):
        hidden = layer.weight.shape[0] // 2
        w, b = layer.weight, layer.bias
        gate = _LINEAR_POINTWISE(x, w[hidden:], None if b is None else b[hidden:], "gelu", [],
                                 "none")
        return _LINEAR_POINTWISE.binary(x, gate, w[:hidden], None if b is None else b[:hidden],
                                        "mul")
    a, gate = linear(layer, x).chunk(2, dim=-1)
    return a * F.gelu(gate)
