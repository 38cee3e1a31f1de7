"""The one adapter from `TextToVideo.__call__`'s keywords to (GenerationOptions, CallInputs).

    pipe("a cat", options)                                   # t2v: the options object
    pipe("a cat", num_inference_steps=25, guidance_scale=7)  # diffusers' keyword names
    pipe("a cat", options, seed=3)                           # keywords replace option fields

A keyword that names a GenerationOptions field changes that field (and is validated there);
diffusers' aliases map onto fields (`num_inference_steps` -> steps, `video` -> an input
video); everything that is not a setting but a tensor, a callback or an output choice lands
in `CallInputs`. An unknown keyword is a one-line UserError.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from t2v.errors import UserError
from t2v.pipeline.inputs import video_argument
from t2v.pipeline.options import FreeInitOptions, GenerationOptions, LCMOptions
from t2v.sampling.freeinit import FreeInit
from t2v.sampling.freeu import FreeU

OUTPUTS = ("uint8", "float", "latents")
# diffusers' output_type -> the frames computed ("np", "pt", "pil": float in [0, 1]).
OUTPUT_TYPES = {"np": "float", "pt": "float", "pil": "float", "latent": "latents"}
FILE_INPUTS = ("init_video", "init_image", "continue_from")  # a path here, else a tensor
OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(GenerationOptions))


@dataclass
class CallInputs:
    """What a call takes besides its settings: prompts, tensors, callbacks, output form."""

    prompts: list[str]
    generator: torch.Generator | list | None = None
    latents: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    negative_prompts: list[str] | None = None  # a list of negative prompts, one per prompt
    num_videos_per_prompt: int = 1
    init_video: torch.Tensor | None = None  # (B or 1, 3, F, H, W) in [-1, 1]
    init_image: Any = None  # a PIL image, an array or a tensor (t2v.pipeline.inputs)
    continue_from: Any = None  # frames in diffusers' video forms
    prompt_schedule: dict | None = None  # {frame: prompt}, in place of options.prompt_schedule
    callback: Callable | None = None  # callback(i, t, x, x0) after every step
    callback_on_step_end: Callable | None = None  # diffusers': (pipe, i, t, {"latents": x})
    callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",)
    output: str = "uint8"
    output_type: str | None = None
    return_dict: bool = True
    progress: bool = True
    decode_chunk_frames: int = 8
    frame_chunk: int | str | None = "auto"

    @property
    def kind(self) -> str:
        """The frames computed: "uint8", "float" or "latents"."""
        if self.output_type is not None:
            return OUTPUT_TYPES.get(self.output_type, self.output_type)
        return self.output


INPUT_NAMES = frozenset(f.name for f in dataclasses.fields(CallInputs)) - {"prompts"}


def _option_value(name: str, value: Any) -> Any:
    """A keyword's value in the options' form (FreeU and FreeInit objects, the lcm section as
    a dict, lists, False)."""
    if name == "freeu":
        freeu = FreeU.of(value or None)  # False: off
        return None if freeu is None else (freeu.b1, freeu.b2, freeu.s1, freeu.s2)
    if name == "free_init":
        free_init = FreeInit.of(value or None)
        return FreeInitOptions() if free_init is None else \
            FreeInitOptions(**dataclasses.asdict(free_init))
    if name == "lcm" and isinstance(value, dict):  # lcm={"original_steps": 50, ...}
        try:
            return LCMOptions(**value)
        except TypeError as exc:
            raise UserError(f"lcm: {exc}; its keys are original_steps and timesteps") from None
    if name in ("guidance_interval", "init_weights") and value is not None:
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise UserError(f"{name} must be a list of numbers, got {value!r}") from None
    return value


def _steps(keywords: dict) -> dict:
    """diffusers' num_inference_steps as `steps` (the same number if both are given)."""
    steps = keywords.pop("num_inference_steps", None)
    if steps is not None:
        if keywords.get("steps") is not None and keywords["steps"] != steps:
            raise UserError(f"steps ({keywords['steps']}) and num_inference_steps ({steps}) "
                            "disagree; give one")
        keywords["steps"] = steps
    elif "steps" in keywords and keywords["steps"] is None:
        del keywords["steps"]  # None: the default
    return keywords


