"""Conversion tables with strict accounting."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from t2v.errors import UserError

Transform = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def identity(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return tensors


class ConversionError(UserError, KeyError):
    """A state dict does not match the table: keys missing, unused or of the wrong shape."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Rule:
    """`target` keys are `forward([state[k] for k in source])`; `inverse` undoes it exactly."""

    source: tuple[str, ...]
    target: tuple[str, ...]
    forward: Transform = identity
    inverse: Transform = identity


def rename(source: str, target: str) -> Rule:
    return Rule((source,), (target,))


def _summary(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def convert(state: Mapping[str, torch.Tensor], rules: Sequence[Rule],
            ignore: Sequence[str] = (), what: str = "state dict") -> dict[str, torch.Tensor]:
    """Apply `rules` to `state`. Keys fully matching a regex in `ignore` may be left unused."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for rule in rules:
        absent = [k for k in rule.source if k not in state]
        if absent:
            missing.extend(absent)
            continue
        tensors = rule.forward([state[k] for k in rule.source])
        for key, tensor in zip(rule.target, tensors, strict=True):
            if key in out:
                raise ValueError(f"conversion table writes {key} twice")  # a bug in the table
            out[key] = tensor
        used.update(rule.source)
    ignored = [re.compile(p) for p in ignore]
    unused = [k for k in state if k not in used and not any(p.fullmatch(k) for p in ignored)]
    if missing or unused:
        parts = []
        if missing:
            parts.append(f"missing keys: {_summary(missing)}")
        if unused:
            parts.append(f"unexpected keys: {_summary(unused)}")
        raise ConversionError(f"{what} does not match the expected layout; " + "; ".join(parts))
    return out


def invert(rules: Sequence[Rule]) -> list[Rule]:
    """The table that maps targets back to sources."""
    return [Rule(r.target, r.source, r.inverse, r.forward) for r in rules]


def check_shapes(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size],
                 what: str = "state dict") -> None:
    """Strict key-set and shape equality against a model's `state_dict()` shapes."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
             for k in expected if k in state and state[k].shape != expected[k]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {_summary(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_summary(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {_summary(wrong)}")
        raise ConversionError(f"{what} does not fit the model; " + "; ".join(parts))
