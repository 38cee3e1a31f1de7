"""python -m t2v.app: a web UI for generating videos (Gradio), on this machine.

    python -m t2v.app                                   # the demo model (configs/demo.yaml)
    python -m t2v.app --config configs/ms17b.yaml --lora-dir loras/ --max-memory 16GB

The models load once, at start. The page: prompt and negative prompt, Generate and Cancel, an
"Advanced options" accordion (seed, frames, size, steps, guidance, sampler, fps, windowed
sampling, LoRA files from --lora-dir), example prompts, a per-step progress bar, the MP4
inline with download buttons for it and its JSON sidecar, and this session's outputs with
their settings and "Reuse these settings". One generation runs at a time; others wait in a
queue with their position shown. Outputs are written as `python -m t2v.sample` writes them
(same folder, names and sidecars, atomically). Needs the `app` extra (gradio). docs/app.md.
"""
# No `from __future__ import annotations`: Gradio resolves the handlers' annotations
# (gr.Request, gr.SelectData) at run time, in the scope where gradio is imported.

import argparse
import dataclasses
import logging
import os
import random
import sys
import threading
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from t2v.cli.flags import flag_of
from t2v.cli.sample import (
    DTYPES,
    build_pipeline,
    check_memory,
    generate,
    output_paths,
    read_config,
    resolve_device,
    sidecar_record,
    write_outputs,
)
from t2v.config import ConfigError
from t2v.pipeline.options import Config, GenerationOptions
from t2v.errors import NumericalError, OneLineParser, UserError, fail
from t2v.loading.weights import DEMO_SOURCE
from t2v.models.lora import parse_lora_arg, strip_lora
from t2v.models.memory import parse_size, resident_bytes
from t2v.training.synthetic import TRAINED

log = logging.getLogger("t2v.cli.app")

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# The generation options the page shows, in page order (GenerationOptions fields). Each control
# is derived from its field: key and label from the CLI flag (t2v.cli.flags.flag_of), kind from
# the type, help from the field's help, the default from the config.
PAGE_OPTIONS = ("prompt", "negative_prompt", "seed", "steps", "num_frames", "fps", "width",
                "height", "guidance_scale", "sampler", "window", "window_overlap", "loop")
# Upper bounds of the page's number boxes: far beyond what a machine of today samples, low
# enough that a typo cannot ask for 100,000 frames. Within them, the memory guard
# (t2v.cli.sample.check_memory) refuses what the machine cannot hold, as a page message.
PAGE_LIMITS = {"seed": 2**31 - 1, "steps": 1000, "num_frames": 1024, "fps": 120, "width": 2048,
               "height": 2048, "window": 1024, "window_overlap": 1023}
OPTION_FIELDS = {f.name: f for f in dataclasses.fields(GenerationOptions)}
# Small videos (the demo model's 32x32) are enlarged in the page: show their pixels crisp.
# Gallery thumbnails show the whole frame, not a stretched crop of its background.
PAGE_CSS = ("#video video, #gallery video, #gallery img { image-rendering: pixelated; }\n"
            "#gallery video, #gallery img { object-fit: contain !important; }")
OPTION_TYPES = typing.get_type_hints(GenerationOptions)
KEYS = {name: flag_of(name, OPTION_FIELDS[name])[2:].replace("-", "_") for name in PAGE_OPTIONS}


def _label(name: str) -> str:
    words = {"fps": "FPS"}.get(KEYS[name], KEYS[name].replace("_", " ").capitalize())
    if name == "seed":
        return f"{words} (-1 = random)"
    if name in INTEGERS and OPTIONAL[name]:
        return f"{words} (0 = off)"
    return words


def _is(name: str, kind: type) -> bool:
    hint = OPTION_TYPES[name]
    return hint is kind or kind in typing.get_args(hint)


INTEGERS = tuple(n for n in PAGE_OPTIONS if _is(n, int))  # whole numbers (not bool)
OPTIONAL = {n: type(None) in typing.get_args(OPTION_TYPES[n]) for n in PAGE_OPTIONS}
# The form, in the order of the page's inputs: key -> label.
FORM = {**{KEYS[n]: _label(n) for n in PAGE_OPTIONS}, "loras": "LoRA files",
        "lora_scale": "LoRA scale"}
