"""Small pieces of maths shared by the text encoder, the UNet and the VAE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              causal: bool = False) -> torch.Tensor:
    """Multi-head softmax attention, (N, L, heads*d) in and out, scale d**-0.5.

    Goes through `scaled_dot_product_attention`, so PyTorch picks the fused kernel it has.
    """
    q, k, v = (rearrange(x, "n l (h d) -> n h l d", h=heads) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return rearrange(out, "n h l d -> n l (h d)")
