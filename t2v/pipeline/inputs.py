"""Input images and videos in every form the pipeline takes: diffusers' `video=` (PIL frames,
arrays, tensors), an init image, and files named by the options (read with PyAV or Pillow,
resized to the video's size).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from t2v.errors import UserError
from t2v.pipeline.video_io import read_video


def video_argument(video) -> torch.Tensor:
    """diffusers' `video=` input -> init_video (B, 3, F, H, W) in [-1, 1]. Accepted: a list of
    PIL images or of (H, W, 3) arrays, an array (F, H, W, 3), a tensor (F, 3, H, W) or
    (B, F, 3, H, W); floats in [0, 1] (or [-1, 1] when any value is negative, as diffusers'
    VideoProcessor reads them) or uint8 (0-255)."""
    if isinstance(video, (list, tuple)):
        video = np.stack([np.asarray(frame) for frame in video])
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise UserError(f"video: expected frames (F, H, W, 3), got shape {video.shape}")
        video = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2)  # F 3 H W
    if not isinstance(video, torch.Tensor):
        raise UserError(f"video: expected a list of frames, an array or a tensor, got "
                        f"{type(video).__name__}")
    if video.ndim == 4:
        video = video[None]
    if video.ndim != 5 or video.shape[2] != 3:
        raise UserError(f"video: expected (F, 3, H, W) or (B, F, 3, H, W), got "
                        f"{tuple(video.shape)}")
    if video.dtype == torch.uint8:
        video = video.float() / 255.0
    elif video.min() < 0:  # as diffusers' VideoProcessor: negative values mean [-1, 1] already
        return video.float().permute(0, 2, 1, 3, 4)
    return (video.float() * 2 - 1).permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W) in [-1, 1]


def image_argument(image) -> torch.Tensor:
    """init_image -> (B, 3, 1, H, W) in [-1, 1]: a PIL image, an (H, W, 3) array (uint8, or
    floats in [0, 1]), or a tensor (3, H, W) / (B, 3, H, W) in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[1] != 3:
            raise UserError(f"init_image: expected a tensor (3, H, W) or (B, 3, H, W), got "
                            f"{tuple(image.shape)}")
        return image.float()[:, :, None]
    return video_argument([np.asarray(image.convert("RGB") if hasattr(image, "convert")
                                      else image)])


def frames_to_video_tensor(frames: np.ndarray, height: int | None = None,
                           width: int | None = None) -> torch.Tensor:
    """uint8 frames (F, H, W, 3) -> (1, 3, F, H', W') in [-1, 1], resized (bilinear,
    antialiased) to height x width, or to the frame size rounded down to multiples of 8."""
    # torch.tensor copies: decoded frames may be read-only arrays, which from_numpy warns about
    x = torch.tensor(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    h, w = x.shape[-2:]
    height = height or h - h % 8
    width = width or w - w % 8
    if height < 8 or width < 8:
        raise UserError(f"the input video is {w}x{h}; it needs at least 8x8 pixels")
    if (height, width) != (h, w):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True,
                          align_corners=False).clamp(-1, 1)
    return x.permute(1, 0, 2, 3)[None]


def read_video_file(path: str, num_frames: int | None, height: int, width: int) -> torch.Tensor:
    """A video file's first `num_frames` frames (all if None) -> (1, 3, F, height, width) in
    [-1, 1]."""
    frames, _ = read_video(Path(path), max_frames=num_frames)
    return frames_to_video_tensor(frames, height, width)


def read_image_file(path: str, height: int, width: int) -> torch.Tensor:
    """An image file -> (1, 3, height, width) in [-1, 1]."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        reason = "not found" if isinstance(exc, FileNotFoundError) else "not a readable image"
        raise UserError(f"{path}: {reason} (init_image)") from None
    return frames_to_video_tensor(pixels[None], height, width)[:, :, 0]
