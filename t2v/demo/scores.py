"""The evaluation's figures: per split, each rate with its Wilson interval, each per-video mean
with its interval, and the paired difference between two runs on the same cases.

RATES are shares of videos (%), MEANS averages per video; both are computed from (the
caption's attributes, the Prediction) of each video, so a saved report's rows give the same
figures again (`from_rows`). docs/quality.md defines each one.
"""

from __future__ import annotations

import math
from dataclasses import fields

from t2v.demo.classify import JITTER_LIMIT, Prediction
from t2v.demo.statistics import mean_interval, paired_difference, wilson
from t2v.errors import UserError
from t2v.training.synthetic import Attributes, parse_caption

RATES = {  # name -> (label, is this video right?)
    "colour": ("colour", lambda a, p: p.colour == a.colour),
    "shape": ("shape", lambda a, p: p.shape == a.shape),
    "direction": ("direction", lambda a, p: p.direction == a.motion),
    "background": ("background", lambda a, p: p.background == a.background),
    "all": ("all four", lambda a, p: (p.colour, p.shape, p.direction, p.background)
            == (a.colour, a.shape, a.motion, a.background)),
    "shape_clear": ("shape, clear", lambda a, p: p.shape == a.shape and not p.ambiguous),
    "ambiguous": ("shape ambiguous", lambda a, p: p.ambiguous),
    "colour_every_frame": ("colour in every frame",
                           lambda a, p: all(c == a.colour for c in p.frame_colours)),
    "shape_every_frame": ("shape in every frame",
                          lambda a, p: all(s == a.shape for s in p.frame_shapes)),
    "one_blob": ("one blob", lambda a, p: p.one_blob),
    "consistent": ("consistent", lambda a, p: p.one_blob and p.jitter < JITTER_LIMIT),
}
MEANS = {  # name -> (label, the video's value; NaN: the video has none)
    "colour_flips": ("colour flips", lambda p: float(p.colour_flips)),
    "shape_flips": ("shape flips", lambda p: float(p.shape_flips)),
    "speed_variation": ("speed variation", lambda p: p.speed_variation),
    "jitter_px": ("jitter px", lambda p: min(p.jitter, 99.0)),
}
ATTRIBUTE_TABLE = ("colour", "shape", "direction", "background", "all", "one_blob",
                   "consistent", "jitter_px")
FRAME_TABLE = ("colour_every_frame", "shape_every_frame", "colour_flips", "shape_flips",
               "speed_variation", "shape_clear", "ambiguous")
COMPARED = ("colour", "shape", "direction", "background", "all", "shape_clear",
            "colour_every_frame", "shape_every_frame", "consistent")


def score(results: list[tuple]) -> dict:
    """results: (case, Prediction) pairs, each case with .attributes and .split. Per split:
    the number of videos, each RATE in % and each MEAN, and `interval`: their 95% intervals."""
    report = {}
    for split in dict.fromkeys(c.split for c, _ in results):
        rows = [(c.attributes, p) for c, p in results if c.split == split]
        n = len(rows)
        entry, interval = {"videos": n}, {}
        for name, (_, right) in RATES.items():
            k = sum(bool(right(a, p)) for a, p in rows)
            entry[name] = round(100.0 * k / n, 1)
            interval[name] = [round(100.0 * v, 1) for v in wilson(k, n)]
        for name, (_, value) in MEANS.items():
            mean, low, high = mean_interval([value(p) for _, p in rows])
            entry[name] = _round(mean)
            interval[name] = [_round(low), _round(high)]
        entry["interval"] = interval
        report[split] = entry
    return report


def _round(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)


def from_rows(rows: list[dict]) -> list[tuple[str, int, str, Attributes, Prediction]]:
    """A saved report's rows -> (caption, seed, split, attributes, prediction)."""
    names = {f.name for f in fields(Prediction)}
    out = []
    for row in rows:
        p = Prediction(**{k: v for k, v in row.items() if k in names})
        p.frame_colours, p.frame_shapes = tuple(p.frame_colours), tuple(p.frame_shapes)
        out.append((row["caption"], row["seed"], row["split"], parse_caption(row["caption"]), p))
    return out


