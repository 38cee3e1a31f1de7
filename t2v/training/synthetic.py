"""Procedural captioned clips: one simple object moving across a plain background.

The data the demo model (docs/demo.md) is trained on and evaluated against. Captions follow a
grammar of four attributes:

    a {colour} {shape} moving {motion} [on a {background} background]
    colour     red | green | blue | yellow | purple      (orange: kept out, see EXTRA_COLOURS)
    shape      circle | square | triangle
    motion     left | right | up | down
    background black | white

5 x 3 x 4 x 2 = 120 combinations. HELDOUT (20 of them, 17%) never appear in training; the
evaluation reports them apart (compositional generalisation: every single attribute value is
seen in training, only the combination is new).

A clip is a pure function of (seed, index): object size 10-13 px (diameter, side, or base and
height of an upward triangle), speed 1.25-2.25 px per frame, a start position that keeps the
object inside the frame for the whole clip (with `start_spread` < 1, only the share of that
range nearest the edge the object comes from), drawn 4x supersampled so edges are
anti-aliased.

    clips = SyntheticClips(seed=0, count=10_000)        # the training split
    video, caption = clips.load(7)                      # (3, F, H, W) in [-1, 1], str
    render(Attributes("red", "circle", "right", "black"), np.random.default_rng(0))  # uint8

A quarter of the training captions leave the background out ("a red circle moving right"),
so short prompts work too; the evaluation always uses the full caption.

`python -m t2v.training.synthetic DIR --count N` writes clips as MP4 + .txt captions, the folder layout
`python -m t2v.train` reads; the demo configs feed the trainer directly (`data.synthetic`).
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from t2v.errors import OneLineParser, UserError
from t2v.pipeline.video_io import write_mp4

COLOURS = {"red": (225, 35, 35), "green": (35, 190, 60), "blue": (45, 80, 235),
           "yellow": (240, 215, 30), "purple": (150, 50, 210)}
# Colours the base model never sees; the LoRA experiment of docs/quality.md teaches one.
EXTRA_COLOURS = {"orange": (250, 135, 20)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}

SIZE_RANGE = (10.0, 13.0)  # object extent in pixels (at 32x32 frames; scales with the frame)
SPEED_RANGE = (1.25, 2.25)  # pixels per frame (at 32x32)
SUPERSAMPLE = 4
SHORT_CAPTIONS = 0.25  # share of training captions without "on a ... background"


@dataclass(frozen=True)
class Attributes:
    colour: str
    shape: str
    motion: str
    background: str | None  # None: not said (parse_caption of a short caption)

    @property
    def caption(self) -> str:
        return f"{self.short_caption} on a {self.background} background"

    @property
    def short_caption(self) -> str:
        """Without the background ("a red circle moving right")."""
        return f"a {self.colour} {self.shape} moving {self.motion}"


def all_combinations(colours=tuple(COLOURS)) -> list[Attributes]:
    return [Attributes(*c) for c in itertools.product(colours, SHAPES, MOTIONS, BACKGROUNDS)]


def _held_out(a: Attributes) -> bool:
    """The fixed rule behind HELDOUT: one combination per (colour, motion) pair, with shape
    (c + m) mod 3 and background (c + m) mod 2 (c, m, shape and background as indices into
    COLOURS, MOTIONS, SHAPES, BACKGROUNDS). Every colour is held out 4 times, every motion 5,
    every shape 6-7 times, every background 10."""
    c, m = list(COLOURS).index(a.colour), list(MOTIONS).index(a.motion)
    return SHAPES.index(a.shape) == (c + m) % 3 and \
        list(BACKGROUNDS).index(a.background) == (c + m) % 2


HELDOUT = tuple(a for a in all_combinations() if _held_out(a))
TRAINED = tuple(a for a in all_combinations() if not _held_out(a))


def parse_caption(caption: str) -> Attributes | None:
    """The attributes of a grammar caption (background None for a short caption), None for any
    other text."""
    words = caption.strip().lower().split()
    if len(words) not in (5, 9) or words[0] != "a" or words[3] != "moving" \
            or words[4] not in MOTIONS:
        return None
    background = None
    if len(words) == 9:
        if words[5:7] != ["on", "a"] or words[8] != "background":
            return None
        background = words[7]
        if background not in BACKGROUNDS:
            return None
    colour, shape = words[1], words[2]
    if colour not in {**COLOURS, **EXTRA_COLOURS} or shape not in SHAPES:
        return None
    return Attributes(colour, shape, words[4], background)


def _shape_mask(shape: str, cy: float, cx: float, extent: float, yy: np.ndarray,
                xx: np.ndarray) -> np.ndarray:
    half = extent / 2
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= half ** 2
    if shape == "square":
        return (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
    # Triangle pointing up: apex at the top centre, base at the bottom; bbox extent x extent.
    top = cy - half
    depth = (yy - top) / extent  # 0 at the apex, 1 at the base
    return (depth >= 0) & (depth <= 1) & (np.abs(xx - cx) <= depth * half)


def render(attributes: Attributes, rng: np.random.Generator, num_frames: int = 8,
           size: int = 32, start_spread: float = 1.0) -> np.ndarray:
    """uint8 (F, size, size, 3): the object crossing the frame as the attributes say.
    `start_spread` (0-1] is the share of the start range used, from its back end: 1 starts
    anywhere that keeps the object in view; smaller values start it near the edge it comes
    from, so the motion word also says where the object is (docs/demo.md)."""
    colour = np.array({**COLOURS, **EXTRA_COLOURS}[attributes.colour], dtype=np.float32)
    background = np.array(BACKGROUNDS[attributes.background], dtype=np.float32)
    scale = size / 32
    extent = rng.uniform(*SIZE_RANGE) * scale
    speed = rng.uniform(*SPEED_RANGE) * scale
    dy, dx = MOTIONS[attributes.motion]
    low, high = extent / 2 + 1, size - extent / 2 - 1  # centre range: 1 px clear of the edge
    # Long clips move slower, so that the object stays in view (8 frames: never capped).
    speed = min(speed, (high - low) / max(num_frames - 1, 1))
    travel = speed * (num_frames - 1)
    # The start on the motion axis, measured forwards (start_spread 1: the whole range).
    last_start = high - travel if start_spread == 1.0 else (
        low + start_spread * (high - travel - low))
    along = rng.uniform(low, last_start)
    across = rng.uniform(low, high)
    # Pixel centres on a supersampled grid, in pixel units.
    grid = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    video = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for f in range(num_frames):
        position = along + speed * f
        if dx:  # horizontal: forwards is +x for "right", -x for "left"
            cx = position if dx > 0 else size - position
            cy = across
        else:
            cy = position if dy > 0 else size - position
            cx = across
        mask = _shape_mask(attributes.shape, cy, cx, extent, yy, xx)
        cover = mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
        pixels = background + cover[..., None] * (colour - background)
        video[f] = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return video


@dataclass(frozen=True)
class SyntheticClip:
    attributes: Attributes
    caption: str


class SyntheticClips:
    """`count` clips cycling over `combinations` (default: TRAINED); clip i is rendered from
    np.random.default_rng([seed, i]). A share `short_captions` of the clips (drawn from
    np.random.default_rng(seed)) has the short caption, without "on a ... background".
    Same interface as t2v.training.data.VideoClips."""

    def __init__(self, seed: int = 0, count: int = 10_000, num_frames: int = 8, size: int = 32,
                 combinations: tuple[Attributes, ...] | list[Attributes] = TRAINED,
                 short_captions: float = SHORT_CAPTIONS, start_spread: float = 1.0):
        if not combinations:
            raise ValueError("no attribute combinations to draw clips from")
        if not 0.0 < start_spread <= 1.0:
            raise ValueError(f"start_spread must be in (0, 1], got {start_spread}")
        self.seed, self.num_frames, self.size = seed, num_frames, size
        self.start_spread = start_spread
        self.combinations = tuple(combinations)
        short = np.random.default_rng(seed).random(count) < short_captions
        self.clips = []
        for i in range(count):
            a = self.combinations[i % len(self.combinations)]
            self.clips.append(SyntheticClip(a, a.short_caption if short[i] else a.caption))

    def __len__(self) -> int:
        return len(self.clips)

    def frames(self, index: int) -> np.ndarray:
        """uint8 (F, H, W, 3)."""
        return render(self.clips[index].attributes, np.random.default_rng([self.seed, index]),
                      self.num_frames, self.size, self.start_spread)

    def load(self, index: int, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, str]:
        """(video (3, F, H, W) in [-1, 1], caption); the generator is not needed (a clip is a
        function of its index) and accepted for VideoClips' interface."""
        video = torch.from_numpy(self.frames(index)).permute(3, 0, 1, 2).float() / 127.5 - 1.0
        return video, self.clips[index].caption


