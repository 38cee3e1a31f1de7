"""Training clips: captioned videos -> (video (3, F, H, W) in [-1, 1], caption).

Two sources (`data.path`):
- a folder of video files, each with a same-named `.txt` caption beside it
  (`clips/dog.mp4` + `clips/dog.txt`);
- a JSON file: a list of {"video": path, "caption": text}, paths relative to the JSON file.

Frames: `num_frames` frames every `stride`-th frame from a start drawn uniformly over the clip
(the stride is lowered for clips too short for it; clips with fewer than `num_frames` frames
are skipped with a warning). Each frame is resized so it covers height x width (bilinear,
antialiased) and centre-cropped.

Randomness is per sample: `sample_rng(seed, step, slot)` seeds a generator from the run seed,
the optimizer step and the sample's slot in the global batch, so that a step does not depend on
how the batch is split over processes or on whether the run was resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from t2v.atomic import atomic_path
from t2v.errors import UserError
from t2v.models.vae import DEFAULT_CHUNK_FRAMES
from t2v.pipeline.video_io import read_video

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")


@dataclass(frozen=True)
class Clip:
    video: Path
    caption: str
    frames: int  # frame count of the file


def sample_rng(seed: int, step: int, slot: int) -> torch.Generator:
    """A CPU generator for one sample of one step (independent streams via SeedSequence)."""
    state = np.random.SeedSequence([seed, step, slot]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def count_frames(path: Path) -> int:
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return stream.frames or sum(1 for _ in container.decode(stream))
    except (av.error.FFmpegError, IndexError) as exc:
        raise UserError(f"{path}: cannot read the video ({exc})") from None


def list_clips(path: str | Path) -> list[tuple[Path, str]]:
    """(video, caption) pairs from a folder or a JSON list, in a stable order."""
    path = Path(path)
    if path.is_dir():
        pairs = []
        for video in sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES):
            caption = video.with_suffix(".txt")
            if not caption.is_file():
                raise UserError(f"{video}: no caption file {caption.name} beside it")
            pairs.append((video, caption.read_text(encoding="utf-8").strip()))
    elif path.is_file():
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("video"), str)
                and isinstance(e.get("caption"), str) for e in entries):
            raise UserError(f'{path}: expected a list of {{"video": path, "caption": text}}')
        pairs = [((path.parent / e["video"]), e["caption"]) for e in entries]
        for video, _ in pairs:
            if not video.is_file():
                raise UserError(f"{path}: video {video} not found")
    else:
        raise UserError(f"data.path {path}: no such folder or JSON file")
    if not pairs:
        raise UserError(f"data.path {path}: no videos found (suffixes {VIDEO_SUFFIXES})")
    return pairs


def frame_indices(total: int, num_frames: int, stride: int,
                  generator: torch.Generator | None) -> list[int]:
    """`num_frames` indices `stride` apart (stride lowered to fit) from a random start (the
    first frame without a generator)."""
    stride = max(1, min(stride, (total - 1) // max(num_frames - 1, 1)))
    span = (num_frames - 1) * stride + 1
    start = 0 if generator is None else int(
        torch.randint(0, total - span + 1, (1,), generator=generator))
    return list(range(start, start + span, stride))


def resize_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float (3, F, height, width) in [-1, 1]: scale to cover, centre crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True,
                          align_corners=False).clamp(-1, 1)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return x[:, :, top:top + height, left:left + width].permute(1, 0, 2, 3)


class VideoClips:
    """The dataset: `load(i, generator)` -> (video (3, F, H, W) in [-1, 1], caption)."""

    def __init__(self, path: str | Path, num_frames: int, stride: int, height: int, width: int):
        self.num_frames, self.stride, self.height, self.width = num_frames, stride, height, width
        clips, short = [], []
        for video, caption in list_clips(path):
            total = count_frames(video)
            (clips if total >= num_frames else short).append(Clip(video, caption, total))
        if short:
            log.warning("skipping %d clips shorter than %d frames (e.g. %s)", len(short),
                        num_frames, short[0].video)
        if not clips:
            raise UserError(f"data.path {path}: no clip has {num_frames} frames "
                            "(lower data.num_frames)")
        self.clips = clips

    def __len__(self) -> int:
        return len(self.clips)

    def load(self, index: int, generator: torch.Generator | None
             ) -> tuple[torch.Tensor, str]:
        """The clip's frames from a random start (from the first frame without a generator)."""
        clip = self.clips[index]
        indices = frame_indices(clip.frames, self.num_frames, self.stride, generator)
        frames, _ = read_video(clip.video, max_frames=indices[-1] + 1)
        if len(frames) <= indices[-1]:  # the header over-counted: repeat the last frame
            indices = [min(i, len(frames) - 1) for i in indices]
        return resize_crop(frames[indices], self.height, self.width), clip.caption


class LatentCache:
    """VAE posteriors (mean, std) of every clip's first frames, one safetensors file per clip in
    `folder`, named by a hash of the video path, its size and time, the data settings and
    `tag` (the VAE's weights source)."""

    def __init__(self, folder: str | Path, clips: VideoClips, vae, tag: str = ""):
        self.folder, self.clips, self.vae, self.tag = Path(folder), clips, vae, tag

    def _path(self, clip: Clip) -> Path:
        stat = clip.video.stat()
        key = json.dumps([str(clip.video.resolve()), stat.st_size, stat.st_mtime_ns,
                          self.clips.num_frames, self.clips.stride, self.clips.height,
                          self.clips.width, self.tag])
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"

    @torch.no_grad()
    def posterior(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (C, F, h, w), unscaled; computed and stored on first use."""
        path = self._path(self.clips.clips[index])
        if path.is_file():
            stored = load_file(str(path))
            return stored["mean"], stored["std"]
        video, _ = self.clips.load(index, generator=None)  # (3, F, H, W)
        rows = video.permute(1, 0, 2, 3)  # frames as the batch
        device = next(self.vae.parameters()).device
        means, stds = [], []
        for start in range(0, len(rows), DEFAULT_CHUNK_FRAMES):
            posterior = self.vae.encode(rows[start:start + DEFAULT_CHUNK_FRAMES].to(
                device, self.vae.dtype))
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
        mean = torch.cat(means).permute(1, 0, 2, 3).contiguous()  # (C, F, h, w)
        std = torch.cat(stds).permute(1, 0, 2, 3).contiguous()
        with atomic_path(path, overwrite=True) as tmp:
            save_file({"mean": mean, "std": std}, str(tmp))
        return mean, std
