"""UNet3D: the ModelScope text-to-video denoiser (diffusers' UNet3DConditionModel, same keys).

    x (B, 4, F, h, w), t, context (B, L, 1024) -> eps (B, 4, F, h, w)

An SD-2.1-style image UNet whose 2-D layers see the frames folded into the batch,
`(b c f h w) -> ((b f) c h w)` (batch-major), plus two kinds of temporal layers that unfold
them again: after every ResBlock a temporal convolution (kernel (3, 1, 1)), and after every
spatial transformer a temporal transformer (self-attention over frames, no positional
encoding unless `temporal_position_embedding` is set). One more temporal transformer
(`transformer_in`) follows `conv_in`.

Every level: [ResBlock -> TemporalConv -> (SpatialTransformer -> TemporalTransformer)] x n,
then a stride-2 downsample (up path: n + 1 layers, then nearest x2 upsample + conv).
Architecture reference: docs/architecture.md; diffusers `unet_3d_condition.py`, ModelScope
`unet_sd.py`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from t2v.config import UNetConfig
from t2v.models.layers import attention

TRANSFORMER_NORM_EPS = 1e-6  # GroupNorm at the entry of spatial and temporal transformers
LAYER_NORM_EPS = 1e-5  # LayerNorms inside transformer blocks
TEMPORAL_CONV_DROPOUT = 0.1  # as both references build it; inactive in eval mode


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / (dim/2)).

    Cosines first (diffusers' flip_sin_to_cos=True, downscale_freq_shift=0), computed in float32
    through exp(-ln(max_period) i / half) exactly as diffusers does; ModelScope's torch.pow
    form differs by <= 6e-5 over t in [0, 999].
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    angles = t[:, None].float() * torch.exp(exponent / half)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def in_frame_chunks(layer, x: torch.Tensor, rows: torch.Tensor, context: torch.Tensor,
                    num_frames: int, chunk: int | None) -> torch.Tensor:
    """Run a per-frame layer `layer(x, rows, context)` on at most `chunk` frames of one sample
    at a time (x, rows: (B*F, ...) batch-major; context: (B, ...)), writing the chunks into one
    output. Per-frame layers do not mix frames, so only the peak memory changes."""
    if chunk is None or chunk >= num_frames:
        return layer(x, rows, context)
    out = None
    for start in range(0, x.shape[0], num_frames):  # sample by sample
        for s in range(start, start + num_frames, chunk):
            part = slice(s, min(s + chunk, start + num_frames))
            y = layer(x[part], rows[part], context[start // num_frames][None])
            if out is None:
                out = torch.empty((x.shape[0],) + y.shape[1:], dtype=y.dtype, device=y.device)
            out[part] = y
    return out


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal embedding; with `cond_dim`, a bias-free
    projection of a condition (the guidance-scale embedding) added to that embedding first."""

    def __init__(self, in_dim: int, dim: int, cond_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            x = x + self.cond_proj(cond)
        return self.linear_2(F.silu(self.linear_1(x)))


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) guidance weights -> (B, dim) [sin(1000 w f_i), cos(1000 w f_i)], f_i =
    10000^(-i / (dim/2 - 1)): LCM's embedding of w (VDM's, diffusers'
    get_guidance_scale_embedding; sines first, unlike the timestep's). An odd dim is padded with
    one zero."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device)
                            * -(math.log(10000.0) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * frequencies[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """GN-SiLU-conv, + time embedding, GN-SiLU-conv, + (1x1-projected) input."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class TemporalConv(nn.Module):
    """Four GN-SiLU-Conv3d(3,1,1) stages over the frame axis, one residual around them.

    Sequential slots mirror the references' keys: conv1.{0: GN, 2: conv},
    conv{2,3,4}.{0: GN, 2: Dropout, 3: conv}. GroupNorm statistics pool over F, H and W.
    """

    def __init__(self, ch: int, groups: int, eps: float):
        super().__init__()

        def stage(dropout: bool) -> nn.Sequential:
            layers = [nn.GroupNorm(groups, ch, eps=eps), nn.SiLU()]
            layers += [nn.Dropout(TEMPORAL_CONV_DROPOUT)] if dropout else []
            return nn.Sequential(*layers, nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0)))

        self.conv1 = stage(dropout=False)
        self.conv2 = stage(dropout=True)
        self.conv3 = stage(dropout=True)
        self.conv4 = stage(dropout=True)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        h = rearrange(x, "(b f) c h w -> b c f h w", f=num_frames)
        h = self.conv4(self.conv3(self.conv2(self.conv1(h))))
        # The residual added in x's (b f) layout: a new tensor, not a view of one (a block
        # returning a view makes FSDP2 warn that backward may be wrong).
        return x + rearrange(h, "b c f h w -> (b f) c h w")


class Attention(nn.Module):
    """Multi-head attention, q/k/v without bias; self-attention when no context is given."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # diffusers' key: to_out.0

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            context = x
        elif context.shape[0] != x.shape[0]:
            # x holds the F frames of each of the B contexts: (B*F, N, C) against (B, L, D).
            # Queries of all frames attend to the same keys, so fold the frames into the query
            # axis instead of repeating the context F times: K/V are projected once per sample.
            frames = x.shape[0] // context.shape[0]
            q = rearrange(self.to_q(x), "(b f) n c -> b (f n) c", f=frames)
            out = attention(q, self.to_k(context), self.to_v(context), self.heads)
            return self.to_out[0](rearrange(out, "b (f n) c -> (b f) n c", f=frames))
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Linear to 2*hidden, then a * gelu(gate) with a the first half (exact GELU)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Slot 1 is the references' Dropout(0.0); kept so the Linear is `net.2` as in their keys.
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(),
                                  nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[1](self.net[0](x)))


class TransformerBlock(nn.Module):
    """Pre-LN: self-attention, second attention (to `context`, or self when context_dim is
    None), GEGLU feed-forward; each with a residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                position: torch.Tensor | None = None) -> torch.Tensor:
        """`position` (L, dim): added to the normed input of both attentions (diffusers'
        BasicTransformerBlock with positional_embeddings="sinusoidal")."""
        if position is None:
            x = x + self.attn1(self.norm1(x))
            x = x + self.attn2(self.norm2(x), context)
        else:
            x = x + self.attn1(self.norm1(x) + position)
            x = x + self.attn2(self.norm2(x) + position, context)
        return x + self.ff(self.norm3(x))


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """(length, dim) float32: sin at even, cos at odd channels, as diffusers'
    SinusoidalPositionalEmbedding computes its table (one row per position)."""
    position = torch.arange(length).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    return table


class SpatialTransformer(nn.Module):
    """Per frame: tokens are the h*w positions; cross-attention to the text context."""

    def __init__(self, ch: int, heads: int, head_dim: int, context_dim: int, groups: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, ch, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Linear(ch, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim,
                                                                  context_dim)])
        self.proj_out = nn.Linear(inner, ch)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = rearrange(self.norm(x), "n c h w -> n (h w) c")
        y = self.proj_out(self.transformer_blocks[0](self.proj_in(y), context))
        return x + rearrange(y, "n (h w) c -> n c h w", h=h, w=w)


class TemporalTransformer(nn.Module):
    """Per spatial position: tokens are the F frames; both attentions are self-attention.

    GroupNorm statistics pool over F, H and W (frames interact in the norm). With
    `frame_positions`, frame i's tokens get sinusoidal_positions row i in both attentions.
    """

    def __init__(self, ch: int, heads: int, head_dim: int, groups: int,
                 frame_positions: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.frame_positions = frame_positions
        self.norm = nn.GroupNorm(groups, ch, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Linear(ch, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim, None)])
        self.proj_out = nn.Linear(inner, ch)

    def forward(self, x: torch.Tensor, num_frames: int, chunk: int | None = None
                ) -> torch.Tensor:
        """`chunk` (frames): bound the transformer's working set to about chunk x h x w tokens
        by running it on groups of spatial positions (each position's sequence is
        independent; the GroupNorm still pools over all frames first)."""
        h, w = x.shape[-2:]
        y = self.norm(rearrange(x, "(b f) c h w -> b c f h w", f=num_frames))
        y = rearrange(y, "b c f h w -> (b h w) f c")
        step = len(y) if chunk is None else max(1, chunk * h * w // num_frames)
        block = self.transformer_blocks[0]
        position = None
        if self.frame_positions:
            position = sinusoidal_positions(num_frames, block.norm1.normalized_shape[0]).to(
                y.device, y.dtype)
        parts = [self.proj_out(block(self.proj_in(y[i:i + step]), position=position))
                 for i in range(0, len(y), step)]
        y = torch.cat(parts) if len(parts) > 1 else parts[0]
        return x + rearrange(y, "(b h w) f c -> (b f) c h w", h=h, w=w)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour to `size` (twice the input unless the skip says otherwise), conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Level(nn.Module):
    """The layers of one resolution level, as parallel lists (diffusers' key layout):
    resnets[i] -> temp_convs[i] -> attentions[i] -> temp_attentions[i]."""

    def __init__(self, in_channels: list[int], out_ch: int, has_attention: bool,
                 cfg: UNetConfig):
        super().__init__()
        groups, eps, emb = cfg.norm_groups, cfg.norm_eps, cfg.time_embed_dim
        heads = out_ch // cfg.head_dim
        self.resnets = nn.ModuleList(ResBlock(c, out_ch, emb, groups, eps) for c in in_channels)
        self.temp_convs = nn.ModuleList(TemporalConv(out_ch, groups, eps) for _ in in_channels)
        self.has_attention = has_attention
        if has_attention:
            self.attentions = nn.ModuleList(
                SpatialTransformer(out_ch, heads, cfg.head_dim, cfg.context_dim, groups)
                for _ in in_channels)
            self.temp_attentions = nn.ModuleList(
                TemporalTransformer(out_ch, heads, cfg.head_dim, groups,
                                    cfg.temporal_position_embedding) for _ in in_channels)

    def layer(self, i: int, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
              num_frames: int, chunk: int | None = None) -> torch.Tensor:
        resnet, spatial = self.resnets[i], self.attentions[i] if self.has_attention else None
        x = in_frame_chunks(lambda x, e, c: resnet(x, e), x, emb, context, num_frames, chunk)
        x = self.temp_convs[i](x, num_frames)
        if self.has_attention:
            x = in_frame_chunks(lambda x, e, c: spatial(x, c), x, emb, context, num_frames,
                                chunk)
            x = self.temp_attentions[i](x, num_frames, chunk)
        return x


class DownBlock(Level):
    def __init__(self, in_ch: int, out_ch: int, has_attention: bool, downsample: bool,
                 cfg: UNetConfig):
        in_channels = [in_ch] + [out_ch] * (cfg.layers_per_block - 1)
        super().__init__(in_channels, out_ch, has_attention, cfg)
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, x, emb, context, num_frames, chunk=None):
        skips = []
        for i in range(len(self.resnets)):
            x = self.layer(i, x, emb, context, num_frames, chunk)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(Level):
    """Each layer first concatenates [x, skip] on channels, taking skips from the end."""

    def __init__(self, prev_ch: int, out_ch: int, skip_channels: list[int], has_attention: bool,
                 upsample: bool, cfg: UNetConfig):
        in_channels = [(prev_ch if i == 0 else out_ch) + s for i, s in enumerate(skip_channels)]
        super().__init__(in_channels, out_ch, has_attention, cfg)
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x, skips, emb, context, num_frames, upsample_size=None, chunk=None):
        """Layer i takes skips[n - 1 - i] (n layers; `skips` in push order), then the upsampler
        (to `upsample_size`, default twice the size)."""
        n = len(self.resnets)
        for i in range(n):
            x = self.layer_on(i, x, skips[n - 1 - i], emb, context, num_frames, chunk)
        return self.upsample(x, upsample_size)

    def layer_on(self, i: int, x: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor,
                 context: torch.Tensor, num_frames: int, chunk: int | None = None
                 ) -> torch.Tensor:
        """Layer i on [x, skip] concatenated on channels (one step of `forward`)."""
        return self.layer(i, torch.cat([x, skip], dim=1), emb, context, num_frames, chunk)

    def upsample(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The block's upsampler (to `size`, default twice the size); x itself if it has none."""
        if self.upsamplers is None:
            return x
        return self.upsamplers[0](x, size if size is not None else (2 * x.shape[-2],
                                                                    2 * x.shape[-1]))


class MidBlock(nn.Module):
    """ResBlock -> TemporalConv -> SpatialTransformer -> TemporalTransformer -> ResBlock ->
    TemporalConv."""

    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        groups, eps, emb = cfg.norm_groups, cfg.norm_eps, cfg.time_embed_dim
        heads = ch // cfg.head_dim
        self.resnets = nn.ModuleList(ResBlock(ch, ch, emb, groups, eps) for _ in range(2))
        self.temp_convs = nn.ModuleList(TemporalConv(ch, groups, eps) for _ in range(2))
        self.attentions = nn.ModuleList(
            [SpatialTransformer(ch, heads, cfg.head_dim, cfg.context_dim, groups)])
        self.temp_attentions = nn.ModuleList([TemporalTransformer(
            ch, heads, cfg.head_dim, groups, cfg.temporal_position_embedding)])

    def forward(self, x, emb, context, num_frames, chunk=None):
        def resnet(i, x):
            return in_frame_chunks(lambda x, e, c: self.resnets[i](x, e), x, emb, context,
                                   num_frames, chunk)
        x = self.temp_convs[0](resnet(0, x), num_frames)
        x = in_frame_chunks(lambda x, e, c: self.attentions[0](x, c), x, emb, context,
                            num_frames, chunk)
        x = self.temp_attentions[0](x, num_frames, chunk)
        return self.temp_convs[1](resnet(1, x), num_frames)


class UNet3D(nn.Module):
    """eps = UNet3D(cfg)(x (B, C, F, h, w), t, context (B, L, context_dim)).

    `forward` is the reference architecture and nothing else. Inference tools that change
    what runs between the blocks (t2v.sampling: FreeU, DeepCache) compose the same public
    pieces `forward` is made of: `prepare`, `down_path`, `split_skips`, `run_block`, the up
    blocks' `layer_on` / `upsample`, and `output`.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.gradient_checkpointing = False  # recompute each block's activations in backward

        self.time_embedding = TimestepMLP(ch[0], cfg.time_embed_dim, cfg.time_cond_proj_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.transformer_in = TemporalTransformer(ch[0], cfg.transformer_in_heads, cfg.head_dim,
                                                  cfg.norm_groups,
                                                  cfg.temporal_position_embedding)

        skip_channels = [ch[0]]  # channels of every tensor pushed on the skip stack
        self.down_blocks = nn.ModuleList()
        for level, out_ch in enumerate(ch):
            last = level == len(ch) - 1
            in_ch = ch[max(level - 1, 0)]
            self.down_blocks.append(DownBlock(in_ch, out_ch, cfg.attention[level],
                                              downsample=not last, cfg=cfg))
            skip_channels += [out_ch] * (cfg.layers_per_block + (0 if last else 1))

        self.mid_block = MidBlock(ch[-1], cfg)

        self.up_blocks = nn.ModuleList()
        prev_ch = ch[-1]
        for level in reversed(range(len(ch))):
            n = cfg.layers_per_block + 1
            skips, skip_channels = skip_channels[-n:], skip_channels[:-n]
            self.up_blocks.append(UpBlock(prev_ch, ch[level], skips[::-1], cfg.attention[level],
                                          upsample=level > 0, cfg=cfg))
            prev_ch = ch[level]

        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def blocks(self) -> list[nn.Module]:
        """The down, mid and up blocks in order (FSDP's units of sharding, memory estimates)."""
        return [*self.down_blocks, self.mid_block, *self.up_blocks]

    def run_block(self, block, *args, **kwargs):
        """block(*args, **kwargs), its activations recomputed in backward when
        `gradient_checkpointing` is on and gradients are enabled."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor | float,
                     context: torch.Tensor, frame_chunk: int | None = None,
                     timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """Refuse inputs of the wrong shape; returns t as a tensor with one entry per sample."""
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"UNet3D: x must be (batch, {self.cfg.in_channels}, frames, height, "
                             f"width), got {tuple(x.shape)}")
        b = x.shape[0]
        if context.ndim != 3 or context.shape[0] != b or \
                context.shape[2] != self.cfg.context_dim:
            raise ValueError(f"UNet3D: context must be (batch {b}, tokens, "
                             f"{self.cfg.context_dim}) for x of batch {b}, got "
                             f"{tuple(context.shape)}")
        if frame_chunk is not None and (isinstance(frame_chunk, bool) or frame_chunk < 1):
            raise ValueError(f"UNet3D: frame_chunk must be None (off) or >= 1, got "
                             f"{frame_chunk!r}")
        dim = self.cfg.time_cond_proj_dim
        if timestep_cond is not None and (dim is None or tuple(timestep_cond.shape) != (b, dim)):
            raise ValueError("UNet3D: timestep_cond needs model.unet.time_cond_proj_dim and "
                             f"shape (batch {b}, {dim}), got {tuple(timestep_cond.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t[None]
        if t.ndim != 1 or t.shape[0] not in (1, b):
            raise ValueError(f"UNet3D: t must be a number or have 1 or {b} (batch) entries, got "
                             f"shape {tuple(t.shape)}")
        return t.expand(b)

    def prepare(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                frame_chunk: int | None = None, timestep_cond: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The checks, then (h, emb): h = transformer_in(conv_in(x)) with the frames folded into
        the batch ((B*F, C, h, w), batch-major), emb the time embedding (with `timestep_cond`,
        (B, time_cond_proj_dim), projected into it), one row per (b f)."""
        t = self.check_inputs(x, t, context, frame_chunk, timestep_cond)
        sinusoid = timestep_embedding(t, self.cfg.channels[0])
        dtype = self.conv_in.weight.dtype
        emb = self.time_embedding(sinusoid.to(dtype), None if timestep_cond is None
                                  else timestep_cond.to(dtype))
        # The time embedding is shared by the frames of a sample: one row per (b f). The text
        # context stays (B, L, D); cross-attention folds the frames into its queries.
        num_frames = x.shape[2]
        emb = emb.repeat_interleave(num_frames, dim=0)
        h = self.conv_in(rearrange(x, "b c f h w -> (b f) c h w"))
        return self.transformer_in(h, num_frames, frame_chunk), emb

    def down_path(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                  num_frames: int, chunk: int | None = None
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The down blocks and the mid block on `prepare`'s h: (the mid block's output, the
        skip stack [h, every down block's skips...] in push order)."""
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = self.run_block(block, h, emb, context, num_frames, chunk)
            skips += block_skips
        return self.run_block(self.mid_block, h, emb, context, num_frames, chunk), skips

    @staticmethod
    def split_skips(skips: list[torch.Tensor], block: UpBlock
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[int, int] | None]:
        """(the skips `block` takes: the last ones, the skips left, the size to upsample to).
        The size is the next skip's: latent sizes need not be multiples of 2^levels."""
        n = len(block.resnets)
        rest = skips[:-n]
        return skips[-n:], rest, tuple(rest[-1].shape[-2:]) if rest else None

    def output(self, h: torch.Tensor, batch: int) -> torch.Tensor:
        """The last up block's output -> eps (B, C, F, h, w): norm, SiLU, conv_out, frames
        unfolded."""
        h = self.conv_out(F.silu(self.conv_norm_out(h)))
        # A copy even when the frames unfold without one (1 frame): a new tensor, never a view.
        return rearrange(h, "(b f) c h w -> b c f h w", b=batch).clone(
            memory_format=torch.contiguous_format)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float,
                context: torch.Tensor, frame_chunk: int | None = None,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """`frame_chunk`: None, all frames at once; n >= 1, per-frame layers run on at most n
        frames of a sample at a time and temporal transformers on groups of positions of the
        same size (a memory bound for long videos; results are unchanged). `timestep_cond`:
        the guidance-scale embedding (B, time_cond_proj_dim) of a model that has one."""
        h, emb = self.prepare(x, t, context, frame_chunk, timestep_cond)
        num_frames = x.shape[2]
        h, skips = self.down_path(h, emb, context, num_frames, frame_chunk)
        for block in self.up_blocks:
            block_skips, skips, size = self.split_skips(skips, block)
            h = self.run_block(block, h, block_skips, emb, context, num_frames, size,
                               frame_chunk)
        return self.output(h, x.shape[0])


def add_guidance_embedding(unet: UNet3D, dim: int) -> UNetConfig:
    """Give `unet` a guidance-scale embedding of width `dim` (UNetConfig.time_cond_proj_dim):
    a new bias-free projection in its time embedding, zero-initialised so that the UNet
    computes exactly what it did before until it trains. Returns (and sets) its new config."""
    if unet.cfg.time_cond_proj_dim:
        raise ValueError("the UNet already embeds the guidance scale "
                         f"(time_cond_proj_dim={unet.cfg.time_cond_proj_dim}); distil from a "
                         "model without one")
    reference = unet.time_embedding.linear_1
    projection = nn.Linear(dim, reference.in_features, bias=False,
                           device=reference.weight.device, dtype=reference.weight.dtype)
    nn.init.zeros_(projection.weight)
    unet.time_embedding.cond_proj = projection
    unet.cfg = dataclasses.replace(unet.cfg, time_cond_proj_dim=dim)
    return unet.cfg
