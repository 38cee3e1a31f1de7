"""python -m t2v.demo.quality_grid: the demo-model measurements of docs/quality.md, in one command.

    python -m t2v.demo.quality_grid --out runs/quality            # every row, then grid.md
    python -m t2v.demo.quality_grid --out runs/quality --only default bf16 freeu

Each row of GRID is `python -m t2v.eval demo` with one setting changed from the default
(DPM-Solver++ 25 steps, guidance 5 at t >= 600, fp32, 8 frames at 32x32) on the same cases
and seeds (the report set unless --set tuning); its report goes to `<out>/<name>.json` (a row
whose file exists is read, not re-run, unless --overwrite), and each row is compared with the
default row video by video: the paired difference of each rate with its 95% interval
(t2v.demo.scores.compare). The tools that need more than one call per video are measured by their own
functions (TOOLS): prompt travel (the colour per 8-frame window of a 64-frame video against the
schedule), first-frame conditioning (the rendered first frame kept; PSNR of frame 0 and the
attributes), continuation (a clip continued from the last 4 frames of another) and the dtype
agreement (bf16 and fp16 videos against fp32's on the same seeds: frame PSNR). All tables
go to `<out>/grid.md`, in the form docs/quality.md shows them.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from t2v.atomic import atomic_path
from t2v.demo.classify import classify, window_colours
from t2v.demo.evaluate import (
    EVAL_SEED_BASE,
    SEED_SETS,
    EvalSettings,
    cases,
    demo_options,
    evaluate,
    load_demo_pipeline,
)
from t2v.demo.scores import RATES, compare, markdown_tables, text_differences
from t2v.errors import NumericalError, OneLineParser, UserError, fail
from t2v.loading.weights import DEMO_SOURCE
from t2v.pipeline.options import FreeInitOptions
from t2v.pipeline.text_to_video import TextToVideo
from t2v.training.synthetic import COLOURS, TRAINED, render

FREEU_DIFFUSERS = (1.2, 1.4, 0.9, 0.2)  # b1 b2 s1 s2 that diffusers documents for ms-1.7b


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    # GenerationOptions fields changed from configs/demo.yaml's, and EvalSettings' dtype or
    # emphasis
    changes: dict = field(default_factory=dict)
    split: str = "both"
    seeds: int | None = None  # per caption; None: the seed set's (t2v.demo.evaluate.SEED_SETS)


GRID = (
    Row("default", "DPM-Solver++ 25 steps, guidance 5 at t >= 600, fp32 (the default)"),
    Row("every_step", "guidance at every step (the default until 2026-12-03)",
        {"guidance_interval": None}),
    Row("interval400", "guidance at t >= 400", {"guidance_interval": (400.0, 999.0)}),
    Row("ddim50", "DDIM 50 steps", {"sampler": "ddim", "steps": 50}),
    Row("dpm10", "DPM-Solver++ 10 steps", {"steps": 10}),
    Row("unipc25", "UniPC 25 steps", {"sampler": "unipc"}),
    Row("euler25", "Euler 25 steps", {"sampler": "euler"}),
    Row("euler_a25", "Euler ancestral 25 steps", {"sampler": "euler_a"}),
    Row("sde25", "DPM++ 2M SDE 25 steps", {"sampler": "sde-dpmsolver++"}),
    Row("g1", "guidance 1 (no guidance)", {"guidance_scale": 1.0}),
    Row("g9", "guidance 9", {"guidance_scale": 9.0}),
    Row("g9_rescale", "guidance 9, guidance rescale 0.7", {"guidance_scale": 9.0,
                                                           "guidance_rescale": 0.7}),
    Row("ddim50_thresh", "DDIM 50, dynamic thresholding (max 1)",
        {"sampler": "ddim", "steps": 50, "thresholding": True}),
    Row("ddim50_thresh4", "DDIM 50, dynamic thresholding (max 4)",
        {"sampler": "ddim", "steps": 50, "thresholding": True, "sample_max_value": 4.0}),
    Row("bf16", "bfloat16 UNet + text encoder (VAE fp32)", {"dtype": "bfloat16"}),
    Row("fp16", "float16 UNet + text encoder (VAE fp32)", {"dtype": "float16"}),
    Row("freeu", "FreeU 1.2 1.4 0.9 0.2", {"freeu": FREEU_DIFFUSERS}),
    Row("freeinit3", "FreeInit, 3 passes (Butterworth)", {"free_init": FreeInitOptions(num_iters=3)}),
    Row("deepcache2", "DeepCache, interval 2", {"cache_interval": 2}),
    Row("deepcache3", "DeepCache, interval 3", {"cache_interval": 3}),
    Row("deepcache5", "DeepCache, interval 5", {"cache_interval": 5}),
    # The demo UNet has 1 layer per block: branch 1 recomputes all of its first block.
    Row("deepcache3_b1", "DeepCache, interval 3, branch 1 (all of the first block)",
        {"cache_interval": 3, "cache_branch": 1}),
    Row("emphasis13", "colour word weighted (red:1.3)", {"emphasis": 1.3}),
    Row("windows64", "64 frames, window 8, overlap 4", {"num_frames": 64, "window": 8},
        split="heldout", seeds=1),
)


EXTRAS = ("dtype", "emphasis")  # row changes that are not generation options


def row_settings(row: Row, weights: str) -> EvalSettings:
    """The row's settings: configs/demo.yaml's options with the row's changes."""
    options = demo_options(**{k: v for k, v in row.changes.items() if k not in EXTRAS})
    return EvalSettings(options, weights=weights,
                        **{k: v for k, v in row.changes.items() if k in EXTRAS})


