"""python -m t2v.eval demo: does the demo model follow its prompts? The quality signal.

For each caption of a fixed list (docs/quality.md) and seeds never used in training, generate
a video, then classify it with plain image analysis (numpy, no learned model):

    background  the median colour of the frame border, nearest of t2v.training.synthetic.BACKGROUNDS
    object      pixels farther than OBJECT_DISTANCE from the background colour; blobs are
                4-connected components of at least MIN_BLOB_PIXELS; the object is the largest
                blob of at most MAX_OBJECT_FRACTION of the frame
    colour      median over frames of the object's mean colour (pixels at least 70% of the
                way from the background), nearest palette colour (COLOURS and EXTRA_COLOURS)
    shape       from the moments of the object's soft mask (its distance from the background
                over its peak, clipped to [0, 1]): a triangle (pointing up) is skewed along
                the vertical (TRIANGLE_SKEW); a square's projections onto the diagonals are
                more peaked than onto the axes (`corners`, SQUARE_CORNERS); a circle is
                neither. Medians over frames. Both survive the VAE's blur, which rounds a
                square's corners in pixels (docs/quality.md, "The shape rule")
    direction   the centroid track's least-squares velocity; the larger axis and its sign
                (still, if the object moves less than MIN_TRAVEL pixels over the clip)
    consistency one blob in every frame, and frame-to-frame jitter: the RMS distance of the
                centroids from the fitted straight-line track, in pixels

Accuracy per attribute is reported separately for trained and held-out combinations
(t2v.training.synthetic.HELDOUT), with the settings used. The classifier itself is tested to be exact
on rendered ground-truth clips (tests/test_demo.py).

    python -m t2v.eval demo             # configs/demo.yaml's settings: DPM-Solver++ 25 steps,
                                        # guidance 5 at timesteps 600-999
    python -m t2v.eval demo --guidance-interval 0 999       # guidance at every step
    python -m t2v.eval demo --sampler ddim --steps 50 --json ddim50.json
    python -m t2v.eval demo --dtype bfloat16
    python -m t2v.eval demo --frames 64 --window 8 --window-overlap 4   # direction per window
    python -m t2v.eval demo --lora runs/orange/lora.safetensors --colours orange
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from t2v.atomic import atomic_path
from t2v.cli.flags import add_option_flags, options_from_args
from t2v.config import ScheduleConfig, config_to_dict
from t2v.errors import NumericalError, OneLineParser, UserError, fail
from t2v.loading.weights import DEMO_SOURCE
from t2v.models.lora import parse_lora_arg
from t2v.noise import randn
from t2v.pipeline.options import GenerationOptions, load_config
from t2v.pipeline.text_to_video import TextToVideo
from t2v.sampling.schedule import noise_schedule
from t2v.sampling.windows import reschedule_noise
from t2v.training.synthetic import (
    BACKGROUNDS,
    COLOURS,
    EXTRA_COLOURS,
    HELDOUT,
    TRAINED,
    Attributes,
    SyntheticClips,
    all_combinations,
)

OBJECT_DISTANCE = 80.0  # RGB distance from the background that counts as object
MIN_BLOB_PIXELS = 4  # smaller specks are not blobs
MAX_OBJECT_FRACTION = 0.4  # a blob over this share of the frame is not an object (objects: <17%)
# Shape boundaries: midpoints of the gaps between the shapes' ranges measured on 360 rendered
# clips and on the same clips through the demo VAE (encode, decode); docs/quality.md.
TRIANGLE_SKEW = -0.245  # vertical skewness: triangles -0.59..-0.44, circles, squares -0.05..0.04
SQUARE_CORNERS = 1.13  # diagonal / axis kurtosis: circles 0.98..1.05, squares 1.21..1.34
MIN_TRAVEL = 2.0  # pixels over the clip (at 32x32); less is "still"
JITTER_LIMIT = 1.0  # pixels; a consistent video stays under this and one blob per frame
EVAL_SEED_BASE = 1_000_000  # eval seeds: EVAL_SEED_BASE + i; training never draws these
DEFAULT_SEEDS = {"trained": 1, "heldout": 2}  # seeds per caption of each split
# The evaluation's generation options: configs/demo.yaml's sample section (DPM-Solver++ 25
# steps, guidance 5 at timesteps 600-999, 8 frames at 32x32); flags change them.
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def demo_options(**changes) -> GenerationOptions:
    """configs/demo.yaml's generation options, with `changes` (option field names)."""
    return dataclasses.replace(load_config(DEMO_CONFIG).sample, **changes)


