"""LoRA files of other tools, merged into t2v's UNet and text encoder.

    names = merge_lora_file("motion.safetensors", 0.8, pipe.unet, pipe.text_encoder)

Layouts, detected from the keys (after t2v's own, metadata `format: t2v-lora`):

- kohya / A1111: every key `lora_unet_*` / `lora_te_*` / `lora_te1_*`, as `NAME.lora_down.weight`,
  `NAME.lora_up.weight`, `NAME.alpha`, NAME the diffusers module path with `_` for `.`.
  alpha: `.alpha`, else the rank.
- Stable LoRA (Text-To-Video-Finetuning, sd-webui-text2video): loralib's `MODULE.lora_A`,
  `MODULE.lora_B` (no `.weight`) and `MODULE.bias`, MODULE a diffusers path
  (`full_weights/*_unet.safetensors`) or ModelScope's original one (`webui_*.safetensors`,
  metadata `stable_lora_text_to_video`). alpha: the rank (the trainer sets lora_alpha = r).
- diffusers / PEFT: `[unet.|text_encoder.]MODULE.` + `lora_A.weight` / `lora_B.weight`
  (+ `lora_B.bias`), `lora.down.weight` / `lora.up.weight`, `lora_linear_layer.{down,up}.weight`,
  `[processor.]to_{q,k,v,out}_lora.{down,up}.weight`, `alpha`. alpha: `.alpha`, else the
  `lora_adapter_metadata` (lora_alpha, alpha_pattern, use_rslora), else the rank.

Weight updates: `W += scale * alpha / rank * delta`, with delta `B @ A` for linear layers,
`B A` composed as convolutions for PEFT/kohya conv adapters (A has the kernel, B is 1x1),
`(B @ A).T` for embeddings, and for Stable LoRA's loralib convolutions (A `(r k, in k)`, B
`(out k, r k)`) `(B @ A).view(W.shape)` (Conv2d) or the mean over the second k of
`(B @ A).view(out, in, k, k, 1)` (the temporal Conv3d), as that trainer's forward computes it.
Stable LoRA `.bias` tensors are trained biases: `b += scale * (b_file - b)`.

Accounting is strict: every tensor of the file is used exactly once, every name must be a
layer of the model, every shape must fit; otherwise a UserError names the file and the first
bad key, before any weight changes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from t2v.errors import UserError
from t2v.loading.checkpoint_io import (
    PICKLE_SUFFIXES,
    read_pickle,
    read_safetensors,
    safetensors_metadata,
)
from t2v.loading.t2v_turbo import is_positional_list, merge_t2v_turbo
from t2v.models.lora import LORA_FORMAT, load_lora, merge_lora
from weights_convert.modelscope import unet_rules

# A pickled list of (up, down) tensor pairs placed by position: T2V-Turbo's files.
POSITIONAL_FORMAT = "positional-list"

# The demo model's consistency-distilled student (configs/demo_fast.yaml, docs/few-step.md),
# shipped in the package: `--lora t2v:demo-fast`.
DEMO_FAST_LORA = "t2v:demo-fast"
DEMO_FAST_FILE = Path(__file__).resolve().parents[1] / "demo" / "fast" / "lora.safetensors"

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
ADAPTABLE = (nn.Linear, nn.Conv2d, nn.Conv3d, nn.Embedding)

# diffusers / PEFT key endings -> role (the module path is what precedes them).
DIFFUSERS_SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "up_bias"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_embedding_A", "down"), (".lora_embedding_B", "up"), (".alpha", "alpha"),
)
# diffusers' old attention-processor keys: `ATTN[.processor].to_q_lora.down.weight`.
OLD_PROCESSOR = re.compile(r"(?P<attn>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)"
                           r"_lora\.(?P<role>down|up)\.weight")
OLD_PROJ = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
            "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj",
                             "to_out": "out_proj"}}
KOHYA_SUFFIXES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"))
STABLE_SUFFIXES = ((".lora_A", "down"), (".lora_B", "up"), (".bias", "bias"))
# Unprefixed text-encoder paths (transformers' CLIPTextModel, open_clip-style, t2v's own).
TEXT_PREFIXES = ("text_model.", "resblocks.", "encoder.layers.", "embeddings.")
# Text-To-Video-Finetuning's webui export renames text-encoder layers open_clip's way.
OPEN_CLIP_TEXT = ((r"^encoder\.layers\.(\d+)\.self_attn\.", r"resblocks.\1.attn."),
                  (r"^encoder\.layers\.(\d+)\.mlp\.fc1$", r"resblocks.\1.mlp.c_fc"),
                  (r"^encoder\.layers\.(\d+)\.mlp\.fc2$", r"resblocks.\1.mlp.c_proj"))


@dataclass
class Update:
    """One layer's LoRA: `roles` maps down/up/alpha/up_bias/bias to (file key, tensor)."""

    component: str  # "unet" or "text_encoder"
    module: str  # t2v module name
    roles: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)
    alpha: float | None = None  # None: rank (scale 1)
    rslora: bool = False  # scale alpha / sqrt(rank)
    rank: int = 0

    def key(self) -> str:
        return min(k for k, _ in self.roles.values())