# The model card's examples, for models other than the demo model.
EXAMPLES = ("An astronaut riding a horse", "Spiderman is surfing",
            "A panda eating bamboo on a rock", "Darth Vader surfing in waves")


class Cancelled(Exception):
    """The session asked to stop its generation (Cancel)."""


# -- pure logic: the form, names, LoRA files, gallery records ---------------------------------

def example_prompts(cfg: Config, count: int = 8) -> list[str]:
    """Prompts the model knows: for the demo model, captions of its grammar (trained
    combinations, spread over colours, shapes and motions); otherwise the model card's."""

    if cfg.weights.source != DEMO_SOURCE:
        return list(EXAMPLES)

    return [TRAINED[i * len(TRAINED) // count].caption for i in range(count)]


def form_defaults(s: GenerationOptions) -> dict:
    """The form's initial values from the config's options (None shows as 0, a seed as -1)."""
    values = {}
    for name in PAGE_OPTIONS:
        value = getattr(s, name)
        values[KEYS[name]] = value if value is not None else (-1 if name == "seed" else 0)
    return {**values, "loras": [], "lora_scale": 1.0}


def _form_value(name: str, value):
    """One form value as the option's type (UserError for a number that is not whole)."""
    if name in INTEGERS:
        if value is None or float(value) != int(value):
            raise UserError(f"{FORM[KEYS[name]]}: give a whole number, got {value!r}")
        value = int(value)
        if value > PAGE_LIMITS[name]:
            raise UserError(f"{FORM[KEYS[name]]}: at most {PAGE_LIMITS[name]}, got {value}")
        if name == "seed":
            return value if value >= 0 else random.randrange(2**31 - 10**6)
        return None if value == 0 and OPTIONAL[name] else value
    if _is(name, float):
        return float(value)
    if _is(name, bool):
        return bool(value)
    return (value or "").strip() if name == "prompt" else (value or "")


def sample_settings(base: GenerationOptions, form: dict) -> GenerationOptions:
    """The form -> generation options (the config's, with the form's values). A seed < 0 draws
    a random one (as the CLI does); 0 turns an optional number off. Bad values raise UserError
    with the options' own message (e.g. "sample.width must be a positive multiple of 8, got
    30")."""
    values = {name: _form_value(name, form[KEYS[name]]) for name in PAGE_OPTIONS}
    if not values["prompt"]:
        raise UserError("no prompt: type what the video should show")
    try:
        return dataclasses.replace(base, **values)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def lora_files(folder: Path | None) -> list[str]:
    """The LoRA files the page may pick: *.safetensors names directly in --lora-dir."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors" and p.is_file())


def lora_specs(folder: Path | None, names: list[str] | None, scale: float) -> list[str]:
    """Picked names -> "PATH:SCALE" entries of weights.lora. Only names listed by
    lora_files reach the file system: the page cannot name any other path."""
    allowed = lora_files(folder)
    for name in names or []:
        if name not in allowed:
            raise UserError(f"LoRA {name!r} is not a file of the LoRA folder")
    return [f"{folder / name}:{float(scale):g}" for name in names or []]


def free_output_path(folder: Path, prompt: str, seed: int) -> Path:
    """The CLI's name for this prompt and seed in `folder` (t2v.cli.sample.output_paths); when
    it or its sidecar exists, the first free `<name>-2.mp4`, `-3`, ... (the app never
    replaces an output)."""
    path = output_paths(argparse.Namespace(format="mp4", out=folder), [prompt], [seed])[0]
    candidate, n = path, 1
    while candidate.exists() or candidate.with_name(candidate.name + ".json").exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def gallery_record(path: Path, form: dict, seed: int) -> dict:
    """One output of the session: the video, its sidecar and the form that made it (with the
    seed used, so "Reuse these settings" reproduces it)."""
    return {"video": str(path), "sidecar": str(path) + ".json",
            "caption": f"{form['prompt'].strip()} (seed {seed})",
            "settings": {**form, "seed": seed}}


def form_values(record: dict) -> list:
    """A record's settings in the order of FORM (the outputs of "Reuse these settings")."""
    return [record["settings"][name] for name in FORM]


@contextmanager
def merged_loras(pipe, specs: list[str]):
    """Merge LoRA files (any format TextToVideo.load_lora reads) for the block, then put back
    the exact weights, also when a file fails. The layers a file changes are found by merging
    it at scale 0 first (W + 0 * delta = W: a dry run), and kept aside before the real merge."""

    def layer(name: str):
        if name.startswith("text_encoder."):
            return pipe.text_encoder.get_submodule(name.removeprefix("text_encoder."))
        return pipe.unet.get_submodule(name)

    saved = {}
    try:
        for spec in specs:
            path, scale = parse_lora_arg(spec)
            for name in pipe.load_lora(path, 0.0):
                saved.setdefault(name, {k: v.clone() for k, v in layer(name).state_dict().items()})
            pipe.load_lora(path, scale)
        yield
    finally:
        strip_lora(pipe.unet)  # peft adapters left by a file that failed half-way
        for name, state in saved.items():
            layer(name).load_state_dict(state)


# -- the server: models loaded once, one generation at a time --------------------------------

@dataclass
class Studio:
    """What the page's handlers share: the pipeline and where outputs go."""

    pipe: object
    cfg: Config
    layout: str
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    out_dir: Path
    lora_dir: Path | None = None
    max_memory: str | None = None
    baseline: int = 0  # process memory before the models loaded (t2v.cli.sample.check_memory)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop_requests: set = field(default_factory=set)

    def check(self, form: dict) -> tuple[GenerationOptions, list[str], Config]:
        """Every check of a generation, before the model runs: the form, the LoRA names, the
        model's limits and the memory guard. Returns (options, LoRA specs, run config)."""
        s = sample_settings(self.cfg.sample, form)
        loras = lora_specs(self.lora_dir, form.get("loras"), form.get("lora_scale", 1.0))
        run_cfg = dataclasses.replace(self.cfg, sample=s, weights=dataclasses.replace(
            self.cfg.weights, lora=tuple(self.cfg.weights.lora) + tuple(loras)))
        self.pipe.check_options(s)
        check_memory(argparse.Namespace(max_memory=self.max_memory), run_cfg, self.device,
                     self.dtype, self.vae_dtype, offload=False, streamed=True,
                     baseline=self.baseline)
        return s, loras, run_cfg

    def generate(self, form: dict, session: str = "", on_step=None) -> dict:
        """Check the form, generate, write the MP4 and sidecar; returns the gallery record.
        Every check runs before the model does; a failure writes nothing.
        `on_step(done, total)` after each sampling step."""
        s, loras, run_cfg = self.check(form)

        def step(i, t, x, x0):
            if session in self.stop_requests:
                raise Cancelled("cancelled")
            if on_step is not None:
                on_step(i + 1, s.steps)

        with self.lock:
            self.stop_requests.discard(session)
            with merged_loras(self.pipe, loras):
                latents = generate(self.pipe, s, progress=False, callback=step)
            path = free_output_path(self.out_dir, s.prompt, s.seed)
            sidecar = sidecar_record(path, "mp4", run_cfg, self.layout, self.device,
                                     self.dtype, self.vae_dtype)
            write_outputs(self.pipe, latents, run_cfg, path, "mp4", sidecar, overwrite=False,
                          progress=False)
        log.info("wrote %s", path)
        record = gallery_record(path, form, s.seed)
        truncated = None if s.prompt_weighting else self.pipe.tokenizer.truncation(s.prompt)
        record["warnings"] = [truncated] if truncated else []
        return record


# -- the page ---------------------------------------------------------------------------------

def option_control(gr, name: str, value):
    """The page's control of the generation option `name`, from its field: a number box for
    whole numbers, a dropdown for choices, a checkbox for switches, a text box otherwise."""
    key, meta = KEYS[name], OPTION_FIELDS[name].metadata
    common = {"label": FORM[key], "value": value, "elem_id": key, "info": None}
    if name in INTEGERS:
        return gr.Number(precision=0, step=8 if name in ("width", "height") else 1,
                         minimum=-1 if name == "seed" else 0, maximum=PAGE_LIMITS[name],
                         **common)
    if meta.get("choices"):
        return gr.Dropdown(list(meta["choices"]), **common)
    if _is(name, bool):
        return gr.Checkbox(**common)
    if _is(name, float):
        return gr.Number(**common)
    return gr.Textbox(lines=2 if name == "prompt" else 1, **common)


def option_controls(gr, defaults: dict, loras: list[str]) -> dict:
    """prompt, negative prompt, the Generate/Cancel buttons, then the other options (two per
    row) and the LoRA picker in "Advanced options". Returns {form key: control} and the
    buttons under "generate" / "cancel"."""
    controls = {KEYS[n]: option_control(gr, n, defaults[KEYS[n]]) for n in PAGE_OPTIONS[:2]}
    with gr.Row():
        buttons = {"generate": gr.Button("Generate", variant="primary", elem_id="generate"),
                   "cancel": gr.Button("Cancel", variant="stop", elem_id="cancel")}
    with gr.Accordion("Advanced options", open=False, elem_id="advanced"):
        rest = PAGE_OPTIONS[2:]
        for i in range(0, len(rest), 2):
            with gr.Row():
                for name in rest[i:i + 2]:
                    controls[KEYS[name]] = option_control(gr, name, defaults[KEYS[name]])
        with gr.Row(visible=bool(loras)):
            controls["loras"] = gr.Dropdown(loras, value=[], multiselect=True,
                                            label=FORM["loras"], elem_id="loras")
            controls["lora_scale"] = gr.Slider(0, 2, value=1.0, step=0.05,
                                               label=FORM["lora_scale"])
    return controls, buttons


def check_handler(gr, studio: Studio, inputs: dict):
    """The Generate button's first step: Studio.check on the form; a refusal is a message in
    the page and leaves the video box as it was (an error of the generating step, which shows
    its progress there, would mark the box "Error")."""

    def on_check(data: dict):
        try:
            studio.check({name: data[inputs[name]] for name in FORM})
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    return on_check


def generate_handler(gr, studio: Studio, inputs: dict, records):
    """The Generate button's handler: the form -> Studio.generate, errors as page messages,
    the outputs (video, seed used, downloads, gallery, records)."""

    def on_generate(data: dict, request: gr.Request, progress=gr.Progress()):
        form = {name: data[inputs[name]] for name in FORM}
        history = data[records]
        progress(0, desc="starting")
        try:
            record = studio.generate(form, request.session_hash,
                                     lambda done, total: progress((done, total),
                                                                  desc="sampling",
                                                                  unit="steps"))
        except (UserError, NumericalError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Cancelled:
            raise gr.Error("cancelled: nothing was written", print_exception=False) \
                from None
        for warning in record.get("warnings", []):
            gr.Warning(warning)  # shown in the page, beside the video
        history = [*history, record]
        return (record["video"], gr.Number(value=record["settings"]["seed"], visible=True),
                gr.DownloadButton(value=record["video"], visible=True),
                gr.DownloadButton(value=record["sidecar"], visible=True),
                [(r["video"], r["caption"]) for r in history], history)

    return on_generate


def build_ui(studio: Studio):
    import gradio as gr

    defaults, loras = form_defaults(studio.cfg.sample), lora_files(studio.lora_dir)
    source = studio.cfg.weights.source or "random weights"
    out = studio.out_dir
    shown = os.path.relpath(out) if out.is_relative_to(Path.cwd()) else str(out)
    with gr.Blocks(title="t2v") as ui:
        gr.Markdown(f"## t2v: text to video\nModel: `{source}` ({studio.layout}), "
                    f"{studio.device}. Outputs: `{shown}/`.")
        records, selected = gr.State([]), gr.State(None)
        with gr.Row():
            with gr.Column():
                inputs, buttons = option_controls(gr, defaults, loras)
                run, cancel = buttons["generate"], buttons["cancel"]
                gr.Examples([[p] for p in example_prompts(studio.cfg)], [inputs["prompt"]],
                            label="Example prompts")
            with gr.Column():
                video = gr.Video(label="Video", autoplay=True, loop=True, interactive=False,
                                 height=360, elem_id="video")
                used_seed = gr.Number(label="Seed used", interactive=False, visible=False,
                                      elem_id="used-seed")  # shown once a run reports it
                with gr.Row():
                    mp4, sidecar = (gr.DownloadButton(f"Download {kind}", visible=False,
                                                      elem_id=f"download-{kind.lower()}")
                                    for kind in ("MP4", "JSON"))
        gr.Markdown("### This session's outputs")
        with gr.Row():
            gallery = gr.Gallery(label="Outputs (select one)", columns=6, height=240,
                                 object_fit="contain", allow_preview=False, elem_id="gallery",
                                 scale=2)
            with gr.Column(scale=1):
                details = gr.JSON(label="Its settings", elem_id="details")
                reuse = gr.Button("Reuse these settings", elem_id="reuse")

        components = [inputs[name] for name in FORM]  # the order of form_values

        on_generate = generate_handler(gr, studio, inputs, records)

        def on_cancel(request: gr.Request):
            studio.stop_requests.add(request.session_hash)

        def on_select(history, evt: gr.SelectData):
            return evt.index, history[evt.index]["settings"]

        def on_reuse(history, index):
            if index is None:
                raise gr.Error("select an output in the gallery first", print_exception=False)
            return form_values(history[index])

        outputs = [video, used_seed, mp4, sidecar, gallery, records]
        checked = run.click(check_handler(gr, studio, inputs), set(components), None,
                            show_progress="hidden")
        event = checked.success(on_generate, {*components, records}, outputs,
                                show_progress_on=[video], concurrency_limit=1,
                                concurrency_id="generate")
        cancel.click(on_cancel, None, None, cancels=[event], queue=False)
        gallery.select(on_select, [records], [selected, details])
        reuse.click(on_reuse, [records, selected], components)
    return ui


# -- the command ------------------------------------------------------------------------------

def host_warning(host: str) -> str | None:
    """The warning printed when the page listens beyond this machine."""
    if host in LOCAL_HOSTS:
        return None
    return (f"warning: --host {host}: the page, its outputs and the machine's compute are open "
            "to every machine that can reach this one, with no login")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m t2v.app", description="A web UI for generating videos.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML config or sidecar .json, as python -m t2v.sample takes "
                   "(default: configs/demo.yaml, the demo model, offline)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 opens the page to the network")
    p.add_argument("--port", type=int, default=7860, help="port")
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    p.add_argument("--lora-dir", type=Path, default=None,
                   help="folder of LoRA files (*.safetensors) the page may pick from")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="refuse generations whose estimated peak memory exceeds SIZE (16GB)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights and activations (auto: float16 on cuda, float32 on cpu)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def load_studio(args: argparse.Namespace) -> Studio:
    """Read the config and load the models (once)."""

    if args.max_memory is not None:
        try:
            parse_size(args.max_memory)
        except ValueError as exc:
            raise UserError(f"--max-memory: {exc}") from None
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise UserError(f"--lora-dir {args.lora_dir}: not a folder")
    cfg = read_config(str(args.config or DEMO_CONFIG), args.overrides)
    device = resolve_device(args.device, 0)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else \
        (torch.float16 if device.type == "cuda" else torch.float32)
    baseline = resident_bytes() if device.type == "cpu" else 0
    # The config's own settings must fit before any weights load (the memory guard).
    check_memory(args, cfg, device, dtype, torch.float32, offload=False, streamed=True,
                 baseline=baseline)
    pipe, cfg, layout = build_pipeline(cfg, device, dtype, torch.float32, offload=False)
    return Studio(pipe, cfg, layout, device, dtype, torch.float32, args.out.resolve(),
                  args.lora_dir.resolve() if args.lora_dir else None, args.max_memory, baseline)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise UserError("the web UI needs gradio: pip install -e \".[app]\"") from None
        studio = load_studio(args)
    except UserError as exc:
        return fail(exc)
    warning = host_warning(args.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    ui = build_ui(studio)
    ui.queue(default_concurrency_limit=1)
    ui.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(studio.out_dir)],
              css=PAGE_CSS,
              share=False, inbrowser=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
