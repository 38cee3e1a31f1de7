"""The CLI's generation flags, derived from GenerationOptions: one flag per field (nested
sections flattened), its type, help, metavar and choices from the field, its default from the
config being run. A new option gets its flag by being declared; nothing here changes.

    parser = argparse.ArgumentParser()
    add_option_flags(parser, cfg.sample)
    options = options_from_args(parser.parse_args(argv), cfg.sample)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from t2v.errors import ConfigError
from t2v.pipeline.options import GenerationOptions, option_fields
from t2v.sampling.freeu import RECOMMENDED as FREEU_RECOMMENDED

# Flags whose values are not one plain number or word: how they are written.
FREEU_DEFAULT = (FREEU_RECOMMENDED.b1, FREEU_RECOMMENDED.b2, FREEU_RECOMMENDED.s1,
                 FREEU_RECOMMENDED.s2)  # --freeu without numbers
COMMA_LISTS = {"init_weights"}  # --init-weights 1,0.5,0.25


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")


def _plain(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def flag_of(name: str, field: dataclasses.Field) -> str:
    return "--" + (field.metadata.get("flag") or name.rpartition(".")[2]).replace("_", "-")


def _argument(name: str, hint: Any) -> dict:
    """argparse keywords for one option of type `hint`."""
    kind, _ = _plain(hint)
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if name in COMMA_LISTS:
            return {"type": float_list}
        if args[-1] is Ellipsis:
            return {"type": float, "nargs": "*"}  # --freeu alone: the recommended values
        return {"type": args[0], "nargs": len(args)}
    return {"type": kind}


def add_option_flags(parser: argparse.ArgumentParser, defaults: GenerationOptions) -> None:
    """One flag per generation option, defaulting to `defaults` (the config's values)."""
    for name, field in option_fields():
        owner = GenerationOptions if "." not in name else \
            type(getattr(defaults, name.partition(".")[0]))
        hints = typing.get_type_hints(owner)
        meta = field.metadata
        flag = flag_of(name, field)
        extra = {k: meta[k] for k in ("metavar", "choices") if meta.get(k) is not None}
        if "metavar" not in extra and "choices" not in extra:
            extra["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag, dest=name, default=_value(defaults, name),
                            help=meta.get("help"), **extra,
                            **_argument(name, hints[field.name]))


def _value(options: Any, name: str) -> Any:
    for part in name.split("."):
        options = getattr(options, part)
    return options


def options_from_args(args: argparse.Namespace, base: GenerationOptions) -> GenerationOptions:
    """The options the flags give, on top of `base`; a wrong combination is a ConfigError
    naming the command line."""
    top, sections = {}, {}
    for name, _ in option_fields():
        value = vars(args)[name]
        if isinstance(value, list):  # nargs: tuples in the options
            value = tuple(value) if value or name != "freeu" else FREEU_DEFAULT
        section, _, key = name.rpartition(".")
        (sections.setdefault(section, {}) if section else top)[key or name] = value
    try:
        for section, values in sections.items():
            top[section] = dataclasses.replace(getattr(base, section), **values)
        return dataclasses.replace(base, **top)
    except ConfigError as exc:
        raise ConfigError(f"command line: {exc}") from None