def run_row(row: Row, pipes: dict, weights: str, seed_set: str = "report") -> dict:
    settings = row_settings(row, weights)
    if settings.dtype not in pipes:
        pipes.clear()  # one pipeline at a time
        pipes[settings.dtype] = load_demo_pipeline(weights, settings.dtype)
    seeds = {"trained": row.seeds, "heldout": row.seeds} if row.seeds else None
    report = evaluate(pipes[settings.dtype], settings,
                      cases(seeds, (), row.split, seed_set), cases_label=f"{seed_set} set")
    report["row"] = {"name": row.name, "label": row.label}
    return report


COMMON = dict(height=32, width=32, steps=25, sampler="dpmsolver++", guidance_scale=5.0,
              progress=False)  # the evaluation's defaults until 2026-12-03 (guided at every
# step), kept so that these sections' measurements stay comparable (docs/quality.md)
TRAVEL_SEED, INIT_SEED, CONTINUE_SEED = 2 * EVAL_SEED_BASE, 3 * EVAL_SEED_BASE, 4 * EVAL_SEED_BASE
DTYPE_SEED = 5 * EVAL_SEED_BASE


def prompt_travel(pipe, videos: int = 20, frames: int = 64, switch: int = 32,
                  steps: int = 25) -> dict:
    """64 frames, window 8 / overlap 4: the colour switches at frame `switch` by schedule; the
    colour of each window against the schedule's colour at the window's centre. The control:
    the same seeds with the first prompt throughout."""
    common = {**COMMON, "steps": steps}
    colours = list(COLOURS)
    window, stride = 8, 4
    centres = [s + (window - 1) / 2 for s in range(0, frames - window + 1, stride)]
    right, before, after, control = [], [], [], []
    start = time.perf_counter()
    for i in range(videos):
        c1, c2 = colours[i % 5], colours[(i + 1 + i // 5) % 5]
        a = TRAINED[(i * 7) % len(TRAINED)]
        tail = f"{a.shape} moving {a.motion} on a {a.background} background"
        schedule = f"0: a {c1} {tail} | {switch - 1}: a {c1} {tail} | {switch}: a {c2} {tail}"
        # Windows centred between keyframes switch - 1 and switch take a blend of both
        # prompts: not scored.
        expected = [c1 if c <= switch - 1 else c2 if c >= switch else None for c in centres]
        video = pipe(prompt_schedule=schedule, num_frames=frames, window=window,
                     window_overlap=window - stride, seed=TRAVEL_SEED + i, **common).frames[0]
        got = window_colours(video.numpy(), window, stride)
        hits = [g == e for g, e in zip(got, expected) if e is not None]
        right.append(np.mean(hits))
        before.append(np.mean([g == c1 for g, e in zip(got, expected) if e == c1]))
        after.append(np.mean([g == c2 for g, e in zip(got, expected) if e == c2]))
        plain = pipe(f"a {c1} {tail}", num_frames=frames, window=window,
                     window_overlap=window - stride, seed=TRAVEL_SEED + i, **common).frames[0]
        control.append(np.mean([g == e for g, e in zip(
            window_colours(plain.numpy(), window, stride), expected) if e is not None]))
    return {"videos": videos, "frames": frames, "switch": switch,
            "windows_matching_schedule": pct(right),
            "before_switch": pct(before), "after_switch": pct(after),
            "control_first_prompt_only": pct(control),
            "seconds": round(time.perf_counter() - start, 1)}


def first_frame_and_continuation(pipe, videos: int = 20, steps: int = 25) -> dict:
    """`init_image`: the rendered first frame of each caption's clip kept in frame 0 (4 frames
    of the weight schedule); `continue_from`: a new clip from the last 4 frames of the plain
    one. Attributes classified with and without; PSNR of the kept or continued frames; the
    direction of the continuation's own frames (from its last kept frame on): the prompted
    one, still, or turned (any other)."""
    common = {**COMMON, "steps": steps}
    chosen = [TRAINED[(i * 5) % len(TRAINED)] for i in range(videos)]
    plain, conditioned, continued, frame0, overlap, new_moves = [], [], [], [], [], []
    start = time.perf_counter()
    for i, a in enumerate(chosen):
        clip = render(a, np.random.default_rng(INIT_SEED + i))
        v0 = pipe(a.caption, num_frames=8, seed=INIT_SEED + i, **common).frames[0].numpy()
        v1 = pipe(a.caption, num_frames=8, seed=INIT_SEED + i, init_image=clip[0],
                  init_frames=4, **common).frames[0].numpy()
        v2 = pipe(a.caption, num_frames=8, seed=CONTINUE_SEED + i, continue_from=v0,
                  continue_frames=4, **common).frames[0].numpy()
        plain.append(classify(v0))
        conditioned.append(classify(v1))
        continued.append(classify(v2))
        moved = classify(v2[3:]).direction  # frame 3 is the last kept one
        new_moves.append("prompted" if moved == a.motion else moved if moved == "still"
                         else "turned")
        frame0.append(psnr(v1[0], clip[0]))
        overlap.append(psnr(v2[:4], v0[4:]))
    return {"videos": videos, "plain": attribute_scores(plain, chosen),
            "init_image": attribute_scores(conditioned, chosen),
            "continue_from": attribute_scores(continued, chosen),
            "continue_new_frames": {k: pct([m == k for m in new_moves])
                                    for k in ("prompted", "still", "turned")},
            "init_frame0_psnr_db": round(float(np.mean(frame0)), 2),
            "continue_overlap_psnr_db": round(float(np.mean(overlap)), 2),
            "seconds": round(time.perf_counter() - start, 1)}


def dtype_agreement(pipe, videos: int = 20, steps: int = 25) -> dict:
    """bfloat16 and float16 (UNet and text encoder; VAE and sampler state float32, as
    `--dtype`) against float32 on the same captions and seeds: mean frame PSNR of each video
    against its float32 twin, and how often the classified attributes agree with float32's."""
    import copy

    common = {**COMMON, "steps": steps}
    chosen = [TRAINED[(i * 3) % len(TRAINED)] for i in range(videos)]
    start = time.perf_counter()
    reference = [pipe(a.caption, num_frames=8, seed=DTYPE_SEED + i, **common).frames[0].numpy()
                 for i, a in enumerate(chosen)]
    result = {"videos": videos}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        low = TextToVideo(pipe.config, copy.deepcopy(pipe.text_encoder).to(dtype),
                          copy.deepcopy(pipe.unet).to(dtype), pipe.vae, pipe.tokenizer)
        db, same = [], []
        for i, a in enumerate(chosen):
            video = low(a.caption, num_frames=8, seed=DTYPE_SEED + i, **common).frames[0].numpy()
            db.append(psnr(video, reference[i]))
            ours, theirs = classify(video), classify(reference[i])
            same.append((ours.colour, ours.shape, ours.direction, ours.background)
                        == (theirs.colour, theirs.shape, theirs.direction, theirs.background))
        result[name] = {"psnr_db_mean": round(float(np.mean(db)), 2),
                        "psnr_db_min": round(float(np.min(db)), 2),
                        "all_attributes_as_float32": pct(same)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def pct(values) -> float:
    return round(100.0 * float(np.mean(values)), 1)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-9)))


