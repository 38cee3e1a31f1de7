"""What a demo-model video shows, by plain image analysis (numpy, no learned model).

    background  the median colour of the frame border, nearest of t2v.training.synthetic.BACKGROUNDS
    object      pixels farther than OBJECT_DISTANCE from the background colour; blobs are
                4-connected components of at least MIN_BLOB_PIXELS pixels; the object is the
                largest blob of at most MAX_OBJECT_FRACTION of the frame
    colour      per frame, the object's mean colour (pixels at least 70% of the way from the
                background), nearest palette colour (COLOURS and EXTRA_COLOURS); the video's
                colour is that of the median of those means
    shape       from the moments of the object's soft mask (its distance from the background
                over its peak, clipped to [0, 1]): a triangle (pointing up) is skewed along
                the vertical (TRIANGLE_SKEW); a square's projections onto the diagonals are
                more peaked than onto the axes (`corners`, SQUARE_CORNERS); a circle is
                neither. Per frame, and for the video from the medians over frames. Both
                survive the VAE's blur, which rounds a square's corners in pixels
                (docs/quality.md, "The shape rule")
    ambiguous   the video's moments fall in a gap between the shapes' ranges on rendered
                clips through the demo VAE (SKEW_GAP, CORNERS_GAP): its shape is read by the
                midpoint rule above but is not clear
    direction   the centroid track's least-squares velocity; the larger axis and its sign
                (still, if the object moves less than MIN_TRAVEL pixels over the clip)
    consistency one blob in every frame, and frame-to-frame jitter: the RMS distance of the
                centroids from the fitted straight-line track, in pixels
    smoothness  speed_variation: the coefficient of variation (std / mean) of the frame-to-frame
                speed of the soft mask's centre (sub-pixel); NaN for an object that hardly
                moves (MIN_SPEED)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from t2v.training.synthetic import BACKGROUNDS, COLOURS, EXTRA_COLOURS, all_combinations, render

OBJECT_DISTANCE = 80.0  # RGB distance from the background that counts as object
MIN_BLOB_PIXELS = 4  # smaller specks are not blobs
MAX_OBJECT_FRACTION = 0.4  # a blob over this share of the frame is not an object (objects: <17%)
# Shape boundaries: midpoints of the gaps between the shapes' ranges measured on 360 rendered
# clips and on the same clips through the demo VAE (encode, decode); docs/quality.md. Every
# frame of those clips is read right by the same two numbers (per-frame ranges: triangles'
# skew up to -0.40, circles' corners up to 1.10, squares' from 1.20).
TRIANGLE_SKEW = -0.245  # vertical skewness: triangles -0.59..-0.44, circles, squares -0.05..0.04
SQUARE_CORNERS = 1.13  # diagonal / axis kurtosis: circles 0.98..1.07, squares 1.21..1.34
# The gaps themselves: the video medians of rendered clips through the shipped VAE (every
# combination x 3, data seed SHAPE_GAP_SEED; `shape_gaps` measures them, tests/test_demo.py
# checks these numbers against it). A generated video whose moments fall inside is "ambiguous".
SHAPE_GAP_SEED = 777
SKEW_GAP = (-0.442, -0.053)  # triangles up to -0.442; circles and squares from -0.053
CORNERS_GAP = (1.071, 1.212)  # circles up to 1.071; squares from 1.212
MIN_TRAVEL = 2.0  # pixels over the clip (at 32x32); less is "still"
MIN_SPEED = 0.25  # pixels per frame (at 32x32): slower objects have no speed variation
JITTER_LIMIT = 1.0  # pixels; a consistent video stays under this and one blob per frame


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
    ambiguous: bool = False  # (corners, skew) inside a gap between the shapes' ranges
    frame_colours: tuple[str, ...] = ()  # per frame; "none" where no object was found
    frame_shapes: tuple[str, ...] = ()
    speed_variation: float = float("nan")  # std / mean of the frame-to-frame speed

    @property
    def colour_flips(self) -> int:
        """How often the colour changes from one frame to the next."""
        return flips(self.frame_colours)

    @property
    def shape_flips(self) -> int:
        return flips(self.frame_shapes)


def flips(labels) -> int:
    return sum(a != b for a, b in zip(labels, labels[1:]))


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


def soft_mask(distance: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1]: `distance` over the blob's peak (90th percentile), clipped, on the
    blob (`pixels`, (n, 2)) grown by one pixel (its anti-aliased or blurred rim)."""
    h, w = distance.shape
    blob = np.zeros((h, w), dtype=bool)
    blob[pixels[:, 0], pixels[:, 1]] = True
    grown = blob.copy()
    grown[1:] |= blob[:-1]
    grown[:-1] |= blob[1:]
    grown[:, 1:] |= blob[:, :-1]
    grown[:, :-1] |= blob[:, 1:]
    peak = np.percentile(distance[blob], 90)
    return np.clip(distance / peak, 0.0, 1.0) * grown


def soft_centroid(distance: np.ndarray, pixels: np.ndarray) -> tuple[float, float]:
    """(y, x) of the soft mask's centre: sub-pixel, unlike the blob's pixel mean."""
    alpha = soft_mask(distance, pixels)
    yy, xx = np.mgrid[0:alpha.shape[0], 0:alpha.shape[1]]
    return float((alpha * yy).sum() / alpha.sum()), float((alpha * xx).sum() / alpha.sum())


def shape_moments(distance: np.ndarray, pixels: np.ndarray) -> tuple[float, float]:
    """(corners, skew) of one frame's object: `distance` (H, W) from the background, `pixels`
    (n, 2) its blob, from its soft mask (`soft_mask`). corners: mean
    kurtosis of the mask's projections onto the two diagonals over that onto the two axes
    (uniform square 1.33, disc 1, blur moves both towards 1 slowly); skew: skewness of its
    vertical projection (a triangle with its apex up: -0.57, symmetric shapes 0)."""
    h, w = distance.shape
    alpha = soft_mask(distance, pixels)
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


