"""The OpenCLIP ViT-H-14 text tower, as the video model uses it.

    ids (B, 77) -> token + learned position embedding -> `layers` pre-LN blocks with causal
    self-attention and an exact-GELU MLP -> final LayerNorm -> (B, 77, width)

ModelScope asks open_clip for the "penultimate" layer: it runs 23 of the 24 blocks and then
applies `ln_final`; diffusers ships the same thing as a 23-layer `CLIPTextModel` whose
`last_hidden_state` is identical. So `cfg.layers` = 23 and the 24th block is not built.
Parameter names follow transformers' `CLIPTextModel` (without the `text_model.` prefix);
`weights_convert.open_clip` translates open_clip's names.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from t2v.config import TextEncoderConfig
from t2v.models.layers import attention


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections (all with bias)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, not QuickGELU


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = SelfAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, width: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(context_length, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class Encoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_width, cfg.norm_eps) for _ in range(cfg.layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TextEncoder(nn.Module):
    """Token ids (B, L) -> per-token text embedding (B, L, width) for cross-attention."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg.vocab_size, cfg.context_length, cfg.width)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.cfg.context_length:
            raise ValueError(f"input_ids must be (batch, <= {self.cfg.context_length}), "
                             f"got {tuple(input_ids.shape)}")
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))