def attribute_scores(predictions, attributes) -> dict:
    pairs = list(zip(predictions, attributes))
    return {name: pct([RATES[name][1](a, p) for p, a in pairs])
            for name in ("colour", "shape", "direction", "background", "one_blob")}


TOOLS = {"prompt_travel": prompt_travel, "first_frame": first_frame_and_continuation,
         "dtype_psnr": dtype_agreement}


def grid_markdown(reports: list[dict], tools: dict) -> str:
    """The tables of docs/quality.md from the row reports (each row's figures with intervals,
    and its paired differences from the default row on the same videos) and the tool
    results."""
    default = next((r for r in reports if r["row"]["name"] == "default"), None)
    tables = []
    for report in reports:
        table = {"label": report["row"]["label"], "scores": report["scores"],
                 "seconds": report["seconds"]}
        if default is not None and report is not default and \
                len(report["rows"]) == len(default["rows"]):
            table["difference"] = compare(default, report)
        tables.append(table)
    lines = [markdown_tables(tables).rstrip("\n")]
    for report in reports:
        if "window_direction" in report:
            w = report["window_direction"]
            lines.append(f"\n{report['row']['label']}: {w['segments_per_video']} segments per "
                         f"video, {w['segments_correct']}% in the prompted direction, "
                         f"{w['videos_all_segments_correct']}% of videos right in every "
                         "segment.")
    if "prompt_travel" in tools:
        t = tools["prompt_travel"]
        lines += ["", "| prompt travel | videos | windows matching the schedule | before the "
                  "switch | after the switch | control: first prompt only | seconds |",
                  "|" + " --- |" * 7,
                  f"| colour switch at frame {t['switch']} of {t['frames']} | {t['videos']} | "
                  f"{t['windows_matching_schedule']} | {t['before_switch']} | "
                  f"{t['after_switch']} | {t['control_first_prompt_only']} | {t['seconds']} |"]
    if "first_frame" in tools:
        t = tools["first_frame"]
        lines += ["", f"| {t['videos']} trained captions | colour | shape | direction | background "
                  "| one blob | PSNR dB |", "|" + " --- |" * 7]
        for key, label, db in (("plain", "plain", ""),
                               ("init_image", "init_image (rendered frame 0 kept)",
                                t["init_frame0_psnr_db"]),
                               ("continue_from", "continue_from (last 4 frames)",
                                t["continue_overlap_psnr_db"])):
            s = t[key]
            lines.append(f"| {label} | {s['colour']} | {s['shape']} | {s['direction']} | "
                         f"{s['background']} | {s['one_blob']} | {db} |")
        if "continue_new_frames" in t:
            m = t["continue_new_frames"]
            lines.append(f"| (continue_from, its own frames 3-7: {m['prompted']}% in the "
                         f"prompted direction, {m['still']}% still, {m['turned']}% turned) "
                         "| | | | | | |")
    if "dtype_psnr" in tools:
        t = tools["dtype_psnr"]
        lines += ["", f"| against float32 ({t['videos']} trained captions) | mean frame PSNR dB "
                  "| lowest video's PSNR dB | all four attributes as float32's |",
                  "|" + " --- |" * 4]
        for name in ("bfloat16", "float16"):
            s = t[name]
            lines.append(f"| {name} | {s['psnr_db_mean']} | {s['psnr_db_min']} | "
                         f"{s['all_attributes_as_float32']} |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def main(argv: list[str] | None = None) -> int:
    names = [r.name for r in GRID] + list(TOOLS)
    parser = OneLineParser(prog="python -m t2v.demo.quality_grid",
                           description="The demo-model grid of docs/quality.md.")
    parser.add_argument("--out", type=Path, required=True, help="folder for the reports")
    parser.add_argument("--weights", default=DEMO_SOURCE)
    parser.add_argument("--only", nargs="+", default=None, choices=names, metavar="NAME",
                        help=f"run these rows only ({', '.join(names)})")
    parser.add_argument("--overwrite", action="store_true", help="re-run rows already written")
    parser.add_argument("--set", dest="seed_set", default="report", choices=list(SEED_SETS),
                        help="the evaluation's seed set (docs/quality.md, 'Seed discipline')")
    try:
        args = parser.parse_args(argv)
        args.out.mkdir(parents=True, exist_ok=True)
        chosen = set(args.only or names)
        pipes: dict = {}
        reports, tools = [], {}
        for row in GRID:
            path = args.out / f"{row.name}.json"
            if row.name not in chosen:
                if path.exists():
                    reports.append(json.loads(path.read_text()))
                continue
            if path.exists() and not args.overwrite:
                report = json.loads(path.read_text())
            else:
                report = run_row(row, pipes, str(args.weights), args.seed_set)
                write_json(path, report)
            print(f"{row.name}: {report['seconds']} s", flush=True)
            default = next((r for r in reports if r["row"]["name"] == "default"), None)
            if default is not None and len(report["rows"]) == len(default["rows"]):
                print("\n".join(text_differences(compare(default, report))), flush=True)
            reports.append(report)
        for name, measure in TOOLS.items():
            path = args.out / f"{name}.json"
            if name in chosen and (args.overwrite or not path.exists()):
                if "float32" not in pipes:
                    pipes.clear()
                    pipes["float32"] = load_demo_pipeline(str(args.weights))
                with torch.inference_mode():
                    write_json(path, measure(pipes["float32"]))
            if path.exists():
                tools[name] = json.loads(path.read_text())
                print(f"{name}: {tools[name]}", flush=True)
        (args.out / "grid.md").write_text(grid_markdown(reports, tools))
    except (UserError, NumericalError) as exc:
        return fail(exc)
    print(f"wrote {args.out / 'grid.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
