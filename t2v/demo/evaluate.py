"""python -m t2v.eval demo: does the demo model follow its prompts? The quality signal.

For each caption of a fixed list and seeds never used in training, generate a video, then
read what it shows with plain image analysis (t2v.demo.classify) and report, per split
(trained and held-out combinations, t2v.training.synthetic.HELDOUT), each figure with its 95%
interval (t2v.demo.scores): colour, shape, direction, background, consistency, and frame by
frame: the colour and shape of every frame, their flips, the smoothness of the motion.

Two fixed sets of seeds (SEED_SETS; docs/quality.md, "Seed discipline"): the **report set**
(the default; 6 seeds per trained combination, 10 per held-out one: 800 videos) gives every
figure the docs quote and is never used to choose anything; the **tuning set** (1 and 2 seeds:
140 videos) is where recipes and defaults may be chosen.

    python -m t2v.eval demo                     # configs/demo.yaml's settings, report set
    python -m t2v.eval demo --set tuning        # the tuning set
    python -m t2v.eval demo --guidance-interval 0 999 --json every.json \
        --compare default.json                  # paired differences against a saved run
    python -m t2v.eval demo --sampler ddim --steps 50 --dtype bfloat16
    python -m t2v.eval demo --frames 64 --window 8 --window-overlap 4   # direction per window
    python -m t2v.eval demo --lora runs/orange/lora.safetensors --colours orange
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
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
from t2v.pipeline.options import Config, GenerationOptions, load_config
from t2v.pipeline.text_to_video import TextToVideo
from t2v.sampling.schedule import noise_schedule
from t2v.sampling.windows import reschedule_noise
from t2v.demo.classify import classify, window_directions
from t2v.demo.scores import compare, score, text_differences, text_tables
from t2v.training.synthetic import (
    COLOURS,
    EXTRA_COLOURS,
    HELDOUT,
    TRAINED,
    Attributes,
    SyntheticClips,
    all_combinations,
)

# The seed sets: (first seed, seeds per caption of each split). Case k of a set has seed
# first + k; training never draws these (its generators are seeded by (0, step, slot)).
EVAL_SEED_BASE = 1_000_000
REPORT_SEED_BASE = 10_000_000
SEED_SETS = {
    # 600 trained videos: a 95% Wilson interval is at most 8.0 points wide (+-4) at any rate.
    "report": (REPORT_SEED_BASE, {"trained": 6, "heldout": 10}),
    # The evaluation's list until 2026-12-05, on which the recipe and defaults were chosen.
    "tuning": (EVAL_SEED_BASE, {"trained": 1, "heldout": 2}),
}
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


@dataclass(frozen=True)
class Case:
    attributes: Attributes
    seed: int
    split: str  # trained / heldout / new (combinations of colours the base model never saw)


def cases(seeds: dict[str, int] | None = None, colours: tuple[str, ...] = (),
          split: str = "both", seed_set: str = "report") -> list[Case]:
    """The fixed evaluation list of `seed_set` (SEED_SETS): every trained and held-out
    combination, with seeds first + k (k counts over the whole list); or every combination of
    `colours` (the larger count of seeds). `seeds` overrides the counts per caption. `split`
    keeps only "trained" or "heldout" cases (their seeds unchanged)."""
    first, counts = SEED_SETS[seed_set]
    seeds = seeds or counts
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
                out.append(Case(a, first + k, name))
                k += 1
    return out if split == "both" else [c for c in out if c.split == split]


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
             keep_videos: bool = False, cases_label: str = "") -> dict:
    """Generate and classify every case; the report (settings, `cases_label` (which cases),
    per-split scores with intervals, one row per video)."""
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
    report = {"settings": settings.record(), "cases": cases_label, "seconds": round(seconds, 1),
              "scores": score(results),
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
    """The settings line, the attribute table and the frame-level table (each figure with its
    95% interval), the window directions and, if the report has one, the paired differences."""
    lines = [f"{settings_line(report['settings'])}; {report.get('cases') or 'cases'}; "
             f"{report['seconds']} s",
             *text_tables(report["scores"])]
    if "window_direction" in report:
        w = report["window_direction"]
        lines.append(f"windows: {w['segments_per_video']} segments per video, "
                     f"{w['segments_correct']}% in the prompted direction, "
                     f"{w['videos_all_segments_correct']}% of videos correct in every segment")
    if "difference" in report:
        lines += ["", f"paired difference from {report['compared_with']} (points, 95% interval):",
                  *text_differences(report["difference"])]
    return "\n".join(lines)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_demo_pipeline(source: str, dtype: str = "float32", loras: tuple[str, ...] = ()):
    pipe = TextToVideo.from_pretrained(source, dtype=DTYPES[dtype],
                                       vae_dtype=torch.float32)
    if loras:

        for spec in loras:
            pipe.load_lora(*parse_lora_arg(spec))
    return pipe


def build_parser(config: Config | None = None,
                 add_help: bool = True) -> argparse.ArgumentParser:
    """The evaluation's own flags, then every generation option's flag (t2v.cli.flags),
    defaulting to `config`'s values (configs/demo.yaml's)."""
    config = config or load_config(DEMO_CONFIG)
    parser = OneLineParser(prog="python -m t2v.eval",
                           description="Prompt-following evaluation of the demo model.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           add_help=add_help)
    parser.add_argument("model", choices=["demo"], help="what to evaluate")
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG,
                        help="the sampling config whose sample section and weights.lora the "
                        "run starts from (e.g. configs/demo_fast.yaml)")
    parser.add_argument("--weights", default=config.weights.source or DEMO_SOURCE,
                        help="a weights folder of the demo architecture")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--emphasis", type=float, default=None, metavar="W",
                        help="weight the colour word: 'a (red:W) circle ...' (prompt weighting)")
    parser.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                        help="merge a LoRA file (repeat for several; replaces the config's "
                        "weights.lora)")
    parser.add_argument("--colours", nargs="+", default=(),
                        help="evaluate every combination of these colours instead (e.g. orange)")
    parser.add_argument("--set", dest="seed_set", default="report", choices=list(SEED_SETS),
                        help="report: the seeds every quoted figure comes from (never used "
                        "for choices); tuning: the seeds choices are made on")
    parser.add_argument("--split", default="both", choices=["both", "trained", "heldout"],
                        help="which combinations to evaluate")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per caption (default: the set's, 6 trained and 10 held "
                        "out for the report set, 1 and 2 for the tuning set)")
    parser.add_argument("--batch", type=int, default=20, help="videos per pipeline call")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--compare", type=Path, default=None, metavar="REPORT.json",
                        help="also print the paired differences from this saved report "
                        "(same cases: the same --set, --split, --seeds)")
    add_option_flags(parser.add_argument_group("generation (the config's sample section)"),
                     config.sample)
    return parser


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    """Two passes: the config first, so that the flags default to its values."""
    known, _ = build_parser(add_help=False).parse_known_args(argv)
    config = load_config(known.config)
    return build_parser(config).parse_args(argv), config


def settings_from_args(args: argparse.Namespace, config: Config) -> EvalSettings:
    """The run's settings: `config` (the one --config named) under the flags."""
    if args.batch < 1:
        raise UserError("--batch must be >= 1")
    if args.json is not None and args.json.exists() and not args.overwrite:
        raise UserError(f"{args.json}: already exists; pass --overwrite to replace it")
    if args.compare is not None and not args.compare.is_file():
        raise UserError(f"--compare {args.compare}: no such report")
    unknown = [c for c in args.colours if c not in {**COLOURS, **EXTRA_COLOURS}]
    if unknown:
        raise UserError(f"--colours: unknown {unknown}; known: "
                        f"{sorted({**COLOURS, **EXTRA_COLOURS})}")
    lora = args.lora if args.lora is not None else config.weights.lora
    return EvalSettings(options_from_args(args, config.sample), args.dtype, str(args.weights),
                        tuple(lora), args.emphasis)


def cases_label(args: argparse.Namespace) -> str:
    label = f"{args.seed_set} set" + (f", {args.seeds} seeds per caption" if args.seeds else "")
    return label + (f", {args.split}" if args.split != "both" else "")


def read_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable evaluation report ({exc})") from None
    if not isinstance(report, dict) or "rows" not in report:
        raise UserError(f"{path}: not an evaluation report (no rows); write one with --json")
    return report


def main(argv: list[str] | None = None) -> int:
    try:
        args, config = parse(argv)
        settings = settings_from_args(args, config)
        reference = read_report(args.compare) if args.compare is not None else None
        pipe = load_demo_pipeline(settings.weights, settings.dtype, settings.lora)
        seeds = {"trained": args.seeds, "heldout": args.seeds} if args.seeds else None
        report = evaluate(pipe, settings,
                          cases(seeds, tuple(args.colours), args.split, args.seed_set),
                          args.batch, cases_label=cases_label(args))
        if reference is not None:
            report["difference"] = compare(reference, report)
            report["compared_with"] = str(args.compare)
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
