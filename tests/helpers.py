"""Shared test helpers: randomizing every parameter, measured differences, tolerances."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

# fp32 parity tolerance: max |ours - reference| relative to max |reference|.
PARITY_TOL = 1e-5


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a random value, including the ones references zero-initialise
    (a zero layer hides a whole branch from a parity test). Norm scales stay near 1."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim == 1 and name.endswith("weight"):
            value = 1.0 + 0.2 * noise  # norm scale
        elif p.ndim <= 1:
            value = 0.2 * noise  # bias (or a scalar)
        else:
            value = noise / math.sqrt(p[0].numel())  # fan-in scaling keeps activations O(1)
        p.copy_(value.to(p.dtype))
    return module


def assert_round_trip(state: dict, there, back) -> None:
    """`back(there(state))` gives the same keys, shapes and values, bit for bit."""
    returned = back(there(state))
    assert sorted(returned) == sorted(state)
    for key, tensor in state.items():
        assert returned[key].shape == tensor.shape and torch.equal(returned[key], tensor), key


def max_rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual - expected).abs().max() / scale).item()


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, tol: float = PARITY_TOL,
                  what: str = "") -> float:
    diff = max_rel_diff(actual.float(), expected.float())
    print(f"[parity] {what}: max relative difference {diff:.2e}")  # shown with pytest -s
    assert diff <= tol, f"{what}: max relative difference {diff:.3e} > {tol:.0e}"
    return diff
