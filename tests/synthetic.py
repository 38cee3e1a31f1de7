"""A tiny synthetic training set: coloured squares moving across a grey background."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from t2v.pipeline.video_io import write_mp4

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230),
           "yellow": (230, 210, 40)}
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}


def square_video(colour: str, direction: str, frames: int = 12, size: int = 64,
                 side: int = 16) -> np.ndarray:
    """uint8 (F, size, size, 3): a `side` square crossing the frame in `direction`."""
    video = np.full((frames, size, size, 3), 128, dtype=np.uint8)
    dy, dx = DIRECTIONS[direction]
    travel = size - side
    for f in range(frames):
        offset = round(travel * f / max(frames - 1, 1))
        y = travel // 2 + dy * (offset - travel // 2) if dy else travel // 2
        x = travel // 2 + dx * (offset - travel // 2) if dx else travel // 2
        video[f, y:y + side, x:x + side] = COLOURS[colour]
    return video


def write_squares(folder: Path, count: int = 4, frames: int = 12, size: int = 64,
                  as_json: bool = False) -> Path:
    """`count` captioned clips in `folder` (video + .txt caption, or a JSON list); returns the
    data path to train on."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    names = [(c, d) for c in COLOURS for d in DIRECTIONS][:count]
    for colour, direction in names:
        name = f"{colour}_{direction}"
        write_mp4(square_video(colour, direction, frames, size), folder / f"{name}.mp4", fps=8)
        caption = f"a {colour} square moving {direction}"
        if as_json:
            entries.append({"video": f"{name}.mp4", "caption": caption})
        else:
            (folder / f"{name}.txt").write_text(caption)
    if as_json:
        (folder / "clips.json").write_text(json.dumps(entries))
        return folder / "clips.json"
    return folder