def shape_of(corners: float, skew: float) -> str:
    """The midpoint rule: triangle, square or circle."""
    return "triangle" if skew < TRIANGLE_SKEW else \
        "square" if corners > SQUARE_CORNERS else "circle"


def in_gap(corners: float, skew: float) -> bool:
    """True if the moments fall between the shapes' ranges on rendered clips through the VAE."""
    if SKEW_GAP[0] < skew < SKEW_GAP[1]:
        return True
    return skew >= SKEW_GAP[1] and CORNERS_GAP[0] < corners < CORNERS_GAP[1]


def object_moments(video: np.ndarray) -> list[tuple[float, float] | None]:
    """(corners, skew) of each frame's object (None where there is none), for `shape_gaps`."""
    video = video.astype(np.float64)
    background_rgb = _border_median(video)
    distance = np.linalg.norm(video - background_rgb, axis=-1)
    out = []
    for frame in distance:
        found = [b for b in blobs(frame > OBJECT_DISTANCE)
                 if len(b) <= MAX_OBJECT_FRACTION * frame.size]
        out.append(shape_moments(frame, found[0]) if found else None)
    return out


def _border_median(video: np.ndarray) -> np.ndarray:
    border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1)
    return np.median(border.reshape(-1, 3), axis=0)


def classify(video: np.ndarray) -> Prediction:
    """uint8 (F, H, W, 3) -> the attributes it shows."""
    video = video.astype(np.float64)
    f, h, w, _ = video.shape
    background_rgb = _border_median(video)
    background = _nearest(background_rgb, BACKGROUNDS)
    distance = np.linalg.norm(video - background_rgb, axis=-1)  # (F, H, W)
    palette = {**COLOURS, **EXTRA_COLOURS}
    centroids, soft, fills, moments, colours, one_blob = [], [], [], [], [], True
    frame_colours, frame_shapes = ["none"] * f, ["none"] * f
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
        soft.append((i, *soft_centroid(distance[i], pixels)))
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(len(pixels) / box)
        moments.append(shape_moments(distance[i], pixels))
        core = distance[i, ys, xs] >= 0.7 * distance[i, ys, xs].max()
        colours.append(video[i, ys[core], xs[core]].mean(axis=0))
        frame_colours[i] = _nearest(colours[-1], palette)
        frame_shapes[i] = shape_of(*moments[-1])
    if not centroids:
        return Prediction(background, "none", "none", "none", False, float("inf"), 0.0, 0.0,
                          0.0, (0.0, 0.0), False, tuple(frame_colours), tuple(frame_shapes))
    colour = _nearest(np.median(np.array(colours), axis=0), palette)
    fill = float(np.median(fills))
    corners, skew = (float(v) for v in np.median(np.array(moments), axis=0))
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
    return Prediction(background, colour, shape_of(corners, skew), direction,
                      one_blob and len(track) == f, jitter, fill, corners, skew, travel,
                      in_gap(corners, skew), tuple(frame_colours), tuple(frame_shapes),
                      speed_variation(np.array(soft), 32 / max(h, w)))


def speed_variation(track: np.ndarray, scale: float) -> float:
    """std / mean of the centroid's speed between consecutive frames that both show the
    object; `track` (n, 3) rows of (frame, y, x). NaN for fewer than two such steps or a mean
    speed under MIN_SPEED (in 32x32 pixels: `scale` converts)."""
    steps = np.diff(track, axis=0)
    consecutive = steps[:, 0] == 1
    speeds = np.linalg.norm(steps[consecutive, 1:], axis=1) * scale
    if len(speeds) < 2 or speeds.mean() < MIN_SPEED:
        return float("nan")
    return float(speeds.std() / speeds.mean())


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


def vae_round_trip(vae, clips: np.ndarray) -> np.ndarray:
    """uint8 (B, F, H, W, 3) clips -> the same through `vae`'s encoder (posterior mean) and
    decoder, uint8: what any generated video has been through."""
    video = torch.from_numpy(clips).float().permute(0, 4, 1, 2, 3) / 127.5 - 1
    with torch.no_grad():
        decoded = vae.decode_video(vae.encode_video(video, sample=False))
    return ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).numpy()


def shape_gaps(vae, seed: int = SHAPE_GAP_SEED, per_combination: int = 3) -> dict:
    """The gaps between the shapes' video-median moments on rendered clips through `vae`
    (every combination `per_combination` times, data seed `seed`): {"skew": (triangles' max,
    the others' min), "corners": (circles' max, squares' min)}, rounded to 3 decimals. These
    are SKEW_GAP and CORNERS_GAP for the shipped VAE (docs/quality.md, "The shape rule")."""
    rng = np.random.default_rng(seed)
    combos = [a for a in all_combinations() for _ in range(per_combination)]
    clips = np.stack([render(a, rng) for a in combos])
    medians = {"circle": [], "square": [], "triangle": []}
    for a, video in zip(combos, vae_round_trip(vae, clips)):
        moments = [m for m in object_moments(video) if m is not None]
        medians[a.shape].append(np.median(np.array(moments), axis=0))
    m = {k: np.array(v) for k, v in medians.items()}  # (n, 2): corners, skew
    return {"skew": (round(float(m["triangle"][:, 1].max()), 3),
                     round(float(min(m["circle"][:, 1].min(), m["square"][:, 1].min())), 3)),
            "corners": (round(float(m["circle"][:, 0].max()), 3),
                        round(float(m["square"][:, 0].min()), 3))}