def _split(keywords: dict) -> tuple[dict, dict]:
    """keywords -> (option changes, CallInputs fields)."""
    changes, inputs = {}, {}
    video = keywords.pop("video", None)
    if video is not None:
        if keywords.get("init_video") is not None:
            raise UserError("pass init_video or video, not both")
        keywords["init_video"] = video_argument(video)
    for name, value in keywords.items():
        if name in FILE_INPUTS and not isinstance(value, (str, Path, type(None))):
            inputs[name] = value
        elif name == "prompt_schedule" and isinstance(value, dict):
            inputs[name] = value
        elif name in OPTION_NAMES:
            changes[name] = str(value) if name in FILE_INPUTS and value is not None else \
                _option_value(name, value)
        elif name in INPUT_NAMES:
            inputs[name] = value
        else:
            raise UserError(f"unknown argument {name!r}: a GenerationOptions field "
                            "(t2v.pipeline.options) or a call input (docs/api.md)")
    return changes, inputs


def call_arguments(prompt: str | list[str], options: GenerationOptions | None,
                   keywords: dict, defaults: dict | None = None
                   ) -> tuple[GenerationOptions, CallInputs]:
    """(options, inputs) of one call. `defaults`: option values the pipeline set
    (enable_freeu / enable_free_init), used where neither `options` nor a keyword sets one."""
    keywords = dict(keywords)
    if isinstance(options, (str, list, tuple)):  # t2v's earlier signature: (prompt, negative)
        if "negative_prompt" in keywords:
            raise UserError("negative prompt given twice (second argument and negative_prompt)")
        keywords["negative_prompt"], options = options, None
    if options is not None and not isinstance(options, GenerationOptions):
        raise UserError(f"the second argument is a GenerationOptions (or the negative prompt), "
                        f"got {type(options).__name__}")
    changes, inputs = _split(_steps(keywords))
    options = options or GenerationOptions()
    for name, value in (defaults or {}).items():
        if name not in changes and getattr(options, name) == getattr(GenerationOptions(), name):
            changes[name] = _option_value(name, value)
    negative = changes.get("negative_prompt")
    if isinstance(negative, (list, tuple)):
        inputs["negative_prompts"] = [str(p) for p in negative]
        changes["negative_prompt"] = ""
    if isinstance(prompt, str):
        changes.setdefault("prompt", prompt or options.prompt)
        prompts = [changes["prompt"]]
    else:
        prompts = [str(p) for p in prompt]
    if "init_video" in inputs:  # the input video sets the video's size
        frames, height, width = inputs["init_video"].shape[2], *inputs["init_video"].shape[-2:]
        changes.update(num_frames=frames, height=height, width=width)
    options = dataclasses.replace(options, **changes)
    call = CallInputs(prompts=prompts, **inputs)
    _check_inputs(call)
    return options, call


def _check_inputs(call: CallInputs) -> None:
    if call.kind not in OUTPUTS:
        raise UserError(f"output must be one of {OUTPUTS} (output_type one of "
                        f"{tuple(OUTPUT_TYPES)}), got {call.output_type or call.output!r}")
    if set(call.callback_on_step_end_tensor_inputs) - {"latents"}:
        raise UserError("callback_on_step_end_tensor_inputs: only 'latents' is available")
    if call.num_videos_per_prompt < 1:
        raise UserError(f"num_videos_per_prompt must be >= 1, got {call.num_videos_per_prompt}")
    if call.init_image is not None and call.continue_from is not None:
        raise UserError("pass init_image or continue_from, not both")
    if call.init_video is not None and (call.init_image is not None
                                        or call.continue_from is not None):
        raise UserError("init_image / continue_from start a new clip; they do not combine "
                        "with init_video (video-to-video)")
