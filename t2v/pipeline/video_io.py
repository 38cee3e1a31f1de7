"""Reading and writing videos: MP4 (H.264) through PyAV, GIF through Pillow, PNG frames.

MP4s are H.264 (libx264), yuv420p, with the `+faststart` flag (index at the front, so browsers
start playing before the download ends), at the given fps: the files play in browsers, Gradio,
QuickTime and phones, unlike OpenCV's `mp4v`. Every writer writes to a temporary name next to
the target and renames it at the end, and refuses an existing target unless `overwrite`.
"""

from __future__ import annotations

import itertools
import json
import os
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import av
import numpy as np
from PIL import Image

from t2v.atomic import atomic_path
from t2v.errors import UserError

MP4_CRF = 18  # visually lossless for most content; ModelScope used 10, webui 17


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.ascontiguousarray(frames)  # encoders read raw rows: strided views would garble
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames


# BT.601, limited range: what FFmpeg's swscale used for these files (and what players assume
# for untagged standard-definition video). Rows: Y, Cb, Cr; columns: R, G, B in 0-255.
BT601 = np.array([[0.256788, 0.504129, 0.097906],
                  [-0.148223, -0.290993, 0.439216],
                  [0.439216, -0.367788, -0.071427]])
BT601_OFFSET = np.array([16.0, 128.0, 128.0])


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> the yuv420p planes stacked as PyAV takes them, (3H/2, W): Y at
    full size, Cb and Cr from each 2x2 block's mean colour. Done here, in float64 numpy, rather
    than by swscale, whose SIMD paths depend on how a buffer happens to be aligned: the same
    frames gave different MP4s from one process to the next."""
    rgb = frame.astype(np.float64)
    h, w, _ = rgb.shape
    y = rgb @ BT601[0] + BT601_OFFSET[0]
    block = rgb.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    chroma = block @ BT601[1:].T + BT601_OFFSET[1:]  # (H/2, W/2, 2)
    planes = [y.reshape(-1), chroma[..., 0].reshape(-1), chroma[..., 1].reshape(-1)]
    out = np.clip(np.rint(np.concatenate(planes)), 0, 255).astype(np.uint8)
    return out.reshape(h * 3 // 2, w)


def write_mp4(frames: np.ndarray | Iterable[np.ndarray], path: Path, fps: int,
              metadata: dict | None = None, overwrite: bool = False,
              crf: int = MP4_CRF) -> Path:
    """H.264 / yuv420p / +faststart MP4; `metadata` is stored as JSON in the `comment` tag.
    The same frames and metadata give the same bytes (one encoder thread).

    `frames`: uint8 (F, H, W, 3), or an iterable of such chunks, encoded as they arrive (the
    whole video never needs to be in memory)."""
    chunks = iter([frames] if isinstance(frames, np.ndarray) else frames)
    first = next(chunks, None)
    if first is None:
        raise ValueError("no frames to write")
    first = _check_frames(first)
    _, height, width, _ = first.shape
    if height % 2 or width % 2:  # yuv420p subsamples chroma 2x2
        raise UserError(f"{path}: H.264 yuv420p needs even sizes, got {width}x{height}; "
                        "use a height and width divisible by 8")
    with atomic_path(path, overwrite) as tmp:
        with av.open(str(tmp), mode="w", format="mp4",
                     options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # One encoder thread: x264's frame threads make the bytes depend on timing (60
            # encodes of the same frames gave 5 different files); one thread gives one file.
            stream.options = {"crf": str(crf), "threads": "1"}
            stream.codec_context.thread_count = 1
            if metadata:
                container.metadata["comment"] = json.dumps(metadata)
            frame_time = Fraction(1, fps)  # not stream.time_base: the muxer rewrites that
            i = 0
            for chunk in itertools.chain([first], chunks):
                for frame in _check_frames(chunk):
                    video_frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame),
                                                             format="yuv420p")
                    video_frame.pts = i  # explicit timestamps: x264's rate control reads them
                    video_frame.time_base = frame_time
                    i += 1
                    for packet in stream.encode(video_frame):
                        container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return Path(path)


def export_to_video(video_frames, output_video_path: str | Path | None = None, fps: int = 10,
                    overwrite: bool = False) -> str:
    """diffusers' `export_to_video` with t2v's writer: frames as an array (F, H, W, 3), a list
    of (H, W, 3) arrays or of PIL images, floats in [0, 1] or uint8; an H.264 MP4 at
    `output_video_path` (default: a new temporary file). Unlike diffusers it refuses to replace
    an existing file unless `overwrite`. Returns the path."""
    if isinstance(video_frames, (list, tuple)):
        video_frames = np.stack([np.asarray(frame) for frame in video_frames])
    frames = np.asarray(video_frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    if output_video_path is None:
        import tempfile

        handle, name = tempfile.mkstemp(suffix=".mp4")
        os.close(handle)
        output_video_path, overwrite = name, True
    return str(write_mp4(frames, Path(output_video_path), fps, overwrite=overwrite))


def write_gif(frames: np.ndarray, path: Path, fps: int, overwrite: bool = False) -> Path:
    """Looping GIF; frame durations are whole milliseconds (GIF stores centiseconds)."""
    frames = _check_frames(frames)
    images = [Image.fromarray(frame) for frame in frames]
    with atomic_path(path, overwrite) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=round(1000 / fps), loop=0)
    return Path(path)


def write_png_frames(frames: np.ndarray, folder: Path, overwrite: bool = False) -> Path:
    """A folder of 000000.png, 000001.png, ..."""
    frames = _check_frames(frames)
    with atomic_path(folder, overwrite) as tmp:
        tmp.mkdir()
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp / f"{i:06d}.png")
    return Path(folder)


def read_video(path: Path, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode a video file to uint8 RGB frames (F, H, W, 3) and its frame rate."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: video file not found")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 8)
            frames = []
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except av.error.FFmpegError as exc:
        raise UserError(f"{path}: cannot read the video ({exc})") from None
    if not frames:
        raise UserError(f"{path}: the video has no frames")
    return np.stack(frames), fps


def probe(path: Path) -> dict:
    """Codec, pixel format, size, frame count, fps and comment metadata of an MP4 (for tests
    and users checking a file)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return {"codec": stream.codec_context.name, "pix_fmt": stream.codec_context.pix_fmt,
                "width": stream.width, "height": stream.height, "frames": frames,
                "fps": float(stream.average_rate), "comment": container.metadata.get("comment")}