def read_lora_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of a LoRA file; pickles (`.pt`, `.bin`) through the
    restricted unpickler of t2v.loading.checkpoint_io (no code runs), without metadata."""

    if not path.is_file():
        raise UserError(f"{path}: LoRA file not found")
    if path.suffix in PICKLE_SUFFIXES:
        state = read_pickle(path)
        if is_positional_list(state):  # T2V-Turbo's (t2v.loading.t2v_turbo), by position
            return {str(i): t for i, t in enumerate(state)}, {"format": POSITIONAL_FORMAT}
        if isinstance(state, (list, tuple)):
            raise UserError(f"{path}: a list that is not (up, down) tensor pairs; t2v "
                            "cannot place it. Use a Stable LoRA or diffusers file")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                                  for v in state.values()):
            raise UserError(f"{path}: expected a dict of LoRA tensors")
        return dict(state), {}
    return read_safetensors(path), safetensors_metadata(path)


def detect_format(keys: list[str], metadata: dict[str, str]) -> str:
    """'t2v', 'kohya', 'stable_lora' or 'diffusers' (the last is parsed key by key, so an
    unknown layout fails there naming its first key)."""

    if metadata.get("format") == LORA_FORMAT:
        return "t2v"
    if metadata.get("format") == POSITIONAL_FORMAT:
        return "t2v_turbo"
    if any(re.search(r":\d+:(up|down)$", k) for k in keys):
        raise UserError("cloneofsimo's safeloras layout (keys like 'unet:0:up') identifies "
                        "layers by order, not name; t2v cannot place it")
    kohya = [k.startswith(KOHYA_PREFIXES) for k in keys]
    if kohya and all(kohya):
        return "kohya"
    if any(kohya):
        other = min(k for k, is_kohya in zip(keys, kohya) if not is_kohya)
        raise UserError(f"{other!r}: not a kohya key, in a file of kohya keys (lora_unet_*, "
                        "lora_te_*)")
    if "stable_lora_text_to_video" in metadata or any(k.endswith((".lora_A", ".lora_B"))
                                                      for k in keys):
        return "stable_lora"
    return "diffusers"


def _detect(path: Path, tensors: dict, metadata: dict[str, str]) -> str:
    if not tensors:
        raise UserError(f"{path}: holds no tensors")
    try:
        return detect_format(list(tensors), metadata)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


# -- names ------------------------------------------------------------------------------------

def _owning_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if next(m.parameters(recurse=False), None)
            is not None]


def unet_aliases(unet: nn.Module) -> dict[str, str]:
    """Every name a tool gives a UNet layer -> its t2v (= diffusers) name: diffusers' own,
    ModelScope's original (`input_blocks.1.0.in_layers.2`, from weights_convert's table)."""
    names = {n: n for n in _owning_modules(unet)}
    cfg = getattr(unet, "cfg", None)
    if cfg is not None:

        for rule in unet_rules(cfg):
            ms, ours = rule.source[0].rpartition(".")[0], rule.target[0].rpartition(".")[0]
            if names.setdefault(ms, ours) != ours:
                raise AssertionError(f"alias table: {ms} names two layers")  # a bug here
    return names


def text_encoder_aliases(text_encoder: nn.Module) -> dict[str, str]:
    """transformers' CLIPTextModel names (`text_model.` + ours before transformers 5, ours
    since) and the open_clip-style names of Text-To-Video-Finetuning's webui export -> t2v
    text-encoder names."""
    names = {}
    for n in _owning_modules(text_encoder):
        names[n] = names[f"text_model.{n}"] = n
        for pattern, repl in OPEN_CLIP_TEXT:
            if re.search(pattern, n):
                names[re.sub(pattern, repl, n)] = n
    return names


def kohya_aliases(aliases: dict[str, str], prefixes: tuple[str, ...]) -> dict[str, str]:
    """kohya's `lora_unet_down_blocks_0_...`: the diffusers path with `_` for `.`."""
    out = {}
    for alias, name in aliases.items():
        if alias.startswith(("input_blocks", "middle_block", "output_blocks", "time_embed.",
                             "out.", "resblocks.")):
            continue  # kohya files use diffusers/transformers paths only
        for prefix in prefixes:
            out[prefix + alias.replace(".", "_")] = name
    return out


