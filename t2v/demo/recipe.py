"""python -m t2v.demo train: reproduce the demo model shipped in t2v/demo/model/, in one command.

    python -m t2v.demo train --out runs/demo            # all three stages, then the fp16 export
    python -m t2v.demo train --out runs/demo --ship --overwrite   # and replace the shipped copy
    python -m t2v.demo train --out runs/ft --start-from t2v:demo  # stage 3 only, on a model
    python -m t2v.demo gif docs/demo.gif --overwrite    # the README's GIF, from the shipped model

Stage 1 trains the KL VAE (configs/demo_vae.yaml, `train.model=vae`), which also fixes the
architecture, the noise schedule (zero terminal SNR, v-prediction), the frozen random text
encoder and the UNet's initial weights (train.seed 0: `TextToVideo.from_config` draws the text
encoder from seed 0, the UNet from 1, the VAE from 2); stage 2 trains every UNet parameter on
top of it (configs/demo_unet.yaml, weights.source set to stage 1's model: 4,000 steps of a
cosine schedule); stage 3 fine-tunes that model in FINETUNE_ROUNDS rounds at a lower learning
rate (configs/demo_finetune.yaml), each round from the previous round's EMA model on fresh
clips. `--start-from SOURCE` runs stage 3 alone on SOURCE (any weights source, e.g. a stage 2
model folder). The export stores the final model (EMA weights) in float16 as a native
safetensors folder, `<out>/model`. Wall times go to `<out>/timings.json`.
docs/demo.md has the recipe, the seed and the measured time.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from t2v.atomic import atomic_path
from t2v.pipeline.options import load_config
from t2v.demo.evaluate import demo_options
from t2v.errors import NumericalError, OneLineParser, UserError, fail
from t2v.loading.weights import DEMO_FOLDER, read_checkpoint, save_native
from t2v.pipeline.text_to_video import TextToVideo
from t2v.pipeline.video_io import write_gif
from t2v.training.config import TrainRunConfig
from t2v.training.trainer import Trainer

log = logging.getLogger("t2v.demo.recipe")



def finetune_rounds(count: int) -> tuple[tuple[str, str], ...]:
    """Stage 3: per round, the overrides of configs/demo_finetune.yaml (fresh clips, a new
    seed): round i draws data seed 2i and train seed 2i + 1."""
    return tuple((f"data.synthetic.seed={2 * i}", f"train.seed={2 * i + 1}")
                 for i in range(1, count + 1))


FINETUNE_ROUNDS = finetune_rounds(3)  # the shipped model's recipe


def export(model_dir: Path, target: Path, overwrite: bool = False) -> Path:
    """A trained native folder -> float16 native folder (the shipped form)."""
    _, cfg, states = read_checkpoint(model_dir, layout="native")
    with atomic_path(target, overwrite=overwrite) as tmp:
        tmp.mkdir()
        save_native(tmp, cfg, states, dtype=torch.float16)
    return target


def run_stage(config: str, overrides, progress: bool) -> float:
    """One `python -m t2v.train` run of `config` with `overrides`; its wall time (seconds)."""
    start = time.perf_counter()
    Trainer(load_config(config, list(overrides), schema=TrainRunConfig)).run(progress=progress)
    return round(time.perf_counter() - start, 1)


def train_demo(out: Path, vae_config: str, unet_config: str, finetune_config: str,
               vae_overrides=(), unet_overrides=(), finetune_overrides=(),
               progress: bool = True, start_from: str | None = None,
               rounds: int = len(FINETUNE_ROUNDS)) -> dict:
    """The stages and the export; returns the timings (seconds). With `start_from`, stage 3
    alone, on that weights source; `rounds`: how many fine-tune rounds."""
    out = Path(out)
    timings = {}
    if start_from is None:
        timings["vae_seconds"] = run_stage(
            vae_config, [f"train.output_dir={out / 'vae'}", *vae_overrides], progress)
        timings["unet_seconds"] = run_stage(
            unet_config, [f"weights.source={out / 'vae' / 'model'}",
                          f"train.output_dir={out / 'unet'}", *unet_overrides], progress)
        source = str(out / "unet" / "model")
    else:
        source = start_from
    timings["finetune_seconds"] = 0.0
    for i, round_overrides in enumerate(finetune_rounds(rounds), 1):
        timings["finetune_seconds"] += run_stage(
            finetune_config, [f"weights.source={source}",
                              f"train.output_dir={out / f'finetune{i}'}",
                              *round_overrides, *finetune_overrides], progress)
        source = str(out / f"finetune{i}" / "model")
    timings["finetune_seconds"] = round(timings["finetune_seconds"], 1)
    export(Path(source), out / "model", overwrite=True)
    timings["total_seconds"] = round(sum(v for k, v in timings.items()
                                         if k.endswith("_seconds")), 1)
    timings["torch_threads"] = torch.get_num_threads()
    timings["start_from"] = start_from
    with atomic_path(out / "timings.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(timings, indent=1))
    return timings


GIF_PROMPTS = ("a red circle moving right on a black background",
               "a blue square moving up on a white background",
               "a yellow triangle moving left on a black background",
               "a green circle moving down on a white background",
               "a purple square moving right on a black background",
               "a red triangle moving down on a white background",
               "a blue circle moving left on a black background",
               "a yellow square moving up on a white background")
GIF_SEED = 7
GIF_SCALE = 4


def demo_gif(path: Path, source: str = "t2v:demo", overwrite: bool = False, columns: int = 4,
             steps: int = 25, guidance: float = 5.0) -> Path:
    """A grid of demo-model videos (GIF_PROMPTS, seed GIF_SEED + i; configs/demo.yaml's
    sampling, guided at t >= 600), each pixel enlarged to GIF_SCALE x GIF_SCALE (nearest
    neighbour: the real pixels), one GIF."""

    pipe = TextToVideo.from_pretrained(source, dtype=torch.float32)
    options = demo_options(steps=steps, guidance_scale=guidance)
    tiles = [pipe(prompt, options, seed=GIF_SEED + i, progress=False).frames[0].numpy()
             for i, prompt in enumerate(GIF_PROMPTS)]
    tiles = [t.repeat(GIF_SCALE, axis=1).repeat(GIF_SCALE, axis=2) for t in tiles]
    rows = [np.concatenate(tiles[i:i + columns], axis=2) for i in range(0, len(tiles), columns)]
    return write_gif(np.concatenate(rows, axis=1), path, fps=8, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m t2v.demo", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["train", "gif"])
    parser.add_argument("path", type=Path, nargs="?", default=None,
                        help="gif: the GIF to write")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--vae-config", default="configs/demo_vae.yaml")
    parser.add_argument("--unet-config", default="configs/demo_unet.yaml")
    parser.add_argument("--vae-override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--unet-override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--finetune-config", default="configs/demo_finetune.yaml")
    parser.add_argument("--finetune-override", action="append", default=[],
                        metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=len(FINETUNE_ROUNDS),
                        help="fine-tune rounds of stage 3")
    parser.add_argument("--start-from", default=None, metavar="SOURCE",
                        help="skip stages 1 and 2: fine-tune these weights (stage 3) only")
    parser.add_argument("--ship", action="store_true",
                        help=f"also copy the export to the package ({DEMO_FOLDER})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the shipped model (--ship) or an existing GIF")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parser.parse_args(argv)
        if args.command == "gif":
            if args.path is None:
                raise UserError("gif needs the path of the GIF to write")
            print(f"wrote {demo_gif(args.path, overwrite=args.overwrite)}")
            return 0
        if args.ship and DEMO_FOLDER.exists() and not args.overwrite:
            raise UserError(f"{DEMO_FOLDER}: already exists; pass --overwrite to replace it")
        if args.rounds < 1:
            raise UserError(f"--rounds must be >= 1, got {args.rounds}")
        if args.out.exists() and any(args.out.iterdir()):
            raise UserError(f"{args.out}: not empty; choose a new --out folder")
        timings = train_demo(args.out, args.vae_config, args.unet_config,
                             args.finetune_config, args.vae_override, args.unet_override,
                             args.finetune_override, progress=not args.quiet,
                             start_from=args.start_from, rounds=args.rounds)
        if args.ship:
            export(args.out / "model", DEMO_FOLDER, overwrite=True)
    except (UserError, NumericalError) as exc:
        return fail(exc)
    stages = ", ".join(f"{k.removesuffix('_seconds')} {v} s" for k, v in timings.items()
                       if k.endswith("_seconds"))
    print(f"demo model in {args.out / 'model'}: {stages}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
