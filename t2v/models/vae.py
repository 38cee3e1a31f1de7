"""The SD-family KL-f8 autoencoder (diffusers' AutoencoderKL, same keys), and video helpers.

    encode: image (N, 3, H, W) in [-1, 1] -> DiagonalGaussian over latents (N, 4, H/8, W/8)
    decode: latents (N, 4, h, w) -> image (N, 3, 8h, 8w)

text-to-video-ms-1.7b uses Stable Diffusion 2.1's VAE (the file ModelScope calls
`VQGAN_autoencoder.pth`) frame by frame: video latents (B, 4, F, h, w) are scaled by
`cfg.scaling_factor` (0.18215), frames fold into the batch, and each chunk of frames is decoded
as an image batch. Architecture: docs/architecture.md; diffusers `autoencoders/vae.py`, ModelScope
`autoencoder.py`.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

from t2v.config import VAEConfig
from t2v.models.layers import attention
from t2v.noise import randn

LOGVAR_RANGE = (-30.0, 20.0)  # the references clamp the encoder's log-variance to this
DEFAULT_CHUNK_FRAMES = 8  # frames per VAE batch in the video helpers


class ResBlock(nn.Module):
    """GN-SiLU-conv twice, + (1x1-projected) input; no time embedding."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the h*w positions (width = channels), residual."""

    def __init__(self, ch: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=eps)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # diffusers' key: to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = rearrange(self.group_norm(x), "n c h w -> n (h w) c")
        y = self.to_out[0](attention(self.to_q(y), self.to_k(y), self.to_v(y), heads=1))
        return x + rearrange(y, "n (h w) c -> n c h w", h=h, w=w)


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(ch, ch, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention(ch, groups, eps)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    """Pad right and bottom by one, then a 3x3 stride-2 conv (the references' asymmetric pad)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, downsample: bool, groups: int,
                 eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock(in_ch if i == 0 else out_ch, out_ch, groups, eps) for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, upsample: bool, groups: int,
                 eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock(in_ch if i == 0 else out_ch, out_ch, groups, eps) for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    """(N, 3, H, W) -> (N, 2*latent, H/2^(levels-1), ...): mean and log-variance moments."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups, eps = cfg.channels, cfg.norm_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, i < len(ch) - 1, groups,
                      eps) for i in range(len(ch)))
        self.mid_block = MidBlock(ch[-1], groups, eps)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents -> image; levels run from the lowest resolution up (`up_blocks.0` is the
    coarsest, unlike ModelScope's `decoder.up.0`), each with one ResBlock more than the
    encoder's."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups, eps = cfg.channels[::-1], cfg.norm_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, eps)
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, i < len(ch) - 1, groups,
                    eps) for i in range(len(ch)))
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=eps)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Channels-last activations: oneDNN's convolutions then skip a layout reorder of every
        # input and output (docs/performance.md: the bf16 decode spent half its time in them).
        z = z.contiguous(memory_format=torch.channels_last)
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The encoder's posterior: mean and log-variance (clamped to LOGVAR_RANGE)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """mean + std * noise; the noise is drawn like diffusers' (shape of mean, generator's
        device, then moved) unless given."""
        if noise is None:
            noise = randn(self.mean.shape, generator, self.mean.device, self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """KL-f8 VAE: `encode(x) -> DiagonalGaussian`, `decode(z) -> x`; video helpers scale and
    chunk over frames."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None, sample: bool = True
                ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Autoencode images: (reconstruction, posterior), as diffusers' forward but also
        returning the posterior (training needs its KL). The latent is a posterior sample
        (with `noise` or from `generator`) or, with `sample=False`, its mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator, noise) if sample else posterior.mode()
        return self.decode(z), posterior

    @torch.no_grad()
    def iter_decode_video(self, latents: torch.Tensor, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
                          progress: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        """Decode scaled video latents (B, C, F, h, w) chunk by chunk: yields (first row,
        float32 frames (n, 3, H, W)) where row = b * F + f (frames fold batch-major). Each
        frame is decoded independently, in the VAE's own dtype (e.g. a float32 VAE for float16
        latents)."""
        rows = rearrange(latents, "b c f h w -> (b f) c h w")
        starts = range(0, len(rows), chunk_frames)
        for start in tqdm(starts, desc="decoding", disable=not progress or len(starts) < 2,
                          leave=False):
            z = rows[start:start + chunk_frames].to(self.dtype) / self.cfg.scaling_factor
            yield start, self.decode(z).float()

    def decode_video(self, latents: torch.Tensor, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
                     progress: bool = False) -> torch.Tensor:
        """Scaled video latents (B, C, F, h, w) -> float32 video (B, 3, F, 8h, 8w) in ~[-1, 1].

        Chunks of `chunk_frames` are written into one preallocated output, so the result does
        not depend on the chunk size and peak memory is the output plus one chunk's
        activations. `progress` shows a bar over the chunks when there is more than one.
        """
        b, f = latents.shape[0], latents.shape[2]
        out = None
        for start, frames in self.iter_decode_video(latents, chunk_frames, progress):
            if out is None:  # (B, F, 3, H, W) so that rows can be written in place
                out = frames.new_empty((b, f) + frames.shape[1:])
            out.view(b * f, *frames.shape[1:])[start:start + len(frames)] = frames
        return out.permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W), a view: no copy

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor, generator: torch.Generator | None = None,
                     sample: bool = True,
                     chunk_frames: int = DEFAULT_CHUNK_FRAMES) -> torch.Tensor:
        """Video (B, 3, F, H, W) in [-1, 1] -> scaled latents (B, C, F, H/8, W/8).

        `sample=True` draws from the posterior as diffusers' VideoToVideoSDPipeline does
        (one randn of shape ((B F), C, h, w) from `generator`, drawn up front so that it does
        not depend on the chunk size); `sample=False` takes the mean.
        """
        b, _, f = video.shape[:3]
        rows = rearrange(video, "b c f h w -> (b f) c h w")
        latents, noise = [], None
        for start in range(0, b * f, chunk_frames):
            posterior = self.encode(rows[start:start + chunk_frames].to(self.dtype))
            if sample and noise is None:
                noise = randn((b * f,) + posterior.mean.shape[1:], generator,
                              posterior.mean.device, posterior.mean.dtype)
            z = posterior.sample(noise=noise[start:start + chunk_frames]) if sample else \
                posterior.mode()
            latents.append(z * self.cfg.scaling_factor)
        return rearrange(torch.cat(latents), "(b f) c h w -> b c f h w", b=b)
