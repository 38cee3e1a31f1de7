"""Prompt travel: a prompt schedule over the frames of a windowed run.

    "0: a red circle moving right | 32: a blue circle moving right"

Keyframes f_0 < f_1 < ... < f_{K-1} with prompts p_i; E_i is the text-encoder output of p_i
(weighted when prompt weighting is on). The schedule's embedding at a (possibly fractional)
frame c is

    E(c) = E_0                                   c <= f_0
    E(c) = E_{K-1}                               c >= f_{K-1}
    E(c) = (1 - a) E_i + a E_{i+1},  a = (c - f_i) / (f_{i+1} - f_i),   f_i <= c < f_{i+1}

(exactly E_i where a = 0). Each window of the windowed sampler (t2v.sampling.windows) is conditioned on
E at its centre frame c = start + (window - 1) / 2, taken modulo the frame count when looping;
the negative prompt and guidance are the same for every window. docs/sampling-tools.md.
"""

from __future__ import annotations

import torch

from t2v.errors import UserError

EXAMPLE = '"0: a red circle moving right | 32: a blue circle moving right"'


def parse_prompt_schedule(text: str) -> dict[int, str]:
    """"FRAME: PROMPT | FRAME: PROMPT ..." -> {frame: prompt}, keyframes strictly increasing.
    A prompt runs from the first ":" of its entry to the next "|" (so it may contain ":" but
    not "|"); spaces around frames and prompts are dropped."""
    if not text.strip():
        raise UserError(f"prompt schedule is empty; write e.g. {EXAMPLE}")
    schedule: dict[int, str] = {}
    for entry in text.split("|"):
        frame_text, colon, prompt = entry.partition(":")
        if not colon:
            raise UserError(f"prompt schedule entry {entry.strip()!r} has no 'FRAME:'; write "
                            f"e.g. {EXAMPLE}")
        frame_text, prompt = frame_text.strip(), prompt.strip()
        if not frame_text.isdigit():
            raise UserError(f"prompt schedule: {frame_text!r} is not a frame number (an "
                            f"integer >= 0); write e.g. {EXAMPLE}")
        frame = int(frame_text)
        if frame in schedule:
            raise UserError(f"prompt schedule: frame {frame} appears twice")
        if schedule and frame < max(schedule):
            raise UserError(f"prompt schedule: keyframes must increase, but {frame} comes "
                            f"after {max(schedule)}")
        schedule[frame] = prompt
    return schedule


def check_schedule(schedule: dict, num_frames: int) -> dict[int, str]:
    """A schedule {frame: prompt} checked against a video of `num_frames` frames: every
    keyframe an integer in [0, num_frames - 1], every prompt non-empty text. Returns it sorted
    by frame."""
    if not schedule:
        raise UserError(f"prompt schedule is empty; write e.g. {EXAMPLE}")
    for frame, prompt in schedule.items():
        if not isinstance(frame, int) or isinstance(frame, bool) or frame < 0:
            raise UserError(f"prompt schedule: {frame!r} is not a frame number (an integer "
                            ">= 0)")
        if frame >= num_frames:
            raise UserError(f"prompt schedule: keyframe {frame} is past the last frame "
                            f"({num_frames - 1}) of a {num_frames}-frame video")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"prompt schedule: frame {frame} has no prompt")
    return dict(sorted(schedule.items()))


def resolve_schedule(schedule: str | dict, num_frames: int) -> dict[int, str]:
    """The schedule string (parse_prompt_schedule) or dict, checked (check_schedule)."""
    if isinstance(schedule, str):
        schedule = parse_prompt_schedule(schedule)
    elif not isinstance(schedule, dict):
        raise UserError(f"prompt_schedule must be a string or a dict {{frame: prompt}}, got "
                        f"{type(schedule).__name__}")
    return check_schedule(schedule, num_frames)


def window_centre(start: int, size: int, num_frames: int, loop: bool = False) -> float:
    """The centre frame of the window of `size` frames from `start`: start + (size - 1) / 2,
    modulo num_frames when looping (a window wrapping around the end)."""
    centre = start + (size - 1) / 2
    return centre % num_frames if loop else centre


def segment(keyframes: list[int], frame: float) -> tuple[int, float]:
    """(i, a) with E(frame) = (1 - a) E_i + a E_{i+1}: a = 0 before the first keyframe,
    after the last and on a keyframe."""
    if frame <= keyframes[0]:
        return 0, 0.0
    if frame >= keyframes[-1]:
        return len(keyframes) - 1, 0.0
    i = max(k for k in range(len(keyframes)) if keyframes[k] <= frame)
    return i, (frame - keyframes[i]) / (keyframes[i + 1] - keyframes[i])


def schedule_embedding(keyframes: list[int], embeddings: torch.Tensor, frame: float
                       ) -> torch.Tensor:
    """E(frame) from the keyframes' embeddings (K, ...) (the module docstring's formula)."""
    i, a = segment(keyframes, frame)
    if a == 0.0:
        return embeddings[i]
    return (1 - a) * embeddings[i] + a * embeddings[i + 1]