def compare(reference: dict, report: dict) -> dict:
    """Paired differences report - reference (points, 95% Newcombe interval) per split for
    each COMPARED rate, on the cases both reports hold; they must be the same cases."""
    ours = {(c, s): (split, a, p) for c, s, split, a, p in from_rows(report["rows"])}
    theirs = {(c, s): (split, a, p) for c, s, split, a, p in from_rows(reference["rows"])}
    if set(ours) != set(theirs):
        raise UserError(f"the two reports hold different cases ({len(set(ours) ^ set(theirs))} "
                        "not in both): compare runs of the same --set, --split and --seeds")
    out = {}
    for split in dict.fromkeys(v[0] for v in ours.values()):
        keys = [k for k, v in ours.items() if v[0] == split]
        entry = {"videos": len(keys)}
        for name in COMPARED:
            right = RATES[name][1]
            first = [right(theirs[k][1], theirs[k][2]) for k in keys]
            second = [right(ours[k][1], ours[k][2]) for k in keys]
            entry[name] = [round(100.0 * v, 1) for v in paired_difference(first, second)]
        out[split] = entry
    return out


def cell(entry: dict, name: str) -> str:
    """'97.5 (96.0-98.5)': a figure and its interval."""
    value, (low, high) = entry[name], entry["interval"][name]
    if value is None:
        return "-"
    if name in MEANS:
        return f"{value:.2f} ({low:.2f}-{high:.2f})"
    return f"{value:.1f} ({low:.1f}-{high:.1f})"


def difference_cell(values) -> str:
    """'+1.5 (-0.8, +3.9)': a paired difference in points and its interval."""
    d, low, high = values
    return f"{d:+.1f} ({low:+.1f}, {high:+.1f})"


def _label(name: str) -> str:
    return (RATES.get(name) or MEANS[name])[0]


def text_tables(scores: dict) -> list[str]:
    """The attribute and frame-level tables, plain text, one row per split."""
    lines = []
    for columns in (ATTRIBUTE_TABLE, FRAME_TABLE):
        cells = [["split", "videos"] + [_label(n) for n in columns]]
        cells += [[split, str(s["videos"])] + [cell(s, n) for n in columns]
                  for split, s in scores.items()]
        lines += _aligned(cells) + [""]
    return lines[:-1]


def markdown_tables(reports: list[dict]) -> str:
    """docs/quality.md's tables of several reports (one row per report and split; `label` is
    each report's row label): attributes, frame-level figures, and where a report carries
    `difference` (paired against the default), those."""
    out = []
    for columns in (ATTRIBUTE_TABLE, FRAME_TABLE):
        head = ["setting", "split", "videos"] + [_label(n) for n in columns] + ["seconds"]
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for r in reports:
            for split, s in r["scores"].items():
                lines.append("| " + " | ".join([r["label"], split, str(s["videos"])]
                                               + [cell(s, n) for n in columns]
                                               + [str(r["seconds"])]) + " |")
        out.append("\n".join(lines))
    compared = [r for r in reports if r.get("difference")]
    if compared:
        head = ["paired difference from the default, points (95% interval)", "split",
                "videos"] + [_label(n) for n in COMPARED]
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for r in compared:
            for split, d in r["difference"].items():
                lines.append("| " + " | ".join([r["label"], split, str(d["videos"])]
                                               + [difference_cell(d[n]) for n in COMPARED])
                             + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def text_differences(difference: dict) -> list[str]:
    """The paired differences, plain text, one row per split."""
    cells = [["split", "videos"] + [_label(n) for n in COMPARED]]
    cells += [[split, str(d["videos"])] + [difference_cell(d[n]) for n in COMPARED]
              for split, d in difference.items()]
    return _aligned(cells)


def _aligned(cells: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