# -- parsing ----------------------------------------------------------------------------------

def _split(key: str, suffixes) -> tuple[str, str] | None:
    for suffix, role in suffixes:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[:-len(suffix)], role
    return None


class _Parser:
    def __init__(self, path: Path, unet: nn.Module, text_encoder: nn.Module | None):
        self.path = path
        self.tables = {"unet": unet_aliases(unet)}
        if text_encoder is not None:
            self.tables["text_encoder"] = text_encoder_aliases(text_encoder)
        self.updates: dict[tuple[str, str], Update] = {}

    def fail(self, key: str, why: str):
        raise UserError(f"{self.path}: {key!r}: {why}")

    def add(self, key: str, tensor: torch.Tensor, alias: str, role: str,
            components: tuple[str, ...], tables: dict[str, dict[str, str]] | None = None):
        tables = tables or self.tables
        for component in components:
            name = tables.get(component, {}).get(alias)
            if name is not None:
                break
        else:
            text_like = components == ("text_encoder",) or alias.startswith(TEXT_PREFIXES)
            if "text_encoder" in components and "text_encoder" not in tables and text_like:
                self.fail(key, "a text-encoder LoRA, and no text encoder was given (merge it "
                          "with TextToVideo.load_lora)")
            what = " or ".join("the UNet" if c == "unet" else "the text encoder"
                               for c in components)
            self.fail(key, f"names no layer of {what} (another architecture, or a layout t2v "
                      "does not read)")
        update = self.updates.setdefault((component, name), Update(component, name))
        if role in update.roles:
            self.fail(key, f"a second {role} tensor for {name} (also "
                      f"{update.roles[role][0]!r})")
        update.roles[role] = (key, tensor)

    def diffusers(self, tensors: dict[str, torch.Tensor]):
        for key in sorted(tensors):
            if "lora_magnitude_vector" in key or "dora_scale" in key:
                self.fail(key, "DoRA adapters are not supported")
            rest, components = key, ("unet", "text_encoder")
            for component in ("unet", "text_encoder"):
                if key.startswith(component + "."):
                    rest, components = key[len(component) + 1:], (component,)
            if key.startswith("text_encoder_2."):
                self.fail(key, "a second text encoder (SDXL); this model has one")
            old = OLD_PROCESSOR.fullmatch(rest)
            if old:
                for component in components:
                    module = f"{old['attn']}.{OLD_PROJ[component][old['proj']]}"
                    if module in self.tables.get(component, {}) or component == components[-1]:
                        self.add(key, tensors[key], module, old["role"], (component,))
                        break
                continue
            split = _split(rest, DIFFUSERS_SUFFIXES)
            if split is None:
                self.fail(key, "not a LoRA key of any layout t2v reads (t2v, diffusers/PEFT, "
                          "kohya, Text-To-Video-Finetuning's Stable LoRA)")
            self.add(key, tensors[key], split[0], split[1], components)

    def kohya(self, tensors: dict[str, torch.Tensor]):
        tables = {"unet": kohya_aliases(self.tables["unet"], ("lora_unet_",))}
        if "text_encoder" in self.tables:
            tables["text_encoder"] = kohya_aliases(self.tables["text_encoder"],
                                                   ("lora_te_", "lora_te1_"))
        for key in sorted(tensors):
            if key.startswith("lora_te2_"):
                self.fail(key, "a second text encoder (SDXL); this model has one")
            if key.endswith(".dora_scale"):
                self.fail(key, "DoRA adapters are not supported")
            split = _split(key, KOHYA_SUFFIXES)
            if split is None:
                self.fail(key, "not a kohya LoRA key (NAME.lora_down.weight, NAME.lora_up.weight,"
                          " NAME.alpha; LyCORIS LoHa/LoKr are not supported)")
            component = "unet" if key.startswith("lora_unet_") else "text_encoder"
            self.add(key, tensors[key], split[0], split[1], (component,), tables)

    def stable_lora(self, tensors: dict[str, torch.Tensor]):
        for key in sorted(tensors):
            split = _split(key, STABLE_SUFFIXES)
            if split is None:
                self.fail(key, "not a Stable LoRA key (MODULE.lora_A, MODULE.lora_B, "
                          "MODULE.bias)")
            self.add(key, tensors[key], split[0], split[1], ("unet", "text_encoder"))