def combinations_named(colours: tuple[str, ...] = (), split: str = "trained"
                       ) -> tuple[Attributes, ...]:
    """The combinations of a split ("trained", "heldout", "all"), or with `colours` given, all
    combinations of those colours (e.g. ("orange",) for the LoRA experiment)."""
    if colours:
        unknown = [c for c in colours if c not in {**COLOURS, **EXTRA_COLOURS}]
        if unknown:
            raise ValueError(f"unknown colours {unknown}; known: "
                             f"{sorted({**COLOURS, **EXTRA_COLOURS})}")
        return tuple(all_combinations(tuple(colours)))
    splits = {"trained": TRAINED, "heldout": HELDOUT, "all": TRAINED + HELDOUT}
    if split not in splits:
        raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}")
    return splits[split]


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m t2v.training.synthetic",
                           description="Write procedural clips as MP4 + .txt captions.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--split", default="trained", choices=("trained", "heldout", "all"))
    parser.add_argument("--start-spread", type=float, default=1.0,
                        help="share of the start range used, from the edge the object comes "
                             "from (1: anywhere in view)")
    try:
        args = parser.parse_args(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not 0.0 < args.start_spread <= 1.0:
        print(f"error: --start-spread must be in (0, 1], got {args.start_spread}",
              file=sys.stderr)
        return 2
    if args.folder.exists() and any(args.folder.iterdir()):
        print(f"error: {args.folder} is not empty; choose a new folder", file=sys.stderr)
        return 2
    clips = SyntheticClips(args.seed, args.count, args.frames, args.size,
                           combinations_named(split=args.split), start_spread=args.start_spread)
    args.folder.mkdir(parents=True, exist_ok=True)
    for i, clip in enumerate(clips.clips):
        name = f"{i:06d}"
        write_mp4(clips.frames(i), args.folder / f"{name}.mp4", fps=8)
        (args.folder / f"{name}.txt").write_text(clip.caption + "\n")
    print(f"wrote {len(clips)} clips to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