@dataclass(frozen=True)
class EvalSettings:
    """One evaluation run: the generation options and what the options do not hold."""

    options: GenerationOptions = field(default_factory=demo_options)
    dtype: str = "float32"
    weights: str = DEMO_SOURCE
    lora: tuple[str, ...] = ()
    emphasis: float | None = None  # weight the colour word: "a (red:W) circle ..."

    def record(self) -> dict:
        """The settings as the report stores them (options without the prompt fields)."""
        options = {k: v for k, v in config_to_dict(self.options).items()
                   if k not in ("prompt", "negative_prompt", "seed") or v}
        return {**options, "dtype": self.dtype, "weights": str(self.weights),
                "lora": list(self.lora), "emphasis": self.emphasis}


@dataclass
class Prediction:
    background: str
    colour: str
    shape: str
    direction: str
    one_blob: bool  # one blob in every frame
    jitter: float  # pixels
    fill: float  # median fill ratio of the object's bounding box (reported, not used)
    corners: float  # median diagonal / axis kurtosis of the soft mask (square: ~1.3)
    skew: float  # median vertical skewness of the soft mask (triangle pointing up: ~-0.57)
    travel: tuple[float, float]  # (dy, dx) over the clip, pixels


def blobs(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask with at least MIN_BLOB_PIXELS pixels,
    largest first, as (n, 2) arrays of (y, x)."""
    seen = np.zeros_like(mask)
    found = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(pixels) >= MIN_BLOB_PIXELS:
            found.append(np.array(pixels))
    return sorted(found, key=len, reverse=True)


def _nearest(value: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [np.linalg.norm(value - np.array(palette[n], dtype=np.float64)) for n in names]
    return names[int(np.argmin(distances))]


def shape_moments(distance: np.ndarray, pixels: np.ndarray) -> tuple[float, float]:
    """(corners, skew) of one frame's object: `distance` (H, W) from the background, `pixels`
    (n, 2) its blob. The soft mask is distance over the blob's peak (90th percentile), clipped
    to [0, 1], on the blob grown by one pixel (its anti-aliased or blurred rim). corners: mean
    kurtosis of the mask's projections onto the two diagonals over that onto the two axes
    (uniform square 1.33, disc 1, blur moves both towards 1 slowly); skew: skewness of its
    vertical projection (a triangle with its apex up: -0.57, symmetric shapes 0)."""
    h, w = distance.shape
    blob = np.zeros((h, w), dtype=bool)
    blob[pixels[:, 0], pixels[:, 1]] = True
    grown = blob.copy()
    grown[1:] |= blob[:-1]
    grown[:-1] |= blob[1:]
    grown[:, 1:] |= blob[:, :-1]
    grown[:, :-1] |= blob[:, 1:]
    peak = np.percentile(distance[blob], 90)
    alpha = np.clip(distance / peak, 0.0, 1.0) * grown
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    area = alpha.sum()
    y = yy - (alpha * yy).sum() / area
    x = xx - (alpha * xx).sum() / area

    def moment(p, n):
        return (alpha * p ** n).sum() / area

    def variance(p):  # a one-pixel-thin blob has none along its thin axis
        return max(moment(p, 2), 1e-9)

    def kurtosis(p):
        return moment(p, 4) / variance(p) ** 2

    corners = (kurtosis((x + y) / np.sqrt(2)) + kurtosis((x - y) / np.sqrt(2))) / \
        (kurtosis(x) + kurtosis(y))
    return float(corners), float(moment(y, 3) / variance(y) ** 1.5)


def classify(video: np.ndarray) -> Prediction:
    """uint8 (F, H, W, 3) -> the attributes it shows."""
    video = video.astype(np.float64)
    f, h, w, _ = video.shape
    border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1)
    background_rgb = np.median(border.reshape(-1, 3), axis=0)
    background = _nearest(background_rgb, BACKGROUNDS)
    distance = np.linalg.norm(video - background_rgb, axis=-1)  # (F, H, W)
    palette = {**COLOURS, **EXTRA_COLOURS}
    centroids, fills, moments, colours, one_blob = [], [], [], [], True
    for i in range(f):
        found = blobs(distance[i] > OBJECT_DISTANCE)
        if len(found) != 1 or len(found[0]) > MAX_OBJECT_FRACTION * h * w:
            one_blob = False
        found = [b for b in found if len(b) <= MAX_OBJECT_FRACTION * h * w]
        if not found:
            continue
        pixels = found[0]
        ys, xs = pixels[:, 0], pixels[:, 1]
        centroids.append((i, ys.mean(), xs.mean()))
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(len(pixels) / box)
        moments.append(shape_moments(distance[i], pixels))
        core = distance[i, ys, xs] >= 0.7 * distance[i, ys, xs].max()
        colours.append(video[i, ys[core], xs[core]].mean(axis=0))
    if not centroids:
        return Prediction(background, "none", "none", "none", False, float("inf"), 0.0, 0.0,
                          0.0, (0.0, 0.0))
    colour = _nearest(np.median(np.array(colours), axis=0), palette)
    fill = float(np.median(fills))
    corners, skew = (float(v) for v in np.median(np.array(moments), axis=0))
    shape = "triangle" if skew < TRIANGLE_SKEW else \
        "square" if corners > SQUARE_CORNERS else "circle"
    track = np.array(centroids)  # (n, 3): frame, y, x
    direction, jitter, travel = "still", 0.0, (0.0, 0.0)
    if len(track) >= 2:
        frames = track[:, 0]
        design = np.stack([frames, np.ones_like(frames)], axis=1)
        coef, *_ = np.linalg.lstsq(design, track[:, 1:], rcond=None)  # (2, 2): slope, offset
        residual = track[:, 1:] - design @ coef
        jitter = float(np.sqrt((residual ** 2).sum(axis=1).mean()))
        scale = 32 / max(h, w)
        dy, dx = coef[0] * (f - 1)
        travel = (float(dy), float(dx))
        if max(abs(dy), abs(dx)) * scale >= MIN_TRAVEL:
            if abs(dx) >= abs(dy):
                direction = "right" if dx > 0 else "left"
            else:
                direction = "down" if dy > 0 else "up"
    return Prediction(background, colour, shape, direction, one_blob and len(track) == f,
                      jitter, fill, corners, skew, travel)


def window_predictions(video: np.ndarray, window: int, stride: int) -> list[Prediction]:
    """classify() of each `window`-frame segment (segments `stride` apart)."""
    starts = range(0, max(len(video) - window, 0) + 1, stride)
    return [classify(video[s:s + window]) for s in starts]


def window_directions(video: np.ndarray, window: int, stride: int) -> list[str]:
    """The direction of each `window`-frame segment (segments `stride` apart)."""
    return [p.direction for p in window_predictions(video, window, stride)]


def window_colours(video: np.ndarray, window: int, stride: int) -> list[str]:
    """The colour of each `window`-frame segment: where a prompt schedule
    (t2v.sampling.prompt_travel) changes the colour."""
    return [p.colour for p in window_predictions(video, window, stride)]


@dataclass(frozen=True)
class Case:
    attributes: Attributes
    seed: int
    split: str  # trained / heldout / new (combinations of colours the base model never saw)


def cases(seeds: dict[str, int] | None = None, colours: tuple[str, ...] = (),
          split: str = "both") -> list[Case]:
    """The fixed evaluation list: every trained and held-out combination, with seeds
    EVAL_SEED_BASE + k (k counts over the whole list); or every combination of `colours`.
    `split` keeps only "trained" or "heldout" cases (their seeds unchanged)."""
    seeds = seeds or DEFAULT_SEEDS
    if colours:
        groups = [("new" if c in EXTRA_COLOURS else "trained", all_combinations((c,)))
                  for c in colours]
        plan = [(name, combos, max(seeds.values())) for name, combos in groups]
    else:
        plan = [("trained", TRAINED, seeds["trained"]), ("heldout", HELDOUT, seeds["heldout"])]
    out, k = [], 0
    for name, combos, n in plan:
        for a in combos:
            for _ in range(n):
                out.append(Case(a, EVAL_SEED_BASE + k, name))
                k += 1
    return out if split == "both" else [c for c in out if c.split == split]


def score(results: list[tuple[Case, Prediction]]) -> dict:
    """Accuracy per attribute and split, consistency figures."""
    report = {}
    for split in dict.fromkeys(c.split for c, _ in results):
        rows = [(c, p) for c, p in results if c.split == split]
        a = [c.attributes for c, _ in rows]
        p = [p for _, p in rows]
        n = len(rows)

        def rate(values):
            return round(100.0 * sum(values) / n, 1)

        report[split] = {
            "videos": n,
            "colour": rate(x.colour == y.colour for x, y in zip(a, p)),
            "shape": rate(x.shape == y.shape for x, y in zip(a, p)),
            "direction": rate(x.motion == y.direction for x, y in zip(a, p)),
            "background": rate(x.background == y.background for x, y in zip(a, p)),
            "all": rate(x.colour == y.colour and x.shape == y.shape and x.motion == y.direction
                        and x.background == y.background for x, y in zip(a, p)),
            "one_blob": rate(y.one_blob for y in p),
            "consistent": rate(y.one_blob and y.jitter < JITTER_LIMIT for y in p),
            "jitter_px": round(float(np.mean([min(y.jitter, 99.0) for y in p])), 3),
        }
    return report


def background_trace(pipe, count: int = 32, seed: int = 99) -> torch.Tensor:
    """What ms-1.7b's noise schedule leaves of a clip's background in x_T: sqrt(alpha_bar_T)
    of that schedule (0.068) times half the difference between the mean latent channel values
    of white- and black-background clips (`count` clips of data seed `seed`, the VAE's
    posterior means, scaled), shape (C,). Added to initial noise (towards white) or subtracted
    (towards black), it tests whether a model takes the background from the noise instead of
    the prompt (docs/demo.md, "Why zero terminal SNR")."""

    clips = SyntheticClips(seed=seed, count=count)
    means = {"white": [], "black": []}
    for i in range(count):
        video, _ = clips.load(i)
        latents = pipe.vae.encode_video(video[None].to(pipe.device), sample=False)
        means[clips.clips[i].attributes.background].append(latents[0].float().mean((1, 2, 3)))
    difference = torch.stack(means["white"]).mean(0) - torch.stack(means["black"]).mean(0)
    return noise_schedule(ScheduleConfig()).alphas_cumprod[-1].sqrt() * difference / 2


def emphasised_caption(a: Attributes, weight: float) -> str:
    """The caption with its colour word weighted in A1111's syntax: "a (red:1.3) circle ..."."""
    return f"a ({a.colour}:{weight:g}) " + a.caption.removeprefix(f"a {a.colour} ")


def generate(pipe, batch: list[Case], settings: EvalSettings) -> np.ndarray:
    """uint8 (B, F, H, W, 3) for a batch of cases; each video's noise from its own seed."""
    o = settings.options
    f = pipe.vae_scale_factor
    latent_shape = (pipe.config.unet.in_channels, o.num_frames, o.height // f, o.width // f)
    if o.window is not None and o.freenoise:
        window, overlap = o.window, o.window_overlap
        noise = [reschedule_noise(randn((1, *latent_shape), g), window, window - overlap, g)[0]
                 for g in (torch.Generator().manual_seed(c.seed) for c in batch)]
    else:
        noise = [randn(latent_shape, torch.Generator().manual_seed(c.seed)) for c in batch]
    # Later draws (DDIM with eta > 0) from per-video generators too: a case is reproducible.
    later = [torch.Generator().manual_seed(c.seed + EVAL_SEED_BASE) for c in batch]
    emphasis = settings.emphasis
    captions = [c.attributes.caption if not emphasis else
                emphasised_caption(c.attributes, emphasis) for c in batch]
    options = dataclasses.replace(o, prompt="", seed=None,
                                  prompt_weighting=o.prompt_weighting or bool(emphasis))
    result = pipe(captions, options, latents=torch.stack(noise), generator=later,
                  progress=False)
    return result.frames.cpu().numpy()


def evaluate(pipe, settings: EvalSettings, case_list: list[Case], batch_size: int = 20,
             keep_videos: bool = False) -> dict:
    """Generate and classify every case; the report (settings, per-split scores, rows)."""
    results, videos, windows = [], [], []
    start = time.perf_counter()
    for i in range(0, len(case_list), batch_size):
        batch = case_list[i:i + batch_size]
        frames = generate(pipe, batch, settings)
        for case, video in zip(batch, frames):
            results.append((case, classify(video)))
            o = settings.options
            if o.window is not None:
                windows.append(window_directions(video, o.window, o.window - o.window_overlap))
            if keep_videos:
                videos.append(video)
    seconds = time.perf_counter() - start
    report = {"settings": settings.record(), "seconds": round(seconds, 1), "scores": score(results),
              "rows": [{"caption": c.attributes.caption, "seed": c.seed, "split": c.split,
                        **{k: v for k, v in asdict(p).items()}} for c, p in results]}
    if windows:
        held = [sum(d == c.attributes.motion for d in dirs) / len(dirs)
                for (c, _), dirs in zip(results, windows)]
        report["window_direction"] = {
            "segments_per_video": len(windows[0]),
            "segments_correct": round(100.0 * float(np.mean(held)), 1),
            "videos_all_segments_correct": round(100.0 * float(np.mean(
                [h == 1.0 for h in held])), 1)}
        for row, dirs in zip(report["rows"], windows):
            row["window_directions"] = dirs
    if keep_videos:
        report["videos"] = videos
    return report


def settings_line(s: dict) -> str:
    """The report's settings in one line (the options that differ from plain sampling)."""
    parts = [f"sampler {s['sampler']}, {s['steps']} steps, guidance {s['guidance_scale']}, "
             f"dtype {s['dtype']}, {s['num_frames']} frames at {s['width']}x{s['height']}"]
    optional = (("window", lambda: f"window {s['window']}/{s['window_overlap']}"),
                ("lora", lambda: f"LoRA {s['lora']}"),
                ("guidance_rescale", lambda: f"guidance rescale {s['guidance_rescale']}"),
                ("guidance_interval", lambda: f"guided at t in {s['guidance_interval']}"),
                ("freeu", lambda: f"FreeU {s['freeu']}"),
                ("free_init", lambda: f"FreeInit {s['free_init']['num_iters']} passes"
                 if s["free_init"]["num_iters"] else ""),
                ("emphasis", lambda: f"colour word weighted {s['emphasis']}"),
                ("cache_interval", lambda: f"DeepCache interval {s['cache_interval']} branch "
                 f"{s['cache_branch']}" if s["cache_interval"] > 1 else ""),
                ("thresholding", lambda: f"thresholding (max {s['sample_max_value']})"))
    parts += [text() for key, text in optional if s.get(key)]
    return ", ".join(p for p in parts if p)


def format_table(report: dict) -> str:
    lines = [f"{settings_line(report['settings'])}; {report['seconds']} s",
             "split     videos  colour  shape  direction  background  all    one blob  "
             "consistent  jitter px"]
    for split, r in report["scores"].items():
        lines.append(f"{split:<9} {r['videos']:>6}  {r['colour']:>6}  {r['shape']:>5}  "
                     f"{r['direction']:>9}  {r['background']:>10}  {r['all']:>5}  "
                     f"{r['one_blob']:>8}  {r['consistent']:>10}  {r['jitter_px']:>9}")
    if "window_direction" in report:
        w = report["window_direction"]
        lines.append(f"windows: {w['segments_per_video']} segments per video, "
                     f"{w['segments_correct']}% in the prompted direction, "
                     f"{w['videos_all_segments_correct']}% of videos correct in every segment")
    return "\n".join(lines)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_demo_pipeline(source: str, dtype: str = "float32", loras: tuple[str, ...] = ()):
    pipe = TextToVideo.from_pretrained(source, dtype=DTYPES[dtype],
                                       vae_dtype=torch.float32)
    if loras:

        for spec in loras:
            pipe.load_lora(*parse_lora_arg(spec))
    return pipe


def build_parser() -> argparse.ArgumentParser:
    """The evaluation's own flags, then every generation option's flag (t2v.cli.flags),
    defaulting to configs/demo.yaml's values."""
    parser = OneLineParser(prog="python -m t2v.eval",
                           description="Prompt-following evaluation of the demo model.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", choices=["demo"], help="what to evaluate")
    parser.add_argument("--weights", default=DEMO_SOURCE,
                        help="a weights folder of the demo architecture")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--emphasis", type=float, default=None, metavar="W",
                        help="weight the colour word: 'a (red:W) circle ...' (prompt weighting)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]")
    parser.add_argument("--colours", nargs="+", default=(),
                        help="evaluate every combination of these colours instead (e.g. orange)")
    parser.add_argument("--split", default="both", choices=["both", "trained", "heldout"],
                        help="which combinations to evaluate")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per caption (default: 1 trained, 2 held out)")
    parser.add_argument("--batch", type=int, default=20, help="videos per pipeline call")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--overwrite", action="store_true")
    add_option_flags(parser.add_argument_group("generation (configs/demo.yaml's sample "
                                               "section)"), demo_options())
    return parser


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    if args.batch < 1:
        raise UserError("--batch must be >= 1")
    if args.json is not None and args.json.exists() and not args.overwrite:
        raise UserError(f"{args.json}: already exists; pass --overwrite to replace it")
    unknown = [c for c in args.colours if c not in {**COLOURS, **EXTRA_COLOURS}]
    if unknown:
        raise UserError(f"--colours: unknown {unknown}; known: "
                        f"{sorted({**COLOURS, **EXTRA_COLOURS})}")
    return EvalSettings(options_from_args(args, demo_options()), args.dtype, str(args.weights),
                        tuple(args.lora), args.emphasis)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        settings = settings_from_args(args)
        pipe = load_demo_pipeline(settings.weights, settings.dtype, settings.lora)
        seeds = {"trained": args.seeds, "heldout": args.seeds} if args.seeds else None
        report = evaluate(pipe, settings, cases(seeds, tuple(args.colours), args.split),
                          args.batch)
    except (UserError, NumericalError) as exc:
        return fail(exc)
    print(format_table(report))
    if args.json is not None:
        with atomic_path(args.json, overwrite=args.overwrite) as tmp:
            tmp.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