def _adapter_metadata(path: Path, metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` (LoraConfig fields, `unet.`/`text_encoder.` prefixed
    by the pipelines, bare from `save_lora_adapter`) per component ('' for bare)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        fields = json.loads(raw)
    except ValueError as exc:
        raise UserError(f"{path}: unreadable lora_adapter_metadata ({exc})") from None
    out: dict[str, dict] = {}
    for key, value in fields.items():
        component, dot, name = key.partition(".")
        if dot and component in ("unet", "text_encoder"):
            out.setdefault(component, {})[name] = value
        else:
            out.setdefault("", {})[key] = value
    return out


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module path or its end."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _apply_metadata(path: Path, updates: list[Update], metadata: dict[str, str]):
    configs = _adapter_metadata(path, metadata)
    for u in updates:
        key = u.roles.get("down", u.roles.get("up", next(iter(u.roles.values()))))[0]
        component = u.component if key.startswith(u.component + ".") else ""
        config = configs.get(component)
        if config is None:
            continue
        if config.get("use_dora"):
            raise UserError(f"{path}: {key!r}: DoRA adapters (use_dora) are not supported")
        if "down" in u.roles:
            rank = u.roles["down"][1].shape[0]
            declared = _pattern_value(config.get("rank_pattern"), u.module, config.get("r", 8))
            if declared != rank:
                raise UserError(f"{path}: {key!r} has rank {rank} but lora_adapter_metadata "
                                f"says {declared}")
        if u.alpha is None:
            u.alpha = float(_pattern_value(config.get("alpha_pattern"), u.module,
                                           config.get("lora_alpha", 8)))
        u.rslora = bool(config.get("use_rslora", False))


# -- checking and applying --------------------------------------------------------------------

def _layer(model: nn.Module, update: Update) -> nn.Module:
    return model.get_submodule(update.module)


def _rank(update: Update, layer: nn.Module, loralib: bool) -> int:
    """Check the A/B shapes against the layer; the rank."""
    key_a, a = update.roles["down"]
    key_b, b = update.roles["up"]
    w = layer.weight
    if isinstance(layer, nn.Embedding):
        expected_a, expected_b = (b.shape[1], w.shape[0]), (w.shape[1], a.shape[0])
    elif loralib and isinstance(layer, (nn.Conv2d, nn.Conv3d)):
        k = w.shape[2]
        r = a.shape[0] // k
        if isinstance(layer, nn.Conv2d) and w.shape[3] != k or isinstance(
                layer, nn.Conv3d) and tuple(w.shape[3:]) != (1, 1):
            raise UserError(f"{key_a!r}: Stable LoRA cannot adapt {update.module} (kernel "
                            f"{tuple(w.shape[2:])})")
        expected_a, expected_b = (r * k, w.shape[1] * k), (w.shape[0] * k, r * k)
    elif isinstance(layer, nn.Linear):
        expected_a, expected_b = (a.shape[0], w.shape[1]), (w.shape[0], a.shape[0])
    else:  # PEFT / kohya convolution: A has the kernel, B is 1x1
        ones = (1,) * (w.ndim - 2)
        expected_a, expected_b = (a.shape[0], *w.shape[1:]), (w.shape[0], a.shape[0], *ones)
    for key, tensor, expected in ((key_a, a, expected_a), (key_b, b, expected_b)):
        if tuple(tensor.shape) != tuple(expected):
            raise UserError(f"{key!r} has shape {tuple(tensor.shape)}, {update.module} "
                            f"({type(layer).__name__} {tuple(w.shape)}) needs {tuple(expected)}")
    return b.shape[1] // (w.shape[2] if loralib and w.ndim > 2 else 1)


def _delta(update: Update, layer: nn.Module, loralib: bool) -> torch.Tensor:
    a = update.roles["down"][1].to(layer.weight.device, torch.float32)
    b = update.roles["up"][1].to(layer.weight.device, torch.float32)
    w = layer.weight
    if isinstance(layer, nn.Embedding):
        return (b @ a).T
    if not loralib:
        return (b.flatten(1) @ a.flatten(1)).view(w.shape)
    if isinstance(layer, nn.Conv3d):  # (out, in, k, 1, 1): mean over the second k
        k = w.shape[2]
        return (b @ a).view(w.shape[0], w.shape[1], k, k, 1).mean(dim=-2, keepdim=True)
    return (b @ a).view(w.shape)


def _check(path: Path, models: dict[str, nn.Module], updates: list[Update],
           loralib: bool) -> None:
    for u in updates:
        layer = _layer(models[u.component], u)
        first = u.key()
        try:
            if "bias" in u.roles:
                key, bias = u.roles["bias"]
                own = getattr(layer, "bias", None)
                if own is None or own.shape != bias.shape:
                    has = "no bias" if own is None else f"a bias of shape {tuple(own.shape)}"
                    raise UserError(f"{key!r} has shape {tuple(bias.shape)}; {u.module} has "
                                    f"{has}")
            lora = {"down", "up"} & set(u.roles)
            if lora and lora != {"down", "up"}:
                missing = ({"down", "up"} - lora).pop()
                raise UserError(f"{first!r}: no {'A/down' if missing == 'down' else 'B/up'} "
                                f"tensor for {u.module}")
            if not lora and set(u.roles) - {"bias"}:
                raise UserError(f"{first!r}: an alpha or bias without A and B for {u.module}")
            if lora:
                if not isinstance(layer, ADAPTABLE):
                    raise UserError(f"{first!r}: {u.module} is a {type(layer).__name__}, not "
                                    "a layer LoRA adapts")
                rank = _rank(u, layer, loralib)
                if "alpha" in u.roles:
                    key, alpha = u.roles["alpha"]
                    if alpha.numel() != 1:
                        raise UserError(f"{key!r}: alpha must be one number")
                    u.alpha = float(alpha.float().item())
                if "up_bias" in u.roles:
                    key, bias = u.roles["up_bias"]
                    if layer.bias is None or bias.shape != layer.bias.shape:
                        raise UserError(f"{key!r}: shape {tuple(bias.shape)} does not fit the "
                                        f"bias of {u.module}")
                u.rank = rank
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None


def _apply(models: dict[str, nn.Module], updates: list[Update], scale: float,
           loralib: bool) -> None:
    with torch.no_grad():
        for u in updates:
            layer = _layer(models[u.component], u)
            if "down" in u.roles:
                alpha = u.alpha if u.alpha is not None else float(u.rank)
                s = scale * alpha / (math.sqrt(u.rank) if u.rslora else u.rank)
                w = layer.weight
                w.copy_((w.float() + s * _delta(u, layer, loralib)).to(w.dtype))
                if "up_bias" in u.roles:
                    b = u.roles["up_bias"][1].to(w.device, torch.float32)
                    layer.bias.copy_((layer.bias.float() + s * b).to(layer.bias.dtype))
            if "bias" in u.roles:  # a trained bias: interpolate towards it
                b = u.roles["bias"][1].to(layer.bias.device, torch.float32)
                layer.bias.copy_((layer.bias.float() + scale * (b - layer.bias.float()))
                                 .to(layer.bias.dtype))


def merge_foreign_lora(path, scale: float, unet: nn.Module,
                       text_encoder: nn.Module | None = None,
                       tensors: dict[str, torch.Tensor] | None = None,
                       metadata: dict[str, str] | None = None) -> list[str]:
    """Merge a kohya, Stable LoRA or diffusers LoRA file into `unet` (and `text_encoder`):
    W += scale * alpha / rank * delta. Everything is checked before any weight changes.
    Returns the changed layers (text-encoder ones as `text_encoder.NAME`)."""
    path = Path(path)
    if tensors is None:
        tensors, metadata = read_lora_tensors(path)
    metadata = metadata or {}
    fmt = _detect(path, tensors, metadata)
    if fmt in ("t2v", "t2v_turbo"):
        raise ValueError(f"{fmt} LoRA files go through merge_lora_file")
    parser = _Parser(path, unet, text_encoder)
    getattr(parser, fmt)(tensors)
    updates = sorted(parser.updates.values(), key=lambda u: (u.component, u.module))
    if fmt == "diffusers":
        _apply_metadata(path, [u for u in updates if "down" in u.roles], metadata)
    models = {"unet": unet, "text_encoder": text_encoder}
    loralib = fmt == "stable_lora"
    _check(path, models, updates, loralib)
    _apply(models, updates, scale, loralib)
    return [u.module if u.component == "unet" else f"text_encoder.{u.module}" for u in updates]


def lora_path(spec) -> Path:
    """The file a LoRA argument names: a path as it is; DEMO_FAST_LORA the shipped student."""
    if str(spec) == DEMO_FAST_LORA:
        if not DEMO_FAST_FILE.is_file():
            raise UserError(f"{spec}: the demo student is missing from this installation "
                            f"({DEMO_FAST_FILE}); reinstall t2v")
        return DEMO_FAST_FILE
    return Path(spec)


def merge_lora_file(path, scale: float, unet: nn.Module,
                    text_encoder: nn.Module | None = None) -> list[str]:
    """Any LoRA file t2v reads, merged into the models: t2v's own through peft
    (t2v.models.lora.load_lora + merge_lora), the others through `merge_foreign_lora`."""

    path = lora_path(path)
    tensors, metadata = read_lora_tensors(path)
    kind = _detect(path, tensors, metadata)
    if kind == "t2v":
        names = load_lora(unet, path, scale)
        merge_lora(unet)
        return names
    if kind == "t2v_turbo":
        return merge_t2v_turbo(path, [tensors[str(i)] for i in range(len(tensors))], unet,
                               scale)
    return merge_foreign_lora(path, scale, unet, text_encoder, tensors, metadata)
